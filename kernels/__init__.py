"""Triton kernels of stllm-engine (shipped as ``stllm_engine.kernels``).

One concept a file, each with a pure-torch twin. Importing this package does not require a GPU;
on CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests), the engine uses C++/torch ops.
"""
