"""The engine's own ST-LLM: fused, packed and paged modules for inference."""
from stllm_engine.model.context import AttentionContext, get_context, reset_context, set_context
from stllm_engine.model.stllm import STLLMModel

__all__ = ["AttentionContext", "STLLMModel", "get_context", "reset_context", "set_context"]
