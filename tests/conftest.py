"""Test set-up: Triton through its CPU interpreter when there is no GPU, and one fresh random seed per session."""

import importlib.util
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: CI tests the real kernels through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import background_builds  # noqa: E402

# Put in the environment so that pytest-xdist's workers, started from this process, collect the same
# seed-dependent cases (and the tests' subprocesses replay with it).
SESSION_SEED = int(os.environ.setdefault("MOE_FASTMASK_TEST_SEED", str(random.SystemRandom().randrange(1 << 30))))


def pytest_report_header(config):
    return f"moe_fastmask random seed: {SESSION_SEED} (set MOE_FASTMASK_TEST_SEED to replay)"


def pytest_configure(config):
    config.addinivalue_line("markers", "prebuild(start): start(), which starts a long build that the test needs on "
                                       "the background worker (tests/background_builds.py), is called once "
                                       "collection ends")


def pytest_collection_finish(session):
    """Start the background builds of the selected tests (in their order; those a ``skipif`` skips need none, nor
    does ``--collect-only``). A start that fails is left to its test, whose own build then meets the same error."""
    if getattr(session.config.option, "collectonly", False):
        return
    started = []
    for item in session.items:
        if any(marker.args and marker.args[0] is True for marker in item.iter_markers("skipif")):
            continue
        for marker in item.iter_markers("prebuild"):
            start = marker.args[0]
            if start not in started:
                started.append(start)
                try:
                    start()
                except Exception:
                    pass


def pytest_unconfigure(config):
    background_builds.stop()
    if _SM90_BUILD_CACHE is not None:
        shutil.rmtree(_SM90_BUILD_CACHE, ignore_errors=True)


_SM90_BUILD_CACHE: Path | None = None


def sm90_build_cache_dir() -> Path:
    """The session's build cache for the CUDA library compiled for sm_90 without a device (created on first use)."""
    global _SM90_BUILD_CACHE
    if _SM90_BUILD_CACHE is None:
        _SM90_BUILD_CACHE = Path(tempfile.mkdtemp(prefix="moe_fastmask_sm90_build_cache_"))
    return _SM90_BUILD_CACHE


def start_sm90_build() -> None:
    """(``prebuild``) Compile the CUDA library for sm_90 into :func:`sm90_build_cache_dir` in the background; the
    tests' own builds there then wait on the build's lock and find it (or, where it failed, build and report)."""
    env = dict(os.environ, MOE_FASTMASK_CACHE_DIR=str(sm90_build_cache_dir()), MOE_FASTMASK_CUDA_ARCH="90")
    code = "from moe_fastmask.ops import cuda_route; cuda_route._build()"
    background_builds.submit(lambda: background_builds.run([sys.executable, "-c", code], timeout=900, env=env))


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
def sm90_build_cache() -> Path:
    """One build cache for the tests that compile the CUDA library for sm_90 without a device (the forward's and the
    backward's): the background build (start_sm90_build) or the first test builds it, the next finds it (same
    sources, compiler and architecture)."""
    return sm90_build_cache_dir()


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
