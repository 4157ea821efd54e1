"""Finding and reading the weight files of a Hugging Face checkpoint folder.

Supported layouts (first match wins): ``model.safetensors.index.json``,
``pytorch_model.bin.index.json``, ``model.safetensors``, ``pytorch_model.bin``, and shard files
``model-0000i-of-0000n.safetensors`` / ``pytorch_model-0000i-of-0000n.bin`` without an index.
``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no pickled code runs).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import CheckpointError, format_keys

BIN_INDEX = "pytorch_model.bin.index.json"
ST_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
ST_SINGLE = "model.safetensors"
FORMATS = ("bin", "safetensors")
_SHARD_RE = re.compile(r"^(pytorch_model|model)-(\d+)-of-(\d+)\.(bin|safetensors)$")


def shard_name(i: int, n: int, fmt: str) -> str:
    """File name of shard ``i`` (1-based) of ``n`` in the Hugging Face convention."""
    if fmt == "bin":
        return f"pytorch_model-{i:05d}-of-{n:05d}.bin"
    if fmt == "safetensors":
        return f"model-{i:05d}-of-{n:05d}.safetensors"
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


def index_name(fmt: str) -> str:
    return BIN_INDEX if fmt == "bin" else ST_INDEX


def single_name(fmt: str) -> str:
    return BIN_SINGLE if fmt == "bin" else ST_SINGLE


def is_weight_file_name(name: str) -> bool:
    """True for the file names this module reads (index, single file or shard)."""
    return name in (BIN_INDEX, ST_INDEX, BIN_SINGLE, ST_SINGLE) or bool(_SHARD_RE.match(name))


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid weight index (need a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: 'weight_map' is empty or not an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def _unindexed_shards(folder: Path) -> list[Path]:
    groups: dict[tuple[str, str, int], list[tuple[int, Path]]] = {}
    for p in folder.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            groups.setdefault((m[1], m[4], int(m[3])), []).append((int(m[2]), p))
    if not groups:
        return []
    # prefer safetensors, then the most complete group
    key = sorted(groups, key=lambda g: (g[1] != "safetensors", -len(groups[g])))[0]
    n = key[2]
    found = dict(groups[key])
    absent = [i for i in range(1, n + 1) if i not in found]
    if absent:
        raise CheckpointError(f"{folder}: shards {absent} of {n} ({key[0]}-*-of-{n:05d}.{key[1]}) "
                              "are missing and there is no index json")
    return [found[i] for i in range(1, n + 1)]


def find_weight_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of ``folder`` in load order, and the index's key->file map if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for idx in (ST_INDEX, BIN_INDEX):
        if (folder / idx).is_file():
            weight_map = _read_index(folder / idx)
            names = list(dict.fromkeys(weight_map.values()))
            absent = [n for n in names if not (folder / n).is_file()]
            if absent:
                raise CheckpointError(f"{folder / idx} names shard files that do not exist: "
                                      f"{format_keys(absent)}")
            return [folder / n for n in names], weight_map
    for single in (ST_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single], None
    shards = _unindexed_shards(folder)
    if shards:
        return shards, None
    raise CheckpointError(f"no weights in {folder}: looked for {ST_INDEX}, {BIN_INDEX}, {ST_SINGLE}, "
                          f"{BIN_SINGLE} and model-*-of-*.safetensors / pytorch_model-*-of-*.bin shards")


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.bin`` (safe, memory-mapped) or ``.safetensors`` file, on CPU."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:  # corrupt, truncated, pickled code, wrong format
        raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weight file {path} does not hold a flat dict of tensors")
    return sd


def read_weights(folder: str | Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """Merge every weight file of ``folder``; checks the index against the shards' contents."""
    files, weight_map = find_weight_files(folder)
    it = files
    if progress and len(files) > 1:
        from tqdm.auto import tqdm
        it = tqdm(files, desc=f"loading {Path(folder).name}", unit="shard", disable=None)
    state: dict[str, torch.Tensor] = {}
    for f in it:
        sd = read_weight_file(f)
        dup = state.keys() & sd.keys()
        if dup:
            raise CheckpointError(f"keys stored twice (again in {f.name}): {format_keys(dup)}")
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == f.name}
            absent = listed - sd.keys()
            if absent:
                raise CheckpointError(f"index says {f.name} holds keys it does not contain: "
                                      f"{format_keys(absent)}")
        state.update(sd)
    return state
