"""Trainer: AdamW, warmup + cosine schedule, gradient clipping, resumable official checkpoints.

Output folder layout::

    <out>/checkpoint-000200/   official ST-LLM folder (loads with load_checkpoint / the reference)
                               + trainer_state.pt (optimizer, scheduler, sampler, RNG states)
    <out>/final/               the last step's official folder
    <out>/log.jsonl            one line per logged step
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from stllm_engine.training.data import BatchSampler, QADataset
from stllm_engine.training.losses import FrameReconHead
from stllm_engine.training.masking import MaskingConfig, sample_mask_rate
from stllm_engine.training.model import PARTS, TrainableSTLLM, load_trainable, save_checkpoint
from stllm_engine.training.step import StepOutput, forward_step

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on (saved beside every checkpoint)."""

    data: str
    init: str
    out: str
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    video_input: str | None = None  # None keeps the checkpoint's (all | mean | residual)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    mvm: bool = True  # MVM loss (needs masking)
    train: tuple[str, ...] = ("all",)
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    tasks: tuple[str, ...] | None = None
    limit: int | None = None  # training items per task
    device: str = "cpu"
    chat: bool = False  # also train chat-format examples (datasets/chat.py sentences)
    recon: float = 0.0  # weight of the auxiliary frame-reconstruction loss (0 = off)
    recon_grid: int = 8  # its target: each frame average-pooled to recon_grid x recon_grid

    def __post_init__(self) -> None:
        if isinstance(self.masking, dict):
            self.masking = MaskingConfig(**self.masking)
        for name in ("steps", "batch_size", "save_every", "log_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need warmup_steps >= 0, lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.recon < 0 or not isinstance(self.recon_grid, int) or self.recon_grid <= 0:
            raise ValueError(f"need recon >= 0 and recon_grid a positive int, got {self.recon}, "
                             f"{self.recon_grid}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.video_input not in (None, "all", "mean", "residual"):
            raise ValueError(f"video_input must be all, mean or residual, got {self.video_input!r}")
        self.train = tuple(self.train)
        if self.train != ("all",) and (not self.train or any(p not in PARTS for p in self.train)):
            raise ValueError(f"train parts must be 'all' or from {PARTS}, got {self.train}")
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: TrainConfig, model: TrainableSTLLM | None = None,
                 dataset: QADataset | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        resume = latest_checkpoint(self.out)
        torch.manual_seed(cfg.seed)
        self.model = model or load_trainable(resume or cfg.init, cfg.video_input, cfg.device, cfg.seed)
        self.n_trainable = self.model.set_trainable(cfg.train)
        self.model.train()
        c = self.model.config
        # training-only head (not part of the official folder; its weights live in trainer_state)
        self.recon_head = None
        if cfg.recon > 0:
            gen_state = torch.get_rng_state()
            torch.manual_seed(cfg.seed + 7)
            tokens = c.qformer.num_query_tokens
            self.recon_head = FrameReconHead(tokens, c.llm.hidden_size, cfg.recon_grid).to(cfg.device)
            torch.set_rng_state(gen_state)
        self.dataset = dataset or QADataset(cfg.data, self.model.reference.llama_tokenizer,
                                            self.model.reference.prompt_bos_id,
                                            c.llm.eos_token_id, c.num_frames, c.vision.image_size,
                                            tasks=list(cfg.tasks) if cfg.tasks else None,
                                            limit=cfg.limit, chat=cfg.chat)
        self.sampler = BatchSampler(len(self.dataset), cfg.batch_size, cfg.seed)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.rng = np.random.default_rng(cfg.seed)  # mask rates
        self.mask_gen = torch.Generator().manual_seed(cfg.seed)  # which tokens are dropped
        self.step = 0
        if resume is not None:
            self._load_state(resume)

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "embed" in name or "query_tokens" in name else decay).append(p)
        if self.recon_head is not None:
            decay.append(self.recon_head.head.weight)
            no_decay.append(self.recon_head.head.bias)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ one step
    def train_step(self, indices: list[int] | None = None) -> StepOutput:
        """One optimizer step on ``indices`` (default: the sampler's next batch)."""
        cfg = self.cfg
        batch = [self.dataset[i] for i in (indices if indices is not None else self.sampler.next())]
        rate = sample_mask_rate(self.rng, cfg.masking) if cfg.masking.enabled else None
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_step(self.model, batch, rate, cfg.mvm, self.mask_gen, self.recon_head, cfg.recon)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {self.step}")
        out.loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.recon_head is not None:
            params += list(self.recon_head.parameters())
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return out

    # ------------------------------------------------------------------ loop
    def train(self, progress: bool = True) -> Path:
        """Run until ``cfg.steps``; saves every ``save_every`` steps and at the end (``out/final``)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list) + "\n")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not progress)
        t0 = time.time()
        with (self.out / "log.jsonl").open("a") as log:
            while self.step < cfg.steps:
                out = self.train_step()
                bar.update(1)
                post = {"lm": f"{out.lm:.3f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
                if out.mvm is not None:
                    post["mvm"] = f"{out.mvm:.3f}"
                if out.recon is not None:
                    post["recon"] = f"{out.recon:.4f}"
                bar.set_postfix(post)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    log.write(json.dumps({"step": self.step, "loss": float(out.loss.detach()), "lm": out.lm,
                                          "mvm": out.mvm, "recon": out.recon,
                                          "mask_rate": out.mask_rate,
                                          "video_tokens": out.video_tokens, "grad_norm": self.grad_norm,
                                          "lr": self.scheduler.get_last_lr()[0],
                                          "seconds": round(time.time() - t0, 2)}) + "\n")
                    log.flush()
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save(self.out / f"checkpoint-{self.step:06d}")
        bar.close()
        self.save(self.out / f"checkpoint-{self.step:06d}")
        return save_checkpoint(self.model, self.out / "final", cfg.init)

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> Path:
        """Official folder + ``trainer_state.pt``; prunes all but the newest ``keep_checkpoints``."""
        save_checkpoint(self.model, folder, self.cfg.init)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": self.rng.bit_generator.state, "mask_gen": self.mask_gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg),
                 "recon_head": self.recon_head.state_dict() if self.recon_head is not None else None}
        torch.save(state, folder / STATE_FILE)
        for old in sorted(self.out.glob("checkpoint-*"))[:-self.cfg.keep_checkpoints]:
            if old.is_dir() and old != folder:
                import shutil
                shutil.rmtree(old)
        return folder

    def _load_state(self, folder: Path) -> None:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.bit_generator.state = state["rng"]
        self.mask_gen.set_state(state["mask_gen"])
        torch.set_rng_state(state["torch_rng"])
        if self.recon_head is not None and state.get("recon_head") is not None:
            self.recon_head.load_state_dict(state["recon_head"])
        self.step = int(state["step"])


def latest_checkpoint(out: Path) -> Path | None:
    """Newest ``out/checkpoint-*`` holding a trainer state, or None."""
    done = [p for p in sorted(Path(out).glob("checkpoint-*")) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None
