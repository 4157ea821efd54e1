"""stllm-engine: low-latency inference for ST-LLM video question answering."""
__version__ = "0.1.0"

_LAZY = {"STLLM": "stllm_engine.api", "SamplingParams": "stllm_engine.sampling_params",
         "RequestOutput": "stllm_engine.outputs", "RequestFailedError": "stllm_engine.outputs",
         "LLMEngine": "stllm_engine.engine.llm_engine",
         "EngineConfig": "stllm_engine.engine.llm_engine",
         "AsyncLLMEngine": "stllm_engine.engine.async_engine"}


def __getattr__(name):  # lazy public API: importing the package stays light (no torch)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stllm_engine' has no attribute {name!r}")
