"""Training ST-LLM: dynamic video-token masking, LM + MVM losses, a resumable trainer."""
from stllm_engine.training.losses import MVMDecoder, lm_loss, mvm_loss
from stllm_engine.training.masking import (MaskingConfig, apply_dynamic_mask, pack_kept,
                                           random_keep_mask, sample_mask_rate)
from stllm_engine.training.trainer import TrainConfig, Trainer, lr_factor

__all__ = ["MVMDecoder", "lm_loss", "mvm_loss", "MaskingConfig", "apply_dynamic_mask", "pack_kept",
           "random_keep_mask", "sample_mask_rate", "TrainConfig", "Trainer", "lr_factor"]
