"""CLI: ``python -m stllm_engine.training.train --data DIR --init CKPT --out DIR --steps N ...``

``--data`` is a dataset root written by ``stllm_engine.datasets`` (its ``train/`` split is used) or
any MVBench-format directory. Re-running with the same ``--out`` resumes from the newest
checkpoint there.
"""
from __future__ import annotations

import argparse

from stllm_engine.training.masking import MaskingConfig
from stllm_engine.training.trainer import TrainConfig, Trainer


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description="Train ST-LLM (dynamic masking + MVM) on MVBench-format QA")
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True, help="official checkpoint folder to start from")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-input", choices=("all", "mean", "residual"), default=None)
    p.add_argument("--no-mask", action="store_true", help="no dynamic masking (and no MVM)")
    p.add_argument("--no-mvm", action="store_true", help="masking without the MVM loss")
    p.add_argument("--mask-mean", type=float, default=0.5)
    p.add_argument("--mask-std", type=float, default=0.1)
    p.add_argument("--train", default="all",
                   help="comma list of vision,qformer,projector,llm,mvm_decoder, or all")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--limit", type=int, default=None, help="training items per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chat", action="store_true",
                   help="also train chat-format examples (answers in words, the CLI's path)")
    p.add_argument("--recon", type=float, default=0.0,
                   help="weight of the auxiliary frame-reconstruction loss (0 = off; training only)")
    p.add_argument("--recon-grid", type=int, default=8)
    a = p.parse_args(argv)
    return TrainConfig(
        data=a.data, init=a.init, out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
        min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, seed=a.seed, video_input=a.video_input,
        masking=MaskingConfig(enabled=not a.no_mask, mean=a.mask_mean, std=a.mask_std),
        mvm=not a.no_mvm, train=tuple(a.train.split(",")), save_every=a.save_every,
        log_every=a.log_every, tasks=tuple(a.tasks) if a.tasks else None, limit=a.limit,
        device=a.device, chat=a.chat, recon=a.recon, recon_grid=a.recon_grid)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    trainer = Trainer(cfg)
    print(f"training {trainer.n_trainable:,} parameters on {len(trainer.dataset)} examples "
          f"({trainer.model.config.video_input}, masking {'on' if cfg.masking.enabled else 'off'}, "
          f"mvm {'on' if cfg.mvm and cfg.masking.enabled else 'off'}) from step {trainer.step}")
    final = trainer.train()
    print(f"wrote {final}")


if __name__ == "__main__":
    main()
