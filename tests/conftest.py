"""Test set-up: Triton through its CPU interpreter when there is no GPU, and one fresh random seed per session."""

import importlib.util
import os
import random
import sys
from pathlib import Path
from types import ModuleType

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: CI tests the real kernels through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SESSION_SEED = int(os.environ.get("MOE_FASTMASK_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def pytest_report_header(config):
    return f"moe_fastmask random seed: {SESSION_SEED} (set MOE_FASTMASK_TEST_SEED to replay)"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (its sibling scripts importable while it loads)."""
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench_dir))
    return module


@pytest.fixture
def session_seed() -> int:
    """Fresh each run (printed in the header); fixed with MOE_FASTMASK_TEST_SEED to replay a failure."""
    return SESSION_SEED


@pytest.fixture(scope="session")
def sm90_build_cache(tmp_path_factory) -> Path:
    """One build cache for the tests that compile the CUDA library for sm_90 without a device (the forward's and the
    backward's): the first builds it, the next finds it (same sources, compiler and architecture)."""
    return tmp_path_factory.mktemp("sm90_build_cache")


@pytest.fixture(scope="module")
def cuda_kernel():
    """For the CUDA kernels' tests: skip without a CUDA device or nvcc; otherwise their library must build and
    load."""
    from moe_fastmask.ops import cuda_route

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if cuda_route.disabled():
        pytest.skip(f"{cuda_route.DISABLE_ENV} is set")
    if cuda_route.find_nvcc() is None:
        pytest.skip("nvcc not found")
    if not cuda_route.is_available():
        pytest.fail(f"the CUDA kernel did not build or load: {cuda_route.load_error()}")
