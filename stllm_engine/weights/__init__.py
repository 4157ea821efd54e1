"""Checkpoint key names, loading and writing in the official ST-LLM folder layout."""
from .errors import CheckpointError
from .keys import expected_keys, expected_shapes, is_ignorable
from .loader import Checkpoint, load_checkpoint
from .writer import write_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "expected_keys", "expected_shapes", "is_ignorable",
           "load_checkpoint", "write_checkpoint"]
