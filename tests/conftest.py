"""Test-session set-up shared by every test file.

Triton chooses between compiled and interpreted kernels when ``triton`` (and each ``@triton.jit``
function, ``triton.language``'s own included) is first imported, so the interpreter switch must be
set before any test module or library imports it. Without a GPU the kernels can only run
interpreted; set ``STLLM_TEST_TRITON_COMPILED=1`` on a GPU machine to test the compiled kernels.
"""
import os

if os.environ.get("STLLM_TEST_TRITON_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
