"""Build stllm_engine._C from csrc/ (pybind11 through torch's C++ extension machinery + ninja).

The CUDA sources (csrc/*.cu) compile only where torch was built with CUDA and a CUDA toolkit is
found; the CPU sources always compile (with OpenMP). ``kernels/`` ships as ``stllm_engine.kernels``.
Build in place for development:  pip install -e . --no-build-isolation
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
with_cuda = bool(cu_sources) and torch.version.cuda is not None and CUDA_HOME is not None \
    and os.environ.get("STLLM_NO_CUDA", "0") != "1"

# -fno-trapping-math lets GCC if-convert float compares/selects, so the element-wise loops
# (exp_approx, clamps) auto-vectorize; nothing in csrc relies on floating-point traps.
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math"]
if with_cuda:
    ext = CUDAExtension(
        "stllm_engine._C", cpp_sources + cu_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DSTLLM_WITH_CUDA"], "nvcc": ["-O3", "-DSTLLM_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("stllm_engine._C", cpp_sources,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

packages = [p for p in find_packages(include=["stllm_engine", "stllm_engine.*"])]
setup(
    name="stllm-engine",
    version="0.1.0",
    description="Low-latency inference engine for ST-LLM video question answering",
    packages=packages + ["stllm_engine.kernels"],
    package_dir={"stllm_engine.kernels": "kernels"},
    package_data={"stllm_engine": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["stllm=stllm_engine.cli:main"]},
)
