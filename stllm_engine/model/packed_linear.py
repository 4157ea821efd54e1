"""CPU linear layers with weights pre-packed once in oneDNN's blocked layout.

``F.linear`` on the CPU re-packs (reorders) the weight inside every call for small row counts
(MKL/oneDNN GEMMs block the weight before multiplying). A decode step reads every weight once,
so that per-call packing roughly doubles the memory traffic of batched decode steps (measured on
the bench-cpu LLM at 1 thread: 8 rows 103 -> 62 ms fp32, bf16 30 -> 22 ms). Decode-sized inputs
(<= ``MAX_PACKED_ROWS`` rows, fp32 from 2 rows) take the packed path; a single fp32 row is as
fast through MKL's GEMV.
The weight is packed for ``PACK_ROWS_HINT`` (32) rows: oneDNN picks its blocked layout from that
hint, and the 32-row layout was as fast as the 1-row one for a single row while faster for batched
rows (fp32, 8 rows, [1024 -> 5632], 2 threads: 1.03 -> 0.73 ms) and for prefill-sized inputs
(bf16, 593 rows: 3.47 ms through ``F.linear`` -> 2.69 ms packed). Which path is faster above
``MAX_PACKED_ROWS`` depends on the shape (the square [1024 -> 1024] projection was faster through
``F.linear``: 0.78 vs 1.06 ms), so :func:`calibrate_prefill` times both once per weight shape at
load and sets ``prefill_packed`` on each module (``STLLM_CPU_PACKED_PREFILL=0/1`` forces it).
:class:`PackedLinear` packs the weight at load time (``torch.ops.mkldnn._reorder_linear_weight``)
and multiplies with ``torch.ops.mkldnn._linear_pointwise``, keeping the plain ``weight`` (shared,
not copied) for everything else: other devices, autograd, state dicts.

``pack_linears(model)`` swaps the LLM's projections and the LM head in place; it does nothing
off the CPU, without oneDNN, or with ``STLLM_CPU_PACKED=0``. Packing keeps a second copy of those
weights in memory, unless that copy would not fit: ``STLLM_CPU_PACKED=auto`` (the default) then
packs each weight and frees its plain copy at once (:meth:`PackedLinear.drop_plain`; ST-LLM-7B in
bf16 has ~13 GB of LLM weights, which a 24 GB machine cannot hold twice), ``only`` always does,
``both`` (or ``1``) never does. A module without its plain weight serves CPU inference of its dtype
only (every row count through the packed GEMM) and says so when asked for anything else.

:func:`pack_vision` packs the vision tower's linears the same way. :class:`PackedLinearGELU`
runs the MLP's ``fc1`` bias and exact GELU with the GEMM. In float32 they are oneDNN post-ops on
the float32 accumulator: the result equals ``F.gelu(F.linear(x, w, b))`` to float32 rounding
(bit-identical at the ViT's shapes measured; other GEMM blockings differ by ~1e-7 relative),
without the separate bias copy and GELU pass: [4112, 256] x [256, 1117] + GELU 30.1 -> 17.7 ms
(bench-cpu ViT, 16 frames, 1 thread). In bfloat16 the GEMM (+ bias) can instead round to
bfloat16 and the GELU be a table lookup of torch's own bfloat16 GELU (``ops.elementwise.gelu_``),
both rounding where torch rounds; :func:`calibrate_gelu` picks per shape at load: with the ViT's
short reduction (width 256) oneDNN's GELU post-op was the slower part of that GEMM (same shape,
2 threads: 2.4 ms with the post-op, 0.95 ms without, 1.5 ms with the lookup), at ViT-g's width
1408 the two are even. :func:`linear_add` folds a block's residual add into the ``proj``/``fc2``
GEMM as a post-op; in bfloat16 that rounds once where torch rounds twice (more accurate, not bit-equal
to the reference): bench-cpu ViT, bf16, 2 threads, 57.5 -> 52.7 ms.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from stllm_engine.ops.elementwise import gelu_

ENV = "STLLM_CPU_PACKED"  # auto (default) | both (= 1) | only | 0 (see the module doc)
PACKED_MODES = ("auto", "both", "only", "0")
PREFILL_ENV = "STLLM_CPU_PACKED_PREFILL"  # "auto" (default: calibrate), "1" always, "0" never
CALIBRATION_ENV = "STLLM_CPU_CALIBRATION"  # "timed" (default) | "fixed": see calibration_fixed
MAX_PACKED_ROWS = 32  # decode-sized inputs always take the packed GEMM; above: ``prefill_packed``
PACK_ROWS_HINT = 32  # oneDNN's blocked layout is chosen for this many rows
CALIBRATION_ROWS = 512  # when the caller has no better guess of its prefill row count
PROMPT_ROWS = 96  # a chat prompt's text tokens beside the video (system + question), rounded up
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_mode() -> str:
    """``STLLM_CPU_PACKED`` as one of :data:`PACKED_MODES` (a bad value raises, naming it)."""
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    mode = {"1": "both", "true": "both", "yes": "both", "on": "both", "false": "0", "no": "0", "off": "0"}.get(raw, raw)
    if mode not in PACKED_MODES:
        raise ValueError(f"{ENV} must be auto, both (1), only or 0, got {raw!r}")
    return mode


def packing_available(weight: torch.Tensor) -> bool:
    """oneDNN packing applies: CPU weight of a supported dtype, oneDNN built in, not disabled."""
    return (weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and packing_mode() != "0")


def memory_available() -> int | None:
    """Bytes the kernel says can still be allocated without swapping (``MemAvailable``); None
    where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def keep_plain_copies(extra_bytes: int) -> bool:
    """Whether packing may keep the plain weights beside the ``extra_bytes`` of packed copies: the
    mode says so, or (``auto``) they fit in the available memory with max(2 GiB, 1/8 of it) to
    spare for activations."""
    mode = packing_mode()
    if mode != "auto":
        return mode != "only"
    avail = memory_available()
    return avail is None or extra_bytes <= avail - max(2 << 30, avail // 8)


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """A CPU input outside autograd (no gradient to x or weight): oneDNN's packed path may run."""
    wants_grad = x.requires_grad or (weight is not None and weight.requires_grad)
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and wants_grad)


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` (same ``weight``/``bias`` objects) with a oneDNN-packed copy
    of the weight used for CPU inference of the same dtype."""

    def __init__(self, linear: nn.Linear, drop_plain: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.dtype = linear.weight.dtype
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)
        self.prefill_packed = False  # above MAX_PACKED_ROWS rows too (see calibrate_prefill)
        self.residual_add = False  # its callers add a residual through linear_add (calibrate_prefill)
        if drop_plain:
            self.drop_plain()

    def drop_plain(self) -> None:
        """Free the plain weight (its memory, once nothing else holds it): from now on only CPU
        inference of this dtype runs, every row count through the packed GEMM."""
        self.weight = None
        self.prefill_packed = True

    def plain_weight(self) -> torch.Tensor:
        """The plain weight, for every path but packed CPU inference (error if it was dropped)."""
        if self.weight is None:
            raise RuntimeError(f"this {type(self).__name__} ({self.in_features} -> {self.out_features}) keeps only "
                               f"oneDNN's packed weight (CPU inference of {self.dtype}, outside autograd): its plain "
                               f"copy was freed to save memory; load with {ENV}=both (or 0) for other uses")
        return self.weight

    def _plain_inference(self, x: torch.Tensor) -> bool:
        """CPU input of the weight's dtype outside autograd: the packed weight may be used."""
        return x.dtype == self.dtype and _cpu_inference(x, self.weight)

    def _packed(self, x: torch.Tensor, attr: str, algorithm: str) -> torch.Tensor:
        """oneDNN GEMM with the packed weight (+ bias, + post-op ``attr``) over x's rows."""
        x2 = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, attr, [], algorithm)
        return out.view(*x.shape[:-1], self.out_features)

    def packed_for(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether ``rows`` rows of ``dtype`` (plain CPU inference) take the packed GEMM."""
        if self.weight is None:  # only the packed copy is left
            return dtype == self.dtype and rows > 0
        return (dtype == self.dtype and rows > 0
                and (rows <= MAX_PACKED_ROWS or self.prefill_packed)
                and not (rows == 1 and dtype == torch.float32))  # fp32 GEMV: MKL is as fast

    def use_packed(self, x: torch.Tensor) -> bool:
        """Whether this input takes the packed GEMM (else ``F.linear``)."""
        return self._plain_inference(x) and self.packed_for(x.numel() // self.in_features, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_packed(x):
            return F.linear(x, self.plain_weight(), self.bias)
        return self._packed(x, "none", "")

    def extra_repr(self) -> str:
        plain = "" if self.weight is not None else ", plain weight freed"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn{plain}"


def _plain_bytes(linears) -> int:
    return sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)


def pack_linears(model) -> int:
    """Swap the LLM projections (qkv, o, gate_up, down) and ``lm_head`` of an STLLMModel for
    :class:`PackedLinear` where packing applies; returns how many were swapped (0: nothing to do,
    e.g. CUDA, or already packed)."""
    if type(model.lm_head) is not nn.Linear or not packing_available(model.lm_head.weight):
        return 0
    slots = [(parent, name) for layer in model.llm.layers
             for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                  (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj"))
             if type(getattr(parent, name)) is nn.Linear] + [(model, "lm_head")]
    drop = not keep_plain_copies(_plain_bytes(getattr(p, n) for p, n in slots))
    for parent, name in slots:  # one weight at a time: with ``drop`` memory grows by one weight at most
        setattr(parent, name, PackedLinear(getattr(parent, name), drop_plain=drop))
    calibrate_prefill([lin for lin in model.llm.modules() if isinstance(lin, PackedLinear)],
                      rows=llm_prefill_rows(model.config))
    return len(slots)


def llm_prefill_rows(config) -> int:
    """The row count of a typical CPU prefill of this model: one answer's video tokens at the
    default frame count + :data:`PROMPT_ROWS`, padded like the LLM pads its prefill rows (bench-cpu
    and ST-LLM-7B, ``all``: 512 + 96 = 608)."""
    from stllm_engine.model.llama import bucketed_rows

    return bucketed_rows(config.num_video_tokens() + PROMPT_ROWS, torch.device("cpu"))


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds that call every one in turn (the
    order rotating from round to round), after one warm-up round (which also sets up oneDNN's
    primitives for the shape): side by side, so a host's drift hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            t = time.perf_counter()
            fns[j]()
            if r:
                times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def calibration_fixed() -> bool:
    """``STLLM_CPU_CALIBRATION=fixed``: the load-time choices between CPU kernel paths (prefill
    GEMM, residual add, fc1 + GELU, the fused SwiGLU) are not timed; each takes a fixed path (the
    one rounding as torch rounds where there is one). Timed choices can differ between processes
    where two paths are close, and the paths round bfloat16 differently, so a greedy bfloat16
    answer can change at a near-tie from one process to the next; fixed, it does not."""
    raw = os.environ.get(CALIBRATION_ENV, "timed").strip().lower() or "timed"
    if raw not in ("timed", "fixed"):
        raise ValueError(f"{CALIBRATION_ENV} must be timed or fixed, got {raw!r}")
    return raw == "fixed"


def _second_is_faster(first, second, repeats: int, fixed: bool = False) -> bool:
    """Whether ``second()`` has the lower median time (:func:`interleaved_medians`); ``fixed``
    under ``STLLM_CPU_CALIBRATION=fixed`` (nothing timed)."""
    if calibration_fixed():
        return fixed
    a, b = interleaved_medians([first, second], repeats)
    return b < a


def _prefill_mode() -> str:
    mode = os.environ.get(PREFILL_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{PREFILL_ENV} must be auto, 0 or 1, got {mode!r}")
    return mode


@torch.no_grad()
def calibrate_prefill(linears: list[PackedLinear], rows: int = CALIBRATION_ROWS,
                      repeats: int = 5) -> dict[tuple, bool]:
    """Set ``prefill_packed`` on each module: whether prefill-sized inputs (more than
    ``MAX_PACKED_ROWS`` rows) use the packed GEMM. ``auto`` times both paths on ``rows`` random
    rows once per (in, out, dtype), the median of ``repeats`` interleaved runs after a warm-up;
    returns {shape: choice}. Both paths compute the same product (they differ by GEMM rounding
    only). ``rows`` matters: oneDNN splits a GEMM over the threads by row blocks, and which path
    wins can flip with the row count (bf16 [1024 -> 1024], 2 threads: packed 0.70 vs 0.79 ms at
    512 rows, 1.22 vs 0.85 ms at 608), so callers pass their typical prefill's row count.
    A module marked ``residual_add`` (used through :func:`linear_add`) is timed as it runs there:
    the packed GEMM with the add as a post-op against ``F.linear`` plus a separate add (bench-cpu
    ViT proj/fc2, 4112 rows, bf16: 0.40 vs 0.59 ms and 1.09 vs 1.35 ms, where the bare GEMMs were
    close enough for the noise to pick ``F.linear``)."""
    mode = _prefill_mode()
    choice: dict[tuple, bool] = {}
    for lin in linears:
        if lin.weight is None:  # only the packed copy is left
            continue
        key = (lin.in_features, lin.out_features, lin.dtype, lin.residual_add)
        if key not in choice:
            if mode != "auto":
                choice[key] = mode == "1"
            elif lin.residual_add:
                x = torch.randn(rows, lin.in_features).to(lin.dtype)
                r = torch.randn(rows, lin.out_features).to(lin.dtype)
                choice[key] = _second_is_faster(
                    lambda: r + F.linear(x, lin.weight, lin.bias),
                    lambda: torch.ops.mkldnn._linear_pointwise.binary(x, r, lin.packed, lin.bias, "add"), repeats)
            else:
                x = torch.randn(rows, lin.in_features).to(lin.dtype)
                choice[key] = _second_is_faster(lambda: F.linear(x, lin.weight, lin.bias),
                                                lambda: lin._packed(x, "none", ""), repeats)
        lin.prefill_packed = choice[key]
    return choice


class PackedLinearGELU(PackedLinear):
    """``gelu(linear(x))`` (exact erf GELU) through the packed GEMM on CPU inference (any row
    count): bias + GELU as oneDNN post-ops, or in bfloat16 where :func:`calibrate_gelu` found it
    faster (``gelu_table``), the bias in the GEMM and the GELU looked up in place (torch's
    rounding); plain torch otherwise. Same ``weight``/``bias`` objects and names as the
    ``nn.Linear`` it replaces."""

    def __init__(self, linear: nn.Linear, drop_plain: bool = False):
        super().__init__(linear, drop_plain)
        self.gelu_table = self.dtype == torch.bfloat16  # see calibrate_gelu

    def _gelu(self, x: torch.Tensor, table: bool) -> torch.Tensor:
        if table:  # GEMM + bias, then torch's bfloat16 GELU of that through a table
            return gelu_(self._packed(x, "none", ""))
        return self._packed(x, "gelu", "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plain_inference(x) or x.numel() == 0:
            return F.gelu(F.linear(x, self.plain_weight(), self.bias))
        return self._gelu(x, self.gelu_table)

    def extra_repr(self) -> str:
        return super().extra_repr() + "+gelu"


@torch.no_grad()
def calibrate_gelu(mods: list[PackedLinearGELU], rows: int, repeats: int = 5) -> dict[tuple, bool]:
    """Set ``gelu_table`` on each bfloat16 module: whether the GEMM + table lookup beats oneDNN's
    GELU post-op at ``rows`` rows (median of ``repeats`` interleaved runs after a warm-up, once
    per (in, out)); returns {shape: choice}. The lookup is a separate pass over the output, the
    post-op's erf runs inside the GEMM: with a short reduction the GEMM is cheap and the post-op
    dominates (bench-cpu ViT fc1, [4112, 256] -> 1117: 3.0-3.2 vs 2.2-2.5 ms), with a long one the
    two are even (ViT-g, [4112, 1408] -> 6144: 62-66 vs 63-68 ms). Both are exact-GELU results of
    the same product; they differ in bfloat16 rounding (the table rounds where torch does)."""
    choice: dict[tuple, bool] = {}
    for mod in mods:
        if mod.dtype != torch.bfloat16:
            continue
        key = (mod.in_features, mod.out_features)
        if key not in choice:
            x = torch.randn(rows, mod.in_features).to(mod.dtype)
            choice[key] = _second_is_faster(lambda: mod._gelu(x, False), lambda: mod._gelu(x, True), repeats,
                                            fixed=True)  # (the table rounds as torch does)
        mod.gelu_table = choice[key]
    return choice


def linear_gelu(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu(lin(x))`` (exact GELU): a :class:`PackedLinearGELU` applies the GELU itself; else
    :func:`~stllm_engine.ops.elementwise.gelu_` on the new ``lin(x)`` (in place for CPU bfloat16)."""
    h = lin(x)
    return h if isinstance(lin, PackedLinearGELU) else gelu_(h)


def linear_add(lin: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + lin(x)`` (a new tensor). On the packed CPU path the add is a oneDNN post-op of
    the GEMM: no separate pass over the output, and one rounding instead of two in bfloat16."""
    if (isinstance(lin, PackedLinear) and lin.use_packed(x) and residual.dtype == x.dtype
            and residual.shape == (*x.shape[:-1], lin.out_features)):
        x2 = x.reshape(-1, lin.in_features).contiguous()
        r2 = residual.reshape(-1, lin.out_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise.binary(x2, r2, lin.packed, lin.bias, "add")
        return out.view(residual.shape)
    return residual + lin(x)


class PackedPatchEmbed(nn.Module):
    """Drop-in for the ViT's patch-embedding ``nn.Conv2d`` (kernel = stride = patch; same
    ``weight``/``bias`` objects): in bfloat16 CPU inference :meth:`tokens` runs it as one packed
    oneDNN GEMM over the unfolded patches ([T * patches, 3 * p * p] x [3 * p * p, W]), which was
    faster than oneDNN's convolution: 16 frames of 224 px, width 256, 2 threads: 5.8 -> 3.1 ms
    (float32: 3.7 vs 3.9 ms, so float32 keeps the convolution). Both accumulate in float32 and
    round once; they differ by summation order only."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or conv.stride != (k, k) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError(f"PackedPatchEmbed needs a kernel = stride conv without padding, got {conv}")
        self.patch, self.in_channels, self.out_channels = k, conv.in_channels, conv.out_channels
        self.weight, self.bias = conv.weight, conv.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                conv.weight.detach().reshape(conv.out_channels, -1), PACK_ROWS_HINT)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """The convolution itself: [T, C, S, S] -> [T, W, S/p, S/p]."""
        return F.conv2d(frames, self.weight, self.bias, stride=self.patch)

    def tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [T, C, S, S] (any float dtype) -> patch tokens [T, (S/p)^2, W] in the weight's dtype."""
        t, c, h, w = frames.shape
        p, dtype = self.patch, self.weight.dtype
        if dtype != torch.bfloat16 or h % p or w % p or not _cpu_inference(frames, self.weight):
            return self(frames.to(dtype)).flatten(2).transpose(1, 2)
        gh, gw = h // p, w // p
        # the patches gathered and cast to bfloat16 in one copy (float32 frames: no separate cast pass)
        x = torch.empty((t, gh, gw, c, p, p), dtype=dtype)
        x.copy_(frames.reshape(t, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
        x = x.view(t * gh * gw, c * p * p)
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out.view(t, gh * gw, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, patch={self.patch}, packed=onednn"


def _pack_children(root: nn.Module, gelu_parent: type | None = None) -> list[PackedLinear]:
    """Swap every packable ``nn.Linear`` under ``root`` for a :class:`PackedLinear` (the ``fc1`` of
    a ``gelu_parent`` module for a :class:`PackedLinearGELU`), freeing the plain copies when they
    do not fit beside the packed ones (:func:`keep_plain_copies`); returns the new modules."""
    slots = [(mod, name, child) for mod in list(root.modules()) for name, child in list(mod.named_children())
             if type(child) is nn.Linear and packing_available(child.weight)]
    drop = bool(slots) and not keep_plain_copies(_plain_bytes(child for _, _, child in slots))
    swapped = []
    for mod, name, child in slots:
        fused = gelu_parent is not None and isinstance(mod, gelu_parent) and name == "fc1"
        new = (PackedLinearGELU if fused else PackedLinear)(child, drop_plain=drop)
        setattr(mod, name, new)
        swapped.append(new)
    return swapped


def _mark_residual_adds(mods) -> None:
    """Mark the packed modules whose output gets a residual added through :func:`linear_add`."""
    for m in mods:
        if isinstance(m, PackedLinear):
            m.residual_add = True


def _calibrate(swapped: list[nn.Module], rows: int) -> None:
    """Both load-time choices for newly packed modules at ``rows`` rows: the prefill GEMM path of
    the plain :class:`PackedLinear` ones, the GELU of the :class:`PackedLinearGELU` ones."""
    calibrate_prefill([lin for lin in swapped if type(lin) is PackedLinear], rows=rows)
    calibrate_gelu([lin for lin in swapped if isinstance(lin, PackedLinearGELU)], rows=rows)


def pack_vision(model) -> int:
    """Swap every ``nn.Linear`` of an STLLMModel's vision tower (ViT blocks, BT-Adapter) for a
    :class:`PackedLinear`, each MLP ``fc1`` for a :class:`PackedLinearGELU`, where packing applies,
    and in bfloat16 the patch embedding for a :class:`PackedPatchEmbed`,
    and calibrate their prefill path (every vision GEMM is prefill-sized: frames x tokens rows);
    returns how many were swapped (0: nothing to do, e.g. CUDA, fp16, or already packed)."""
    from stllm_engine.model.vision import EVAMlp

    swapped: list[nn.Module] = _pack_children(model.visual_encoder, EVAMlp)
    vt = model.visual_encoder
    adds = [b for blk in vt.blocks for b in (blk.attn.proj, blk.mlp.fc2)]
    if vt.btadapter is not None:  # the branch's temporal_fc and spatial fc2 add their residual too
        adds += [m for t, sp in zip(vt.btadapter.temporal, vt.btadapter.spatial) for m in (t.temporal_fc, sp.mlp.fc2)]
    _mark_residual_adds(adds)
    embed = vt.patch_embed
    if type(embed.proj) is nn.Conv2d and embed.proj.weight.dtype == torch.bfloat16 \
            and packing_available(embed.proj.weight):
        embed.proj = PackedPatchEmbed(embed.proj)
        swapped.append(embed.proj)
    cfg = model.config  # rows: the default frame count's tokens
    _calibrate(swapped, cfg.num_frames * cfg.vision.num_tokens)
    return len(swapped)


def pack_qformer(model) -> int:
    """The same for the Q-Former (each FFN's ``fc1`` + GELU fused; the attention outputs and
    ``fc2`` take their residual add as a post-op through :func:`linear_add`) and the projector:
    bench-cpu, bf16, 16 frames, 2 threads, ``encode_video`` 6.4 -> 5.7 ms (float32: no measurable
    change, 13.9 vs 13.6 ms). Returns how many were swapped."""
    from stllm_engine.model.qformer import _FFN, _Attention

    swapped = _pack_children(model.qformer, _FFN) + _pack_children(model.projector)
    _mark_residual_adds(m.out if isinstance(m, _Attention) else m.fc2 for m in model.qformer.modules()
                        if isinstance(m, (_Attention, _FFN)))
    cfg = model.config  # rows: the query tokens of the default frame count
    _calibrate(swapped, cfg.num_frames * cfg.tokens_per_frame)
    return len(swapped)
