"""The reference ST-LLM: the release's model assembled from ``transformers`` modules.

It is the correctness oracle (same greedy tokens, close logits) and the speed baseline of the engine.
"""
from .chat import ReferenceGeneration
from .keymap import KeyMappingError, official_to_reference, reference_to_official
from .model import ReferenceSTLLM

__all__ = ["KeyMappingError", "ReferenceGeneration", "ReferenceSTLLM", "official_to_reference",
           "reference_to_official"]
