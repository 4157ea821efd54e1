"""Triton kernels of stllm-engine (shipped as ``stllm_engine.kernels``).

One concept a file, each with a pure-torch twin (same signature) in ``reference``. Import the
launchers from their modules (importing this package imports no triton; Triton decides at import
of a kernel module whether it interprets, so set ``TRITON_INTERPRET=1`` before that on CPU):
  gather_rows.gather_rows / scatter_rows           row gather / scatter (autograd)
  packing.pack_by_mask / unpack / pack_ragged       masked and ragged token packing
  flash_attention.varlen_attention                  fused varlen flash attention forward
  kv_cache.write_kv_cache                           paged KV cache write
  paged_attention.paged_decode_attention            split-K paged decode (also re-exports the two
  paged_prefill.paged_prefill_attention             below) / causal prefill over the paged cache
On CPU the engine dispatches to C++/torch ops instead (``stllm_engine.ops``).
"""
