"""stllm-engine: low-latency inference for ST-LLM video question answering."""
__version__ = "0.1.0"
