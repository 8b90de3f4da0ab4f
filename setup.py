"""Packaging of megatron_mm and its C++/CUDA extension megatron_mm._C.

setup.py imports torch to build the extension against the installed torch, so install
without build isolation (an isolated build would fetch a different torch):
    pip install --no-build-isolation -e .
The C++ kernels (OpenMP) are always built; the CUDA kernels are added when nvcc is on
PATH and torch is a CUDA build.
"""

import glob
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

CSRC = "csrc"


def kernel_extension():
    cpp_sources = sorted(glob.glob(f"{CSRC}/*.cpp"))
    compile_args = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]}
    common = dict(include_dirs=[CSRC], extra_compile_args=compile_args, extra_link_args=["-fopenmp"])
    if shutil.which("nvcc") and torch.version.cuda is not None:
        return CUDAExtension(
            "megatron_mm._C",
            sources=cpp_sources + sorted(glob.glob(f"{CSRC}/*.cu")),
            define_macros=[("MEGATRON_MM_WITH_CUDA", None)],
            **common,
        )
    return CppExtension("megatron_mm._C", sources=cpp_sources, **common)


setup(
    name="megatron_mm",
    version="0.1.0",
    description="Megatron-style multimodal pretraining on megatron-core",
    packages=find_packages(exclude=["tests", "tests.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "tensorboard",
        "pybind11",
        "safetensors",
        "transformers>=5.0,<6",  # the HF conversion reads and writes transformers-5 configs
        "pyyaml",
        "tqdm",
        "matplotlib",
        "psutil",  # megatron-core dist_checkpointing hangs without it
        "einops",
    ],
    extras_require={
        # NVIDIA apex is not on PyPI (the PyPI "apex" is an unrelated project): build it from
        # source when its fused kernels are wanted.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "dev": ["pytest", "pytest-timeout"],
    },
    ext_modules=[kernel_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
