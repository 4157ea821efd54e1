"""``write_checkpoint``: config + state dict -> official folder layout (shared by tests and trainer)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import STLLMConfig
from .errors import CheckpointError, mismatch_report
from .files import FORMATS, index_name, is_weight_file_name, shard_name, single_name
from .keys import expected_shapes, is_ignorable


def _split(keys: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Consecutive groups of keys with roughly equal bytes; never an empty group."""
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for i, k in enumerate(keys):
        left_keys, left_groups = len(keys) - i, shards - len(groups)
        full = groups[-1] and (acc >= total * len(groups) / shards or left_keys <= left_groups)
        if full and left_groups > 0:
            groups.append([])
        groups[-1].append(k)
        acc += sizes[k]
    return groups


def write_checkpoint(folder: str | Path, config: STLLMConfig, state_dict: dict[str, torch.Tensor],
                     shards: int = 2, fmt: str = "bin", check: bool = True) -> Path:
    """Write ``config.json`` and the weights as ``shards`` files (+ index json when > 1).

    Keys are written in the order given. With ``check`` the state dict must hold exactly
    ``expected_keys(config)`` (plus ignorable buffers) with the expected shapes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    if check:
        want = expected_shapes(config)
        have = {k for k in state_dict if not is_ignorable(k)}
        wrong = {k: (tuple(state_dict[k].shape), want[k]) for k in have & want.keys()
                 if tuple(state_dict[k].shape) != want[k]}
        if have != want.keys() or wrong:
            raise CheckpointError("state dict does not match the config: "
                                  + mismatch_report(want.keys() - have, have - want.keys(), wrong))
    keys = list(state_dict)
    if shards > len(keys):
        raise ValueError(f"cannot split {len(keys)} tensors into {shards} shards")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)

    sizes = {k: v.numel() * v.element_size() for k, v in state_dict.items()}
    groups = _split(keys, sizes, shards)
    names = [single_name(fmt)] if shards == 1 else [shard_name(i + 1, shards, fmt) for i in range(shards)]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        # contiguous, unshared copies: safetensors refuses shared storage, torch.save would keep it
        part = {k: state_dict[k].detach().to("cpu").contiguous().clone() for k in group}
        # write then rename: a new inode, so tensors memory-mapped from the old file stay intact
        tmp = folder / (name + ".tmp")
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(part, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(part, tmp)
        os.replace(tmp, folder / name)
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / index_name(fmt)).write_text(json.dumps(index, indent=2) + "\n")
        names.append(index_name(fmt))
    for stale in folder.iterdir():  # weights of an earlier write would shadow or mix with these
        if is_weight_file_name(stale.name) and stale.name not in names:
            stale.unlink()
    return folder
