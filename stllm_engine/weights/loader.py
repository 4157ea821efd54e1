"""``load_checkpoint``: an official ST-LLM folder -> config + state dict with official key names."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import STLLMConfig
from .errors import CheckpointError, mismatch_report
from .files import read_weights
from .infer import has_residual, infer_release_sizes, resolve_variant, variant_name
from .keys import MVM_PREFIX, VIDEO_PREFIX, expected_shapes, is_ignorable


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state_dict`` holds exactly ``expected_keys(config)``."""

    config: STLLMConfig
    state_dict: dict[str, torch.Tensor]
    variant: str  # "eva/all", "btadapter/residual", ...
    folder: Path
    ignored_keys: tuple[str, ...] = field(default=())  # dropped: derivable buffers, unused heads

    @property
    def vit(self) -> str:
        return self.variant.split("/")[0]

    @property
    def video_input(self) -> str:
        return self.config.video_input


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _read_config(folder: Path) -> tuple[STLLMConfig, bool]:
    try:
        config = STLLMConfig.load(folder)
        has_extra = "stllm" in json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad checkpoint config in {folder}: {e}") from e
    return config, has_extra


def load_checkpoint(folder: str | Path, dtype: torch.dtype | str | None = None,
                    video_input: str | None = None, strict: bool = True,
                    mvm_decoder: bool = False, progress: bool = True) -> Checkpoint:
    """Load an official-layout checkpoint folder.

    ``dtype``: cast floating tensors (None keeps the stored dtype). ``video_input``: override the
    variant's projector ("all"/"mean" on a global-local folder drops its up/down_proj).
    ``strict``: missing or unexpected keys raise :class:`CheckpointError` (shape mismatches always
    do). ``mvm_decoder``: keep the training-only ``mvm_decoder.*`` weights.
    """
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file; give the checkpoint folder that holds config.json and the weights")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    dtype = _as_dtype(dtype)
    if video_input is not None and video_input not in ("all", "mean", "residual"):
        raise ValueError(f"video_input must be 'all', 'mean' or 'residual', got {video_input!r}")
    config, has_extra = _read_config(folder)
    state = read_weights(folder, progress=progress)

    ignored = [k for k in state if is_ignorable(k)]
    if not mvm_decoder:
        ignored += [k for k in state if k.startswith(MVM_PREFIX)]
    if video_input in ("all", "mean") and has_residual(state):
        ignored += [k for k in state if k.startswith((VIDEO_PREFIX + "up_proj.", VIDEO_PREFIX + "down_proj."))]
    for k in ignored:
        state.pop(k)

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not has_extra:
        config = infer_release_sizes(config, shapes)
    config = resolve_variant(config, shapes.keys(), video_input, mvm_decoder)
    variant = variant_name(config)

    want = expected_shapes(config)
    missing = want.keys() - state.keys()
    unexpected = state.keys() - want.keys()
    wrong = {k: (shapes[k], want[k]) for k in want.keys() & state.keys() if shapes[k] != want[k]}
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(f"checkpoint {folder} ({variant}) does not match its config: "
                              + mismatch_report(missing, unexpected if strict else (), wrong))
    for k in unexpected:
        ignored.append(k)
        state.pop(k)

    if dtype is not None:  # in place, a tensor at a time: a new dict held both copies at once
        for k, v in state.items():  # (ST-LLM-7B's float16 shards cast to bfloat16: 2 x 15 GB)
            if v.is_floating_point() and v.dtype != dtype:
                state[k] = v.to(dtype)
        config = replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    return Checkpoint(config=config, state_dict=state, variant=variant, folder=folder,
                      ignored_keys=tuple(sorted(ignored)))
