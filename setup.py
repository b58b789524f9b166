"""Package layout: the Triton kernels live in the top-level ``kernels/`` folder of the source tree but ship
inside the package as ``moe_fastmask.kernels``; a top-level ``kernels`` module must never be importable because
that name belongs to Hugging Face's ``kernels`` package, which transformers probes.

The C++ CPU kernel in ``csrc/`` is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, cached
per torch version and source hash), so installing stays quick and never needs torch inside pip's isolated build
environment (which would pull a CUDA build of torch). ``moe-fastmask build-ext`` compiles it ahead of time. The CUDA
kernels (``csrc/route_cuda.cu``, ``csrc/route_cuda_backward.cu``) are likewise compiled with nvcc on first use on a
CUDA machine.
"""

from setuptools import find_packages, setup

setup(
    # every subpackage of moe_fastmask (generation backends, training, ...) plus the two folders mapped into it
    packages=find_packages(include=["moe_fastmask", "moe_fastmask.*"]) + ["moe_fastmask.kernels", "moe_fastmask.csrc"],
    package_dir={"moe_fastmask": "moe_fastmask", "moe_fastmask.kernels": "kernels", "moe_fastmask.csrc": "csrc"},
    # The C++ and CUDA sources travel with the package so that an installed wheel can still build the kernels.
    package_data={"moe_fastmask.csrc": ["*.cpp", "*.h", "*.cu", "*.cuh"]},
)
