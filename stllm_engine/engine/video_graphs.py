"""CUDA graphs of the video side: the ViT (+ ``ln_vision``) per frame count, the Q-Former +
projector per (frame count, question length).

Why: at the ST-LLM-7B shape on an H100 the ViT's kernels took 16.9 ms of GPU time in a 21.8 ms
pass, and the Q-Former's 1.5 ms of kernels a 7-9 ms pass (``benchmarks/profile_e2e.py --ops``):
the GPU waited on some 500 and 250 kernel launches made one by one from Python. A replayed graph
launches them in one call.

Capture is lazy. The first call with a new shape runs eagerly - its result is the answer, and that
pass compiles Triton kernels and lets cuBLAS/cuDNN choose outside the capture - and then captures
the shape (costing about one more pass of launches, once per process and shape). Later calls copy
their inputs into the graph's static buffers, replay it and return a clone of its output. Keys: the
ViT by the frames' shape and dtype, the Q-Former by the image embeddings' shape and the number of
question tokens (the question's ids are an input, so one graph serves every question of that
length); graphs reading inputs of one shape share their static buffer. At most ``max_vision`` /
``max_qformer`` graphs, and frame counts up to ``max_frames`` (default: twice the model's, as a
pool keeps the activations of the largest pass captured into it); other shapes run eagerly. All
graphs share one memory pool: a replay may overwrite another graph's intermediates, never an
output still to be read, as each output is cloned before the next replay. A capture that fails
turns that side's graphs off (eager from then on), with the reason in ``errors``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from stllm_engine.engine.cuda_graphs import capture_graph, require_cuda


@dataclass
class CapturedPass:
    """A captured pass: ``replay`` recomputes ``output`` from the static ``inputs``."""

    replay: Callable[[], None]
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor | None

    def run(self, *args: torch.Tensor) -> torch.Tensor:
        for buf, x in zip(self.inputs, args):
            buf.copy_(x)
        self.replay()
        return self.output.clone()


class VideoGraphs:
    """The captured video-side passes of ``model`` (an STLLMModel on CUDA)."""

    def __init__(self, model, max_vision: int = 4, max_qformer: int = 128, max_frames: int | None = None):
        self._check_device(model)
        if max_vision < 0 or max_qformer < 0:
            raise ValueError(f"VideoGraphs: max_vision / max_qformer must be >= 0, got {max_vision}, {max_qformer}")
        self.model = model
        self.limits = {"vision": max_vision, "qformer": max_qformer}
        # a graph's memory pool keeps its largest pass's activations: no graphs for long videos
        self.max_frames = 2 * model.config.num_frames if max_frames is None else max_frames
        self.graphs: dict[str, dict[tuple, CapturedPass]] = {"vision": {}, "qformer": {}}
        self.errors: dict[str, str] = {}
        self.replays = {"vision": 0, "qformer": 0}
        self._pool = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _check_device(model) -> None:
        require_cuda(model, "VideoGraphs")

    # --- the two passes -------------------------------------------------------------------
    def encode_vision(self, frames: torch.Tensor) -> torch.Tensor:
        """``model.encode_vision(frames)``: frames [T, 3, S, S] -> image_embeds [T, Nv, Wv]."""
        frames = frames.to(self.model.device)
        key = (tuple(frames.shape), frames.dtype)
        return self._call("vision", key, self.model.encode_vision, (frames,))

    def encode_video(self, image_embeds: torch.Tensor, question: str | torch.Tensor) -> torch.Tensor:
        """``model.encode_video(image_embeds, question)`` -> video tokens [Lv, H]."""
        m = self.model
        ids = question if isinstance(question, torch.Tensor) else m.qformer_ids(question)
        ids = ids.to(m.device, torch.long).reshape(-1)
        image_embeds = image_embeds.to(m.device, m.dtype)
        key = (tuple(image_embeds.shape), ids.numel())
        return self._call("qformer", key, m.encode_video, (image_embeds, ids))

    # --- capture and replay ---------------------------------------------------------------
    def _call(self, side: str, key: tuple, fn: Callable[..., torch.Tensor],
              args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        g = self.graphs[side].get(key)
        if g is not None:
            self.replays[side] += 1
            return g.run(*args)
        out = fn(*args)  # eager: the answer, and the warm-up pass of a capture
        if (side not in self.errors and len(self.graphs[side]) < self.limits[side]
                and args[0].shape[0] <= self.max_frames):
            try:
                self.graphs[side][key] = self._capture(fn, tuple(self._static(a) for a in args))
            except Exception as e:  # noqa: BLE001  (eager still works; say why)
                self.errors[side] = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the {side} pass failed, running it eagerly: "
                              f"{self.errors[side]}", RuntimeWarning, stacklevel=3)
        return out

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        """The static input buffer of x's shape and dtype (shared by every graph reading one: the
        Q-Former graphs of one frame count share their image-embeddings buffer, 11.6 MB at ViT-g
        x 16 frames), holding a copy of x."""
        key = (tuple(x.shape), x.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(x, memory_format=torch.contiguous_format)
        return buf.copy_(x)

    def _capture(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> CapturedPass:
        """Capture ``fn`` over the static ``inputs`` (filled)."""
        replay, output, self._pool = capture_graph(lambda: fn(*inputs), self._pool)
        return CapturedPass(replay, inputs, output)

    def describe(self) -> str:
        parts = []
        for side, name in (("vision", "ViT"), ("qformer", "Q-Former")):
            if side in self.errors:
                parts.append(f"{name} eager (capture failed: {self.errors[side]})")
            else:
                parts.append(f"{name} {len(self.graphs[side])} graph(s)")
        return "cuda graphs: " + ", ".join(parts)
