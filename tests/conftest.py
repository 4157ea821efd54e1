"""Test-session set-up shared by every test file.

Also the module-scoped ``folders`` fixture: tiny checkpoints of any variant, written once per test
module and size set.

Triton chooses between compiled and interpreted kernels when ``triton`` (and each ``@triton.jit``
function, ``triton.language``'s own included) is first imported, so the interpreter switch must be
set before any test module or library imports it. Without a GPU the kernels can only run
interpreted; set ``STLLM_TEST_TRITON_COMPILED=1`` on a GPU machine to test the compiled kernels:
the test_kernels_triton modules then build their tensors on CUDA (``_triton_device``).

``test_*_cuda.py`` modules run the engine itself on the GPU; they are collected only where CUDA
is available (CI has none), so a CPU run neither runs nor counts them.
"""
import os

COMPILED = os.environ.get("STLLM_TEST_TRITON_COMPILED") == "1"
if not COMPILED and os.environ.get("STLLM_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


collect_ignore_glob = [] if _cuda_available() else ["test_*_cuda.py"]
if COMPILED and not _cuda_available():
    raise pytest.UsageError("STLLM_TEST_TRITON_COMPILED=1 needs a CUDA device")


@pytest.fixture(autouse=True)
def _triton_device(request):
    """Compiled runs: CUDA is the default device inside the Triton kernel test modules."""
    if COMPILED and request.module.__name__.startswith("test_kernels_triton"):
        import torch

        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``folders(vit, video_input, **size_overrides)`` -> a tiny checkpoint folder in the official
    layout (``write_tiny_checkpoint``), written once per module and arguments."""
    from stllm_engine.testing.checkpoints import write_tiny_checkpoint

    cache = {}

    def get(vit, vi, **kw):
        key = (vit, vi, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"{vit}_{vi}"), vit=vit,
                                               video_input=vi, **kw)
        return cache[key]
    return get
