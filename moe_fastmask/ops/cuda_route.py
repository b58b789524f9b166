"""Loader and wrapper of the CUDA routing kernels (``csrc/route_cuda.cu``, and the backward in
``csrc/route_cuda_backward.cu``).

The kernel files are free of torch headers: they are compiled with ``nvcc`` alone into one shared library exporting
plain C launchers, which this module calls through ``ctypes`` with raw pointers and the caller's CUDA stream (so the
build needs no CUDA-enabled torch headers, and a launch is captured by CUDA graphs like any other on that stream). It is
compiled on first use on a machine with a CUDA device and ``nvcc`` (``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on
``PATH``), for the compute capability of the visible devices (``MOE_FASTMASK_CUDA_ARCH``, e.g. ``"90"`` or
``"90;100"``, overrides it), into a cache folder keyed by a hash of the sources, the flags, the architectures and the
compiler: ``$MOE_FASTMASK_CACHE_DIR`` or ``~/.cache/moe_fastmask/cpp`` (shared with the C++ CPU kernel), then
``cuda-<hash>/``. As for the CPU kernel, a finished build leaves a ``BUILT`` stamp, and builds of one key are
serialised by an ``flock`` that the OS releases when a process dies. The compiler's output (with ``-Xptxas -v``:
registers and spills per kernel) is kept in ``build.log`` there.

The forward covers every router variant of ``route`` for float32 / float16 / bfloat16 logits and ``top_k <= 16``: the
softmax routers (``"softmax"``, optional renormalisation, and ``"softmax_chosen"``, run as the softmax renormalised
over the chosen experts; any ``scale``) with ``E <= 512`` (256 for float32), and the ``"sigmoid"`` router (a selection
bias, DeepSeek-V3's group limit, renormalisation, a scale) with ``E <= 256``; :func:`supports` says whether it takes a
call, and ``route``'s ``cuda`` backend sends the others to Triton. The backward (:func:`route_backward`, the gradient
of the weights with respect to the logits) covers the softmax routers (over the allowed experts, renormalised or not,
or over the chosen ones) and the sigmoid router, any scale, in the same dtypes with ``E <= 512``, and a keep mask of
any size (:func:`supports_backward`); the rest runs on Triton.
``MOE_FASTMASK_DISABLE_CUDA=1`` makes :func:`is_available` return False, so ``route(backend="auto")`` uses Triton on
CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from moe_fastmask.ops.reference import grad_logits_buffer, kernel_num_groups, output_buffers

from moe_fastmask.ops import cpp_route

SOURCE_NAME = "route_cuda.cu"
BACKWARD_SOURCE_NAME = "route_cuda_backward.cu"  # built into the same library
LIBRARY_NAME = "moe_fastmask_cuda"
DISABLE_ENV = "MOE_FASTMASK_DISABLE_CUDA"
ARCH_ENV = "MOE_FASTMASK_CUDA_ARCH"
# "1": the split kernel's instance with software prefetch of a warp's next rows; off by default (measured slower on an
# H200: 45.6 vs 43.8 us at T=262,144, E=64; benchmarks/RESULTS.md)
PREFETCH_ENV = "MOE_FASTMASK_CUDA_PREFETCH"
# "0" launches the kernels plainly; by default (on GPUs of compute capability 9.0 and later) each is a programmatic
# dependent launch, so that its blocks start while the kernel before it ends (csrc/route_lane16.cuh)
DEPENDENT_LAUNCH_ENV = "MOE_FASTMASK_CUDA_PDL"
VARIANT_ENV = "MOE_FASTMASK_CUDA_VARIANT"  # "lane" (default where it applies), "split" or "chunk" (see VARIANTS)
# "split": a row spread over several lanes of a warp (every covered call); "lane": a row per lane, for 16-bit logits
# with E in LANE_EXPERTS and contiguous, 16-byte aligned rows, or E a multiple of 4 below one of them and 8-byte
# aligned rows (padded, with the padding masked), top_k <= 8 (other calls run "split", and so do, by default, calls
# under LANE_MIN_TOKENS: see default_variant)
# "chunk": a row over 4 lanes in columns of 32 experts, for the calls chunk_takes accepts: the sigmoid router (E a
# multiple of 32 up to 512 in every dtype, top_k <= 8, groups of whole columns; the default for them from
# CHUNK_MIN_TOKENS rows on, 1.5-1.9x the split kernel's speed at T = 262,144: benchmarks/RESULTS.md, twenty-second
# round; other sigmoid calls run "split", E <= 256) and the softmax routers of 16-bit logits (top_k <= 16; the default
# from CHUNK_SOFTMAX_MIN_EXPERTS experts and CHUNK_MIN_TOKENS rows on)
VARIANTS = {"split": 0, "lane": 1, "chunk": 2}
# the backward's kernels: "lane" (one row per lane where it applies: 16-bit logits, E 32 / 64, k = 8, aligned rows;
# else the other) or "split" (a row over several lanes, every call; the sigmoid router: see route_backward)
BACKWARD_VARIANTS = {"lane": 0, "split": 1}
# benchmarking only: the backward's lane kernel (bf16, E=64, a keep mask, one-byte ids) with its math removed, by name:
# "load_store" copies each tile's logits, ids and grads in and writes the logits back out as the gradient (the result
# equals the logits): the kernel's memory floor (the launcher's variant code)
BACKWARD_ABLATIONS = {"load_store": 2}
LANE_EXPERTS = (32, 64, 128)
LANE_BACKWARD_EXPERTS = (32, 64)  # E of the backward's lane kernel (top_k == 8; see BACKWARD_VARIANTS)
LANE_MAX_TOP_K = 8
LANE_MAX_EXTRA_BYTES = 16 * 1024  # the lane kernel's limit on its shared mask table (see _lane_mask_bytes)
LANE_MAX_ROW_STRIDE = 1 << 26  # the lane kernel's largest row stride in elements (its copy step is a 32-bit byte count)
# The default variant's size rule (default_variant): calls with E = 128 and fewer rows than this run "split", which is
# the faster there: a warp of the lane kernel works a 128-expert row's 16 chunks alone, and few tiles leave the SMs
# little to hide that with (H200, bf16 top-8, us: split 3.46 / 3.71 / 4.85 / 4.90 against lane 4.97 / 5.10 / 5.34 /
# 5.45 at T = 2,048 / 4,096 / 6,144 / 8,192; lane 6.12 against 6.82 at 12,288 and 6.05 against 7.74 at 16,384;
# benchmarks/RESULTS.md, fourteenth round). At E = 32 and 64 the lane kernel is the faster at every size.
LANE_MIN_TOKENS = {128: 10240}
# benchmarking only: lane-kernel instances (bf16, E=64) with parts of the work removed, by name. The first four take
# the top-k by the sorting network (the op's at small T); the "_tournament" ones take it by the tournament, as the op
# does at large T (top_k == 8 only), so that each step's cost is the op's
LANE_ABLATIONS = {"load_store": 1, "topk": 2, "mask_topk": 3, "mask_topk_softmax": 4,
                  "topk_tournament": 5, "mask_topk_tournament": 6, "mask_topk_softmax_tournament": 7}
# benchmarking only: the lane kernel's option bits (bf16, E=64, with a keep mask): "topk8" drops the run-time top_k
# tests (top_k == 8), "one_stage" gives each warp one tile buffer instead of two (twice the warps per multiprocessor),
# "stage_ids" writes a warp's ids through shared memory as whole lines (see csrc/route_cuda.cu; the op does, so an option
# set without it times the direct stores), "packed16" takes the
# top-k on two 16-bit keys per register where a row's top 8 fit a window below its largest logit (the op uses one
# 32-bit key per register), "two_pass_softmax" sums the softmax denominator in a second pass over the row (the op sums
# it in the top-k's pass), "sm_block" runs one block of 24 warps per multiprocessor (192 KB of tiles) whose warps issue
# their second copies only once every warp's first tile has landed (the op runs six blocks of 4 warps; 15% slower,
# benchmarks/RESULTS.md, eighth round), "tournament" takes the 32-bit keys' top 8 by a tournament over the chunks of 8
# experts instead of the sorting network (two tile buffers a warp only); with the "load_store" ablation, "one_stage",
# "stage_ids" and "sm_block" apply
LANE_OPTIONS = {"topk8": 16, "one_stage": 32, "stage_ids": 64, "packed16": 128, "two_pass_softmax": 256,
                "sm_block": 1 << 13, "tournament": 1 << 14}
# options of the full kernel only (no ablation), and the pairs that do not combine
LANE_FULL_KERNEL_OPTIONS = ("packed16", "two_pass_softmax", "tournament")
LANE_EXCLUSIVE_OPTIONS = (("packed16", "two_pass_softmax"), ("one_stage", "sm_block"), ("tournament", "packed16"),
                          ("tournament", "two_pass_softmax"), ("tournament", "one_stage"), ("tournament", "sm_block"))
# benchmarking only: the option bit of the lane kernel's timeline instance (csrc/route_cuda.cu's kTimeline; the op's
# bf16 E=64 top-8 instance writing per-warp stamps), which route_forward's _timeline selects
LANE_TIMELINE_BIT = 1 << 12
# how the lane kernel sizes its grid: one full wave of blocks ("wave"), or warps with equal shares of tiles
# ("balanced"; "balanced2", the default: at least two tiles a warp where there are enough, so that a warp copies its
# next tile while it works on one; measured 5-7% faster than "wave" at T = 65,536 and 131,072 and the same at 32,768
# and 262,144, benchmarks/RESULTS.md, twelfth round)
GRID_POLICIES = {"wave": 0, "balanced": 1, "balanced2": 2}
DEFAULT_GRID_POLICY = "balanced2"
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo")
MAX_EXPERTS = 512  # 16-bit logits (a row over one warp's 32 lanes, 16 each)
MAX_EXPERTS_FLOAT32 = 256
MAX_SIGMOID_EXPERTS = 256  # the split kernel's sigmoid router (8 experts a lane whatever the dtype: 64-bit keys)
CHUNK_MAX_EXPERTS = 512  # the chunk kernel (chunk_takes), every dtype
CHUNK_MAX_TOP_K = 8  # its sigmoid router
CHUNK_SOFTMAX_MAX_TOP_K = 16  # its softmax routers (16-bit logits)
# The default variant's rule for the softmax routers (forward_variant): "chunk" from this many experts on (and
# CHUNK_MIN_TOKENS rows), past the lane kernel's widest rows (128), where the split kernel ran them (H200, bf16, the op
# with mask, group ids and counts, us, chunk / split: E = 160 top-8 23.5 / 52.8 and 192 26.6 / 53.2 at T = 65,536;
# 256 top-8 8.2 / 8.8 at 8,192 and 32.8 / 41.7 at 65,536; Qwen3-Next's 512 top-10 266.6 / 342.3 at 262,144; at 128
# the lane kernel stays: benchmarks/RESULTS.md, twenty-third round)
CHUNK_SOFTMAX_MIN_EXPERTS = 160
# The default variant's size rule for the sigmoid router (forward_variant): calls with fewer rows than this that the
# split kernel takes run "split", which is the faster there: the chunk kernel gives a warp 8 rows, and few rows leave
# the SMs few warps to hide a row's chain of column loads with (H200, us, chunk / split: DeepSeek-V3's router 17.5 /
# 9.6 at T = 4,096, 18.2 / 16.3 at 8,192, 22.9 / 29.5 at 16,384; GLM-4.5's 10.1 / 8.4, 11.1 / 13.7, 15.2 / 24.7;
# benchmarks/RESULTS.md, twenty-second round)
CHUNK_MIN_TOKENS = 8192
# the kernels' scoring codes (csrc/route_cuda.cu, RouteParams.scoring): softmax over the chosen experts runs as the
# softmax renormalised over them
SCORING_CODES = {"softmax": 0, "softmax_chosen": 0, "sigmoid": 1}
MAX_BACKWARD_EXPERTS = 512  # (from 257 experts a row over a whole warp, 16 experts a lane)
MAX_TOP_K = 16
MAX_KEEP_BYTES = 16 * 1024  # the kernel keeps the mask as bits in shared memory: G * max(1, E_PAD / 32) * 4 bytes
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STAMP = "BUILT"
_BUILD_TIMEOUT_S = 900


class RouteParams(ctypes.Structure):
    """The kernel's ``RouteParams`` (csrc/route_cuda.cu), field for field."""

    _fields_ = [
        ("weights", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("keep", ctypes.c_void_p),
        ("group", ctypes.c_void_p),
        ("ids8", ctypes.c_void_p),
        ("stride_t", ctypes.c_int64),
        ("stride_e", ctypes.c_int64),
        ("num_tokens", ctypes.c_int64),
        ("num_experts", ctypes.c_int32),
        ("num_groups", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("group_is_int64", ctypes.c_int32),
        ("vector_loads", ctypes.c_int32),
        ("shared_hist", ctypes.c_int32),
        ("prefetch", ctypes.c_int32),
        ("variant", ctypes.c_int32),
        ("ablation", ctypes.c_int32),
        ("grid_policy", ctypes.c_int32),
        ("lane_options", ctypes.c_int32),
        ("dependent_launch", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("scoring", ctypes.c_int32),
        ("n_group", ctypes.c_int32),
        ("topk_group", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
        ("chosen_logits", ctypes.c_void_p),
    ]


class RouteBackwardParams(ctypes.Structure):
    """The backward kernel's ``RouteBackwardParams`` (csrc/route_cuda_backward.cu), field for field."""

    _fields_ = [
        ("grad_logits", ctypes.c_void_p),
        ("grad_weights", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("ids8", ctypes.c_void_p),
        ("keep", ctypes.c_void_p),
        ("group", ctypes.c_void_p),
        ("stride_t", ctypes.c_int64),
        ("stride_e", ctypes.c_int64),
        ("num_tokens", ctypes.c_int64),
        ("num_experts", ctypes.c_int32),
        ("num_groups", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("group_is_int64", ctypes.c_int32),
        ("variant", ctypes.c_int32),
        ("dependent_launch", ctypes.c_int32),
        ("scoring", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("chosen_logits", ctypes.c_void_p),
    ]


# --------------------------------------------------------------------------------------------------------------
# Locating, building and loading
# --------------------------------------------------------------------------------------------------------------


def disabled() -> bool:
    """True when ``MOE_FASTMASK_DISABLE_CUDA`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def source_path() -> Path:
    """``<repo>/csrc/route_cuda.cu`` in a source checkout, ``moe_fastmask/csrc/route_cuda.cu`` when installed."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir.parent / "csrc", package_dir / "csrc"):
        if (candidate / SOURCE_NAME).is_file():
            return candidate / SOURCE_NAME
    raise FileNotFoundError(f"CUDA source {SOURCE_NAME} not found next to {package_dir}")


def backward_source_path(source: Path | None = None) -> Path:
    """The backward kernel's source: ``route_cuda_backward.cu`` next to ``source`` (default: :func:`source_path`)."""
    return (source_path() if source is None else source).with_name(BACKWARD_SOURCE_NAME)


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (torch's idea of ``CUDA_HOME``), else ``nvcc`` on ``PATH``; None when neither exists."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    with contextlib.suppress(Exception):
        from torch.utils import cpp_extension

        homes.append(cpp_extension.CUDA_HOME)
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def target_archs() -> tuple[str, ...]:
    """Compute capabilities to compile for, as ``"90"``-style strings: ``$MOE_FASTMASK_CUDA_ARCH`` (``;`` or ``,``
    separated), else those of the visible CUDA devices."""
    override = os.environ.get(ARCH_ENV, "").replace(",", ";").replace(".", "")
    if override.strip():
        return tuple(sorted({a.strip() for a in override.split(";") if a.strip()}))
    if not torch.cuda.is_available():
        return ()
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return tuple(sorted(f"{major}{minor}" for major, minor in caps))


@functools.lru_cache(maxsize=None)
def nvcc_splits_compilation(nvcc: str) -> bool:
    """Whether ``nvcc`` takes ``--split-compile`` (CUDA 12 on), which spreads the optimisation of the library's
    kernels over every core: the build takes a fraction of its time on one core (the register use of every kernel
    unchanged)."""
    try:
        done = subprocess.run([nvcc, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "--split-compile" in done.stdout


def nvcc_command(nvcc: str, source: Path, output: Path, archs: tuple[str, ...]) -> list[str]:
    """The compiler command line of the library: the backward's source (next to ``source``), then ``source``; the
    compilation split over every core where ``nvcc`` can (nvcc_splits_compilation)."""
    gencode = []
    for arch in archs:
        # "90a"-style targets keep their suffix in code=sm_90a and arch=compute_90a
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    split = ["--split-compile", "0"] if nvcc_splits_compilation(nvcc) else []
    return [nvcc, *NVCC_FLAGS, *split, *gencode, "-o", str(output), str(backward_source_path(source)), str(source)]


def build_key(source: Path, nvcc: str, archs: tuple[str, ...]) -> str:
    """Cache key: a hash of the sources (``source``, the backward's and the ``.cuh`` headers next to it), the flags,
    the architectures and the compiler's path."""
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(backward_source_path(source).read_bytes())
    for header in sorted(source.parent.glob("*.cuh")):
        digest.update(header.name.encode())
        digest.update(header.read_bytes())
    digest.update(repr((NVCC_FLAGS, archs, nvcc)).encode())
    return f"cuda-{digest.hexdigest()[:16]}"


def _library_path(directory: Path) -> Path:
    return directory / f"{LIBRARY_NAME}.so"


def _built(directory: Path) -> bool:
    return (directory / _STAMP).is_file() and _library_path(directory).is_file()


def _compile(directory: Path, nvcc: str, source: Path, archs: tuple[str, ...]) -> None:
    """Compile into ``directory`` (the caller holds the lock); the compiler's output goes to ``build.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{LIBRARY_NAME}.tmp{os.getpid()}.so"
    command = nvcc_command(nvcc, source, partial, archs)
    done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    log = f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"
    (directory / "build.log").write_text(log)
    if done.returncode != 0:
        tail = log if len(log) < 3000 else log[:1000] + "\n...\n" + log[-2000:]
        raise RuntimeError(f"nvcc failed (exit {done.returncode}):\n{tail}")
    os.replace(partial, _library_path(directory))
    stamp = directory / f"{_STAMP}.tmp{os.getpid()}"
    stamp.write_text(f"{nvcc}\n{source}\n{';'.join(archs)}\n")
    os.replace(stamp, directory / _STAMP)


def build_dir() -> Path:
    """Folder the library of the current source, compiler and architectures is (or will be) built in."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return cpp_route.cache_root() / build_key(source_path(), nvcc, target_archs())


def _build() -> Path:
    """Path of the library of the current source, compiling it first unless a finished build is cached."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = target_archs()
    if not archs:
        raise RuntimeError(f"no CUDA device to compile for (set {ARCH_ENV}, e.g. 90, to build without one)")
    source = source_path()
    directory = cpp_route.cache_root() / build_key(source, nvcc, archs)
    if not _built(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with cpp_route._build_lock(directory.parent / f"{directory.name}.lock"):
            if not _built(directory):
                _compile(directory, nvcc, source, archs)
    return _library_path(directory)


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.moe_fastmask_route_cuda_forward.argtypes = [
        ctypes.POINTER(RouteParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    lib.moe_fastmask_route_cuda_forward.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_preload.argtypes = [ctypes.c_int]
    lib.moe_fastmask_route_cuda_preload.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_backward.argtypes = [
        ctypes.POINTER(RouteBackwardParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    lib.moe_fastmask_route_cuda_backward.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_backward_preload.argtypes = [ctypes.c_int]
    lib.moe_fastmask_route_cuda_backward_preload.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_backward_params_size.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_set_timeline.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.moe_fastmask_route_cuda_set_timeline.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_timeline_slots.restype = ctypes.c_int
    lib.moe_fastmask_route_cuda_error_string.argtypes = [ctypes.c_int]
    lib.moe_fastmask_route_cuda_error_string.restype = ctypes.c_char_p
    for name in ("max_experts", "max_top_k", "max_keep_bytes", "params_size"):
        getattr(lib, f"moe_fastmask_route_cuda_{name}").restype = ctypes.c_int
    limits = (
        lib.moe_fastmask_route_cuda_max_experts(), lib.moe_fastmask_route_cuda_max_top_k(),
        lib.moe_fastmask_route_cuda_max_keep_bytes(), lib.moe_fastmask_route_cuda_params_size(),
    )
    expected = (MAX_EXPERTS, MAX_TOP_K, MAX_KEEP_BYTES, ctypes.sizeof(RouteParams))
    if limits != expected:
        raise RuntimeError(
            f"the CUDA library's limits / parameter layout {limits} differ from this module's {expected}"
        )
    backward_size = lib.moe_fastmask_route_cuda_backward_params_size()
    if backward_size != ctypes.sizeof(RouteBackwardParams):
        raise RuntimeError(
            f"the CUDA library's backward parameter layout ({backward_size} bytes) differs from this module's "
            f"({ctypes.sizeof(RouteBackwardParams)} bytes)"
        )
    return lib


def _preload(lib: ctypes.CDLL, device: int) -> None:
    """Load the kernels onto ``device`` now rather than at their first launch (which may be inside a graph capture)."""
    if device in _PRELOADED:
        return
    code = lib.moe_fastmask_route_cuda_preload(device)
    if code == 0:
        code = lib.moe_fastmask_route_cuda_backward_preload(device)
    if code != 0:
        message = lib.moe_fastmask_route_cuda_error_string(code).decode(errors="replace")
        raise RuntimeError(f"loading the CUDA routing kernels onto device {device} failed: {message}")
    _PRELOADED.add(device)


_PRELOADED: set[int] = set()


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """Build (if needed) and load once per process; returns (library or None, error message, library path)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False)", ""
    if torch.version.cuda is None:
        return None, "this torch build has no CUDA support", ""
    try:
        path = _build()
        lib = _bind(path)
        _preload(lib, torch.cuda.current_device())
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
        message = str(exc).strip()
        if len(message) > 3000:
            message = message[:1000] + "\n...\n" + message[-2000:]
        if find_nvcc() is not None and not disabled():
            # a compiler is there but the build or load failed: say so once (no compiler is the quiet, common case)
            warnings.warn(
                f"moe_fastmask: the CUDA routing kernel is not available ({type(exc).__name__}: {message[:400]}); "
                "route uses Triton on CUDA",
                RuntimeWarning,
                stacklevel=2,
            )
        return None, f"{type(exc).__name__}: {message}", ""
    return lib, "", str(path)


# torch.compile calls these once while tracing (they build, load and read the environment) and keeps the result.
@torch.compiler.assume_constant_result
def is_available() -> bool:
    """True when the CUDA kernel is (or can be) built and loaded, and ``MOE_FASTMASK_DISABLE_CUDA`` is not set.

    False on machines without a CUDA device or ``nvcc``, and on CPU builds of torch (without trying to compile).
    """
    if disabled():
        return False
    return _load()[0] is not None


@torch.compiler.assume_constant_result
def load_error() -> str:
    """Why :func:`is_available` is False (``""`` when it is True)."""
    if disabled():
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    return _load()[1]


def build() -> str:
    """Build the library ahead of time (nothing to do when cached) and load it; returns the library's path.

    Works with ``MOE_FASTMASK_DISABLE_CUDA`` set too (that only stops :func:`is_available` from using the kernel).
    """
    lib, error, path = _load()
    if lib is None:
        raise RuntimeError(f"building the CUDA routing kernel failed: {error}")
    return path


def build_log() -> str:
    """The compiler output of the loaded library's build (``-Xptxas -v``: registers and spills per kernel)."""
    path = build()
    log = Path(path).parent / "build.log"
    return log.read_text() if log.is_file() else ""


# --------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _prefetch_default() -> bool:
    return os.environ.get(PREFETCH_ENV, "0") not in ("", "0")


_dependent_launch_override: list[bool] = []  # innermost dependent_launches() setting last


@functools.cache
def _dependent_launch_env() -> bool:
    value = os.environ.get(DEPENDENT_LAUNCH_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{DEPENDENT_LAUNCH_ENV}={value!r}: expected 0 or 1")
    return value == "1"


def dependent_launch_default() -> bool:
    """Whether the kernels go out as programmatic dependent launches: the innermost :func:`dependent_launches`
    setting, else ``DEPENDENT_LAUNCH_ENV`` (read once; default on). The launchers use it only on GPUs that have it
    (compute capability 9.0 and later)."""
    return _dependent_launch_override[-1] if _dependent_launch_override else _dependent_launch_env()


def _dependent_launch_flag(dependent_launch: bool | None) -> int:
    """A params struct's dependent_launch field: ``dependent_launch``, or where it is None
    :func:`dependent_launch_default`."""
    return int(dependent_launch_default() if dependent_launch is None else bool(dependent_launch))


@contextlib.contextmanager
def dependent_launches(enabled: bool) -> Iterator[None]:
    """Within the block, the CUDA kernels are launched as programmatic dependent launches (``enabled``) or plainly,
    whatever ``DEPENDENT_LAUNCH_ENV`` says (for comparing the two in one process; the setting is process-wide, not per
    thread; under CUDA-graph capture the setting at capture time is the one the graph keeps)."""
    _dependent_launch_override.append(bool(enabled))
    try:
        yield
    finally:
        _dependent_launch_override.pop()


@functools.cache
def _variant_default() -> str:
    name = os.environ.get(VARIANT_ENV, "").strip() or "lane"
    if name not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV}={name!r}: expected one of {sorted(VARIANTS)}")
    return name


def _vector_rows(logits: Tensor) -> bool:
    """Rows of exactly a power-of-two number of experts, contiguous and 16-byte aligned (16-byte vector loads)."""
    num_experts = logits.shape[1]
    return (
        num_experts == _padded_experts(num_experts)
        and logits.stride(1) == 1
        and (logits.stride(0) * logits.element_size()) % 16 == 0
        and logits.data_ptr() % 16 == 0
    )


def _padded_rows(logits: Tensor) -> bool:
    """16-bit rows that the lane kernel takes padded to E_PAD: E a multiple of 4 (8-byte copies) below a power of two
    in ``LANE_EXPERTS``, contiguous and 8-byte aligned (Qwen2-MoE's 60 experts, say)."""
    num_experts = logits.shape[1]
    return (
        logits.element_size() == 2
        and num_experts % 4 == 0
        and num_experts != _padded_experts(num_experts)
        and _padded_experts(num_experts) in LANE_EXPERTS
        and logits.stride(1) == 1
        and (logits.stride(0) * logits.element_size()) % 8 == 0
        and logits.data_ptr() % 8 == 0
    )


def _row_layout(logits: Tensor) -> int:
    """The launcher's ``vector_loads`` code: 1 vector rows (:func:`_vector_rows`), 2 padded rows
    (:func:`_padded_rows`), 0 neither."""
    return 1 if _vector_rows(logits) else 2 if _padded_rows(logits) else 0


def default_variant(logits: Tensor) -> str:
    """The kernel variant that a call without an explicit ``variant`` runs: ``$MOE_FASTMASK_CUDA_VARIANT``, else
    ``"lane"``, except that the default ``"lane"`` hands calls under its size (``LANE_MIN_TOKENS``, by E) to
    ``"split"``. (The lane variant also hands every call that :func:`lane_takes` refuses to ``"split"``.)"""
    name = _variant_default()
    if name == "lane" and logits.dim() == 2 and logits.shape[0] < LANE_MIN_TOKENS.get(logits.shape[1], 0):
        return "split"
    return name


def scale_in_range(scale: float) -> bool:
    """Whether the kernels take ``scale``: finite as a float32 (they receive it as one, and refuse an infinite one)."""
    return math.isfinite(float(scale)) and abs(float(scale)) <= torch.finfo(torch.float32).max


def default_router(scoring: str, scale: float) -> bool:
    """Whether the router variant is the default one (softmax, scale 1): the one the lane backward, the one-byte ids
    and the benchmark-only instances take."""
    return scoring == "softmax" and float(scale) == 1.0


def chunk_takes(num_experts: int, top_k: int, *, scoring: str = "softmax", n_group: int = 1,
                dtype: torch.dtype | None = None) -> bool:
    """Whether the ``"chunk"`` variant takes a call with ``num_experts`` experts: E a multiple of 32 up to
    ``CHUNK_MAX_EXPERTS``, and either the sigmoid router with ``top_k <= 8`` and no group limit or groups of whole
    32-expert columns (``E / n_group`` a multiple of 32, as DeepSeek-V3's 8 groups of 32), in every dtype; or a softmax
    router (``softmax``, ``softmax_chosen``, any scale) of float16 / bfloat16 logits (``dtype``) with
    ``top_k <= CHUNK_SOFTMAX_MAX_TOP_K`` and no group limit."""
    if num_experts % 32 or not 32 <= num_experts <= CHUNK_MAX_EXPERTS or top_k < 1 or n_group < 1:
        return False
    if scoring == "sigmoid":
        return top_k <= CHUNK_MAX_TOP_K and (
            n_group == 1 or (num_experts % n_group == 0 and (num_experts // n_group) % 32 == 0)
        )
    return (
        scoring in ("softmax", "softmax_chosen")
        and dtype in (torch.float16, torch.bfloat16)
        and top_k <= CHUNK_SOFTMAX_MAX_TOP_K
        and n_group == 1
    )


def forward_variant(logits: Tensor, top_k: int, variant: str | None = None, *, scoring: str = "softmax",
                    n_group: int = 1) -> str:
    """The kernel variant (``VARIANTS``) that :func:`route_forward` runs for ``variant`` (None: the default).

    For the sigmoid router's calls that :func:`chunk_takes` accepts, ``"chunk"``, except where the split kernel also
    takes the call (E <= 256) and ``$MOE_FASTMASK_CUDA_VARIANT`` is ``"split"``, or the call has fewer than
    ``CHUNK_MIN_TOKENS`` rows and that variable is not ``"chunk"``. For the softmax routers' calls that chunk_takes
    accepts, ``"chunk"`` where that variable is ``"chunk"``, or, unless it is ``"split"``, from
    ``CHUNK_SOFTMAX_MIN_EXPERTS`` experts and ``CHUNK_MIN_TOKENS`` rows on. For the others :func:`default_variant`
    (``"lane"`` where that names ``"chunk"``). An explicit ``"chunk"`` must be a call chunk_takes accepts
    (ValueError)."""
    num_tokens, num_experts = logits.shape
    chunk = chunk_takes(num_experts, top_k, scoring=scoring, n_group=n_group, dtype=logits.dtype)
    if variant is None:
        name = _variant_default()
        if chunk:
            split_cannot = scoring == "sigmoid" and num_experts > MAX_SIGMOID_EXPERTS
            wide = scoring == "sigmoid" or num_experts >= CHUNK_SOFTMAX_MIN_EXPERTS
            if split_cannot or name == "chunk" or (name != "split" and wide and num_tokens >= CHUNK_MIN_TOKENS):
                return "chunk"
        variant = default_variant(logits)
        return "lane" if variant == "chunk" else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if variant == "chunk" and not chunk:
        raise ValueError("variant 'chunk' takes E a multiple of 32 up to "
                         f"{CHUNK_MAX_EXPERTS}: the sigmoid router with top_k <= {CHUNK_MAX_TOP_K} and groups of "
                         "whole 32-expert columns, or a softmax router of float16 / bfloat16 logits with top_k <= "
                         f"{CHUNK_SOFTMAX_MAX_TOP_K} (chunk_takes), got scoring={scoring!r}, E={num_experts}, "
                         f"top_k={top_k}, n_group={n_group}, {logits.dtype}")
    if variant != "chunk" and scoring == "sigmoid" and num_experts > MAX_SIGMOID_EXPERTS:
        raise ValueError(f"variant {variant!r} runs the sigmoid router on the split kernel, which takes up to "
                         f"{MAX_SIGMOID_EXPERTS} experts, got E={num_experts} (variant 'chunk' takes it where "
                         "chunk_takes accepts the call)")
    return variant


def lane_takes(logits: Tensor, top_k: int, keep: Tensor | None = None, *, scoring: str = "softmax") -> bool:
    """Whether the ``"lane"`` variant runs this call (a call :func:`supports`; otherwise ``"split"`` runs it): the
    softmax routers only."""
    if scoring == "sigmoid":
        return False
    num_experts = logits.shape[1]
    if logits.dtype not in (torch.float16, torch.bfloat16) or _padded_experts(num_experts) not in LANE_EXPERTS:
        return False
    if top_k > LANE_MAX_TOP_K or _row_layout(logits) == 0:
        return False
    if logits.stride(0) > LANE_MAX_ROW_STRIDE:
        return False
    # (padded rows always have the mask table: the launcher's G is keep's rows, else counts', else none)
    return keep is None or _lane_mask_bytes(keep.shape[0], _padded_experts(num_experts), False) <= LANE_MAX_EXTRA_BYTES


def compact_ids_apply(logits: Tensor, top_k: int, keep: Tensor | None = None) -> bool:
    """Whether a training call's forward should also write the ids a byte each (``route_forward(ids8=...)``) for the
    backward's lane kernel, which reads them instead of the int64 ids (56 fewer bytes per row): the lane variant by
    default, 16-bit logits with E in ``LANE_BACKWARD_EXPERTS``, ``top_k == 8``, a call the lane forward takes."""
    return (
        default_variant(logits) == "lane"
        and top_k == LANE_MAX_TOP_K
        and logits.shape[1] in LANE_BACKWARD_EXPERTS
        and lane_takes(logits, top_k, keep)
    )


def _lane_mask_bytes(num_groups: int, num_experts: int, packed: bool) -> int:
    """Shared bytes of the lane kernel's mask table for G groups (a row more: nothing masked), with the packed
    top-k's keep words (``"packed16"``) when ``packed``; the kernel's ``lane_smem_bytes`` computes the same."""
    units = num_experts // 4 + 1 + (num_experts // 8 + 1 if packed else 0)
    return (num_groups + 1) * units * 16


def lane_option_bits(names) -> int:
    """The launcher's ``lane_options`` code of option names from ``LANE_OPTIONS`` (bit 0: options given)."""
    return 1 | sum(LANE_OPTIONS[name] for name in set(names))


def timeline_option_bits(names=None) -> int:
    """The ``lane_options`` code of the timeline instance: the op's instance (top_k == 8, ids staged) with the
    option names ``names`` (none, or ``("sm_block",)``) and the stamps."""
    return lane_option_bits(("topk8", "stage_ids") + tuple(names or ())) | LANE_TIMELINE_BIT


def _padded_experts(num_experts: int) -> int:
    return max(8, 1 << (num_experts - 1).bit_length())


def supports(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None = None,
    *,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> bool:
    """Whether the CUDA kernel takes this call (shapes and variant only; :func:`is_available` is separate): CUDA
    float32 / float16 / bfloat16 logits with ``E <= 512`` (float32: 256), ``top_k <= 16`` and a keep mask of at most
    16 KiB as bits; every router variant (``softmax``, ``softmax_chosen``, any ``scale`` finite as a float32;
    ``sigmoid`` with or without a bias and a group limit, ``E <= 256``, or any call :func:`chunk_takes` accepts,
    float32 included)."""
    if logits.device.type != "cuda" or logits.dtype not in DTYPE_CODES or logits.dim() != 2:
        return False
    if not scale_in_range(scale):
        return False
    if scoring not in SCORING_CODES or (scoring != "sigmoid" and (bias is not None or n_group != 1)):
        return False
    if bias is not None and (bias.device != logits.device or bias.dim() != 1 or bias.shape[0] != logits.shape[1]):
        return False
    num_experts = logits.shape[1]
    max_experts = MAX_EXPERTS_FLOAT32 if logits.dtype == torch.float32 else MAX_EXPERTS
    if scoring == "sigmoid":
        max_experts = min(max_experts, MAX_SIGMOID_EXPERTS)
        if chunk_takes(num_experts, top_k, scoring=scoring, n_group=n_group, dtype=logits.dtype):
            max_experts = CHUNK_MAX_EXPERTS
    if not 1 <= num_experts <= max_experts or not 1 <= top_k <= min(MAX_TOP_K, num_experts):
        return False
    if keep is not None and keep.shape[0] * max(1, _padded_experts(num_experts) // 32) * 4 > MAX_KEEP_BYTES:
        return False
    return True


def route_forward(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    prefetch: bool | None = None,
    variant: str | None = None,
    _ablation: str | None = None,
    _grid_policy: str = DEFAULT_GRID_POLICY,
    _lane_options: tuple[str, ...] | None = None,
    ids8: Tensor | None = None,
    _timeline: Tensor | None = None,
    dependent_launch: bool | None = None,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    chosen_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused forward of ``route`` on the CUDA kernel (arguments validated by ``check_route_args``, the call one that
    :func:`supports` accepts; ``keep`` and ``group`` contiguous). Returns ``weights`` [T, top_k] in ``logits.dtype``
    and ``ids`` [T, top_k] int64, both contiguous, and adds the chosen experts to ``counts`` in place.
    ``out=(weights, ids)`` writes into given contiguous tensors instead of new ones. ``prefetch`` (default: off, unless
    ``MOE_FASTMASK_CUDA_PREFETCH=1``) picks the kernel instance that loads a warp's next rows early. ``variant``
    (default: :func:`forward_variant`'s choice: ``"chunk"`` for the sigmoid router's calls that :func:`chunk_takes`
    accepts from ``CHUNK_MIN_TOKENS`` rows on, else :func:`default_variant`: ``$MOE_FASTMASK_CUDA_VARIANT``, else
    ``"lane"``, which runs where it applies and is not slower, and hands other calls to ``"split"``) picks the kernel,
    see ``VARIANTS``. ``_ablation``
    (benchmarking only, bf16 logits with E=64 that the lane variant takes) runs a lane-kernel instance with parts of
    the work removed (``LANE_ABLATIONS``): its results are not the op's. ``_grid_policy`` (``GRID_POLICIES``) and
    ``_lane_options`` (names from ``LANE_OPTIONS``; bf16 logits with E=64 and a keep mask) pick the lane kernel's
    grid and option bits, for benchmarking the choices the defaults make. ``ids8`` (uint8 [T, 8], contiguous, 8-byte
    aligned; a call :func:`compact_ids_apply` accepts) is written with the same ids, a byte each, for
    :func:`route_backward`. ``_timeline`` (benchmarking only, not under graph capture: a contiguous int64 [warps,
    :func:`timeline_slots`] tensor on the logits' device; bf16 logits with E=64, top_k == 8 and a keep mask that the
    lane variant takes; ``_lane_options`` none or ``("sm_block",)``) runs the op's lane instance (with that option)
    with each warp's stamps written into it (the slots: csrc/route_cuda.cu's kTimeline; rows of warps that did not run
    are left as they were). ``dependent_launch`` (default: :func:`dependent_launch_default`) launches the kernel as a
    programmatic dependent launch on GPUs that have it (compute capability 9.0 and later): its blocks may start, and
    set up, while the kernel before it in the stream ends, and wait for it before touching memory. ``scoring``,
    ``bias``, ``n_group``, ``topk_group`` and ``scale`` are ``route``'s router variant (a call :func:`supports`
    takes); the benchmark-only arguments and ``ids8`` run the default router alone. ``chosen_logits`` (float32
    [T, top_k], contiguous; a call :func:`saves_chosen_logits` accepts, the default variant) is written with the
    chosen experts' logits (-inf where a pick is masked), for :func:`route_backward`."""
    lib, error, _ = _load()
    if lib is None:
        raise RuntimeError(f"the CUDA routing kernel is not available: {error}")
    num_tokens, num_experts = logits.shape
    weights, ids = output_buffers(logits, top_k, out)
    if not default_router(scoring, scale) and (ids8 is not None or _ablation is not None or _lane_options is not None
                               or _timeline is not None):
        raise ValueError("ids8, _ablation, _lane_options and _timeline run the default router alone "
                         f"(scoring='softmax', scale 1), got scoring={scoring!r}, scale={scale}")
    if bias is not None:  # (the kernel reads a float32 [E]: the reference adds the bias in float32 too)
        bias = bias.to(device=logits.device, dtype=torch.float32).contiguous()
    if ids8 is not None:
        if ids8.dtype != torch.uint8 or tuple(ids8.shape) != (num_tokens, top_k) or not ids8.is_contiguous() or (
            ids8.device != logits.device or ids8.data_ptr() % 8 != 0
        ):
            raise ValueError(f"ids8 must be a contiguous, 8-byte aligned uint8 [{num_tokens}, {top_k}] tensor on "
                             f"{logits.device}, got {ids8.dtype} {tuple(ids8.shape)}")
        if not compact_ids_apply(logits, top_k, keep) or variant not in (None, "lane") or _ablation or _lane_options:
            raise ValueError("ids8 is written by the lane kernel alone: a call compact_ids_apply() accepts, with the "
                             "default variant, options and no ablation")
    if chosen_logits is not None:
        _check_chosen_logits(chosen_logits, logits, top_k)
        if variant is not None or not saves_chosen_logits(logits, top_k, scoring=scoring, n_group=n_group):
            raise ValueError("chosen_logits is written by the chunk kernel's sigmoid router alone: a call "
                             "saves_chosen_logits() accepts, with the default variant")
    if num_tokens == 0:
        return weights, ids
    if keep is not None and not keep.is_contiguous():
        keep = keep.contiguous()
    if group is not None and not group.is_contiguous():
        group = group.contiguous()
    variant = forward_variant(logits, top_k, variant, scoring=scoring, n_group=n_group)
    ablation = 0
    if _ablation is not None:
        if _ablation not in LANE_ABLATIONS:
            raise ValueError(f"_ablation must be one of {sorted(LANE_ABLATIONS)}, got {_ablation!r}")
        if logits.dtype != torch.bfloat16 or num_experts != 64 or not lane_takes(logits, top_k, keep):
            raise ValueError("_ablation runs on bfloat16 logits with E=64 that the lane variant takes only")
        if keep is None and _ablation.startswith("mask"):
            raise ValueError(f"_ablation={_ablation!r} needs a keep mask")
        if _ablation.endswith("_tournament") and top_k != 8:
            raise ValueError(f"_ablation={_ablation!r} needs top_k == 8, got {top_k}")
        ablation = LANE_ABLATIONS[_ablation]
    if _grid_policy not in GRID_POLICIES:
        raise ValueError(f"_grid_policy must be one of {sorted(GRID_POLICIES)}, got {_grid_policy!r}")
    lane_options = 0
    if _lane_options is not None:
        unknown = sorted(set(_lane_options) - set(LANE_OPTIONS))
        if unknown:
            raise ValueError(f"_lane_options must be names from {sorted(LANE_OPTIONS)}, got {unknown}")
        if logits.dtype != torch.bfloat16 or num_experts != 64 or keep is None or not lane_takes(logits, top_k, keep):
            raise ValueError(
                "_lane_options runs on bfloat16 logits with E=64 and a keep mask that the lane variant takes"
            )
        if "topk8" in _lane_options and (top_k != 8 or _ablation is not None):
            raise ValueError("_lane_options 'topk8' needs top_k == 8 (and no _ablation)")
        for name in LANE_FULL_KERNEL_OPTIONS:
            if name in _lane_options and _ablation is not None:
                raise ValueError(f"_lane_options {name!r} runs on the full kernel (no _ablation)")
        for pair in LANE_EXCLUSIVE_OPTIONS:
            if set(pair) <= set(_lane_options):
                raise ValueError(f"_lane_options: {' and '.join(map(repr, pair))} do not combine")
        if "packed16" in _lane_options and _lane_mask_bytes(keep.shape[0], num_experts, True) > LANE_MAX_EXTRA_BYTES:
            raise ValueError("_lane_options 'packed16' needs room for its keep words: fewer groups")
        if _ablation not in (None, "load_store"):
            raise ValueError("_lane_options combines with _ablation='load_store' only")
        lane_options = lane_option_bits(_lane_options)
    if _timeline is not None:
        if (set(_lane_options or ()) - {"sm_block"} or _ablation is not None or variant != "lane" or ids8 is not None
                or top_k != 8
                or logits.dtype != torch.bfloat16 or num_experts != 64 or keep is None
                or not lane_takes(logits, top_k, keep)):
            raise ValueError("_timeline runs the lane variant's bfloat16 E=64 top-8 instance with a keep mask alone "
                             "(no _lane_options but 'sm_block', no _ablation or ids8)")
        slots = lib.moe_fastmask_route_cuda_timeline_slots()
        if (_timeline.dtype != torch.int64 or _timeline.dim() != 2 or _timeline.shape[1] != slots
                or not _timeline.is_contiguous() or _timeline.device != logits.device):
            raise ValueError(f"_timeline must be a contiguous int64 [warps, {slots}] tensor on {logits.device}, got "
                             f"{_timeline.dtype} {tuple(_timeline.shape)} on {_timeline.device}")
        lane_options = timeline_option_bits(_lane_options)
    params = forward_params(weights, ids, logits, top_k, keep, group, counts, renormalize,
                            prefetch=_prefetch_default() if prefetch is None else bool(prefetch),
                            variant=variant, ablation=ablation, grid_policy=_grid_policy, lane_options=lane_options,
                            ids8=ids8, dependent_launch=dependent_launch, scoring=scoring, bias=bias,
                            n_group=n_group, topk_group=topk_group, scale=scale, chosen_logits=chosen_logits)
    device = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    if device not in _PRELOADED and not torch.cuda.is_current_stream_capturing():
        _preload(lib, device)
    stream = torch.cuda.current_stream(device).cuda_stream
    if _timeline is not None:
        with torch.cuda.device(device):
            code = lib.moe_fastmask_route_cuda_set_timeline(_timeline.data_ptr(), _timeline.shape[0])
        if code == 0:
            code = lib.moe_fastmask_route_cuda_forward(ctypes.byref(params), DTYPE_CODES[logits.dtype], device, stream)
        torch.cuda.synchronize(device)
        with torch.cuda.device(device):
            lib.moe_fastmask_route_cuda_set_timeline(None, 0)
    else:
        code = lib.moe_fastmask_route_cuda_forward(ctypes.byref(params), DTYPE_CODES[logits.dtype], device, stream)
    if code != 0:
        message = lib.moe_fastmask_route_cuda_error_string(code).decode(errors="replace")
        raise RuntimeError(
            f"the CUDA routing kernel failed to launch (T={num_tokens}, E={num_experts}, top_k={top_k}, "
            f"{logits.dtype}): {message}"
        )
    return weights, ids


def saves_chosen_logits(logits: Tensor, top_k: int, *, scoring: str = "softmax", n_group: int = 1) -> bool:
    """Whether a training call's forward should also save the chosen experts' logits (``route_forward(chosen_logits=
    ...)``) for the backward, which then reads k contiguous floats a row instead of gathering each chosen expert's
    logit and keep flag: the sigmoid router's calls that the chunk kernel runs by default (:func:`forward_variant`)."""
    return (
        scoring == "sigmoid"
        and logits.dim() == 2
        and forward_variant(logits, top_k, scoring=scoring, n_group=n_group) == "chunk"
    )


def _check_chosen_logits(chosen_logits: Tensor, logits: Tensor, top_k: int) -> None:
    """``chosen_logits`` must be a contiguous float32 [T, top_k] tensor on the logits' device (ValueError)."""
    shape = (logits.shape[0], top_k)
    if (chosen_logits.dtype != torch.float32 or tuple(chosen_logits.shape) != shape
            or not chosen_logits.is_contiguous() or chosen_logits.device != logits.device):
        raise ValueError(f"chosen_logits must be a contiguous float32 {list(shape)} tensor on {logits.device}, got "
                         f"{chosen_logits.dtype} {tuple(chosen_logits.shape)} on {chosen_logits.device}")


def timeline_slots() -> int:
    """Stamps per warp of the lane kernel's timeline instance (the columns of ``route_forward``'s ``_timeline``)."""
    lib, error, _ = _load()
    if lib is None:
        raise RuntimeError(f"the CUDA routing kernel is not available: {error}")
    return int(lib.moe_fastmask_route_cuda_timeline_slots())


# route's backward of the lane backward's shapes runs on Triton below this many tokens, where Triton runs: there its
# kernel takes less time than the CUDA ones, from here on more (H200, E = 64, top-8, bf16, a mask; the op's forward +
# backward with the CUDA backward against Triton's: 7.93 / 5.98 us at T = 4,096, 9.50 / 8.66 at 16,384;
# benchmarks/RESULTS.md, tenth round). Other shapes keep the CUDA backward (not measured against Triton's there).
BACKWARD_MIN_TOKENS = 32768


def backward_prefers_triton(logits: Tensor, top_k: int) -> bool:
    """Whether ``route``'s backward should run Triton's kernel rather than the CUDA one (where Triton runs): calls of
    the CUDA lane backward's shapes (16-bit logits [T, E] with E in ``LANE_BACKWARD_EXPERTS``, ``top_k == 8``) with
    fewer than ``BACKWARD_MIN_TOKENS`` rows."""
    return (
        logits.dim() == 2
        and logits.shape[0] < BACKWARD_MIN_TOKENS
        and logits.dtype in (torch.float16, torch.bfloat16)
        and logits.shape[1] in LANE_BACKWARD_EXPERTS
        and top_k == LANE_MAX_TOP_K
    )


def supports_backward(
    grad_weights: Tensor,
    logits: Tensor,
    ids: Tensor,
    *,
    scoring: str = "softmax",
    scale: float = 1.0,
) -> bool:
    """Whether the CUDA backward takes this call (shapes only; :func:`is_available` is separate): any router variant
    (``scoring`` of ``SCORING_CODES``, a ``scale`` finite as a float32) on CUDA float32 / float16 / bfloat16 logits
    [T, E] with ``E <= 512``, int64 ``ids`` [T, k] with ``1 <= k <= min(16, E)`` and ``grad_weights`` of the logits'
    dtype and the ids' shape. A keep mask of any size."""
    if logits.device.type != "cuda" or logits.dtype not in DTYPE_CODES or logits.dim() != 2:
        return False
    if scoring not in SCORING_CODES or not scale_in_range(scale):
        return False
    num_tokens, num_experts = logits.shape
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.shape[0] != num_tokens or ids.device != logits.device:
        return False
    top_k = ids.shape[1]
    if not 1 <= num_experts <= MAX_BACKWARD_EXPERTS or not 1 <= top_k <= min(MAX_TOP_K, num_experts):
        return False
    return (
        grad_weights.dtype == logits.dtype and grad_weights.shape == ids.shape and grad_weights.device == logits.device
    )


def _data_ptr(tensor: Tensor | None) -> int | None:
    """A launcher argument's pointer: the tensor's data, or null for an absent one."""
    return tensor.data_ptr() if tensor is not None else None


def forward_params(
    weights: Tensor,
    ids: Tensor,
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    prefetch: bool = False,
    variant: str = "lane",
    ablation: int = 0,
    grid_policy: str = DEFAULT_GRID_POLICY,
    lane_options: int = 0,
    ids8: Tensor | None = None,
    dependent_launch: bool | None = None,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    chosen_logits: Tensor | None = None,
) -> RouteParams:
    """The forward launcher's arguments: pointers and strides of the given tensors (``weights``, ``ids``, ``keep``
    and ``group`` contiguous; ``logits`` any strides), the variant (``VARIANTS``) and grid policy
    (``GRID_POLICIES``) by name, the benchmark-only ablation and option codes as :func:`route_forward` encodes
    them, whether the kernel goes out as a programmatic dependent launch (None:
    :func:`dependent_launch_default`), the router variant (``route``'s arguments; ``bias`` float32 and
    contiguous) and the sigmoid router's saved logits (``route_forward``'s ``chosen_logits``)."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"the kernel's bias must be a contiguous float32 tensor, got {bias.dtype}")
    num_tokens, num_experts = logits.shape
    return RouteParams(
        weights.data_ptr(),
        ids.data_ptr(),
        _data_ptr(counts),
        logits.data_ptr(),
        _data_ptr(keep),
        _data_ptr(group),
        _data_ptr(ids8),
        logits.stride(0),
        logits.stride(1),
        num_tokens,
        num_experts,
        kernel_num_groups(keep, counts),
        top_k,
        int(bool(renormalize) or scoring == "softmax_chosen"),
        int(group is not None and group.dtype == torch.int64),
        _row_layout(logits),
        0,  # chosen by the launcher from G * E
        int(bool(prefetch)),
        VARIANTS[variant],
        ablation,
        GRID_POLICIES[grid_policy],
        lane_options,
        _dependent_launch_flag(dependent_launch),
        float(scale),
        SCORING_CODES[scoring],
        n_group,
        topk_group,
        _data_ptr(bias),
        _data_ptr(chosen_logits),
    )


def backward_params(
    grad_logits: Tensor,
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    *,
    scoring: str = "softmax",
    scale: float = 1.0,
    variant: str = "lane",
    ids8: Tensor | None = None,
    ablation: str | None = None,
    dependent_launch: bool | None = None,
    chosen_logits: Tensor | None = None,
) -> RouteBackwardParams:
    """The backward launcher's arguments: pointers and strides of the given tensors (``grad_logits``,
    ``grad_weights``, ``ids``, ``keep`` and ``group`` contiguous; ``logits`` any strides), the router variant
    (``"softmax_chosen"`` goes as the softmax renormalised over the chosen experts, the same gradient), the kernel
    variant by name (``BACKWARD_VARIANTS``), or the benchmark's ablation by name (``BACKWARD_ABLATIONS``) in its place,
    whether the kernel goes out as a programmatic dependent launch (None: :func:`dependent_launch_default`), and the
    sigmoid router's saved logits (``route_backward``'s ``chosen_logits``)."""
    num_tokens, num_experts = logits.shape
    return RouteBackwardParams(
        grad_logits.data_ptr(),
        grad_weights.data_ptr(),
        logits.data_ptr(),
        ids.data_ptr(),
        _data_ptr(ids8),
        _data_ptr(keep),
        _data_ptr(group),
        logits.stride(0),
        logits.stride(1),
        num_tokens,
        num_experts,
        keep.shape[0] if keep is not None else 1,
        ids.shape[1],
        int(bool(renormalize) or scoring == "softmax_chosen"),
        int(group is not None and group.dtype == torch.int64),
        BACKWARD_VARIANTS[variant] if ablation is None else BACKWARD_ABLATIONS[ablation],
        _dependent_launch_flag(dependent_launch),
        SCORING_CODES[scoring],
        float(scale),
        _data_ptr(chosen_logits),
    )


def route_backward(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    *,
    scoring: str = "softmax",
    scale: float = 1.0,
    out: Tensor | None = None,
    variant: str = "lane",
    ids8: Tensor | None = None,
    _ablation: str | None = None,
    dependent_launch: bool | None = None,
    chosen_logits: Tensor | None = None,
) -> Tensor:
    """Gradient of ``route``'s weights with respect to ``logits`` on the CUDA kernel, for a call that
    :func:`supports_backward` accepts (``keep`` bool [G, E] or None, ``group`` int32 / int64 [T] or None, as validated
    by ``check_route_args``; ids outside ``[0, G)`` mean no mask; ``scoring`` and ``scale`` the router variant's, as
    ``route`` takes them). Returns a contiguous [T, E] tensor in ``logits.dtype``: new, or ``out`` (contiguous, of
    that shape and dtype) written in place. ``variant`` (``BACKWARD_VARIANTS``; benchmarks and tests): ``"lane"``, the
    one-row-per-lane kernel where the call allows it (the default router on 16-bit logits with E = 32 or 64, k = 8,
    rows and tensors 16-byte aligned), else the other; ``"split"``, always the row-over-several-lanes kernel. The
    sigmoid router's calls ignore it: they run the row-over-several-lanes kernel where E is a power of two up to 256
    and the rows are whole 16-byte chunks, and a kernel of their own (several rows a warp step) otherwise.
    ``ids8`` (uint8 [T, k], the same ids a byte each, as ``route_forward(ids8=...)`` writes them) lets the lane kernel
    read them instead of ``ids``; the other ignores it.
    ``_ablation`` (benchmarking only; ``BACKWARD_ABLATIONS``) runs the lane kernel with its math removed: bf16 logits
    with E=64, a keep mask and ``ids8``, the lane variant. ``dependent_launch``: as :func:`route_forward`'s.
    ``chosen_logits`` (the sigmoid router only: float32 [T, k], the chosen experts' logits, -inf where a pick is
    masked, as ``route_forward(chosen_logits=...)`` writes them) is read instead of gathering each chosen expert's
    logit and keep flag, on the sigmoid router's own kernel."""
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(BACKWARD_VARIANTS)}, got {variant!r}")
    if scoring not in SCORING_CODES:
        raise ValueError(f"scoring must be one of {sorted(SCORING_CODES)}, got {scoring!r}")
    if not scale_in_range(scale):
        raise ValueError(f"scale must be finite as a float32, got {scale!r}")
    if _ablation is not None:
        if _ablation not in BACKWARD_ABLATIONS:
            raise ValueError(f"_ablation must be one of {sorted(BACKWARD_ABLATIONS)}, got {_ablation!r}")
        if (variant != "lane" or logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.shape[1] != 64
                or keep is None or ids8 is None or not default_router(scoring, scale)):
            raise ValueError(f"_ablation {_ablation!r} runs the lane kernel on bf16 logits with E=64, a keep mask and "
                             "ids8 only")
    lib, error, _ = _load()
    if lib is None:
        raise RuntimeError(f"the CUDA routing kernel is not available: {error}")
    num_tokens, num_experts = logits.shape
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != num_tokens:
        raise ValueError(f"ids must be int64 [T, k] with T={num_tokens}, got {ids.dtype} {tuple(ids.shape)}")
    if grad_weights.dtype != logits.dtype or grad_weights.shape != ids.shape:
        raise ValueError(
            f"grad_weights must be {logits.dtype} {tuple(ids.shape)} (the logits' dtype, the ids' shape), got "
            f"{grad_weights.dtype} {tuple(grad_weights.shape)}"
        )
    grad_logits = grad_logits_buffer(logits, out)
    if num_tokens == 0:
        return grad_logits
    if ids8 is not None and (ids8.dtype != torch.uint8 or ids8.shape != ids.shape or ids8.device != logits.device):
        raise ValueError(f"ids8 must be uint8 {tuple(ids.shape)} (the ids' shape) on {logits.device}, got "
                         f"{ids8.dtype} {tuple(ids8.shape)}")
    if chosen_logits is not None:
        if scoring != "sigmoid":
            raise ValueError(f"chosen_logits is the sigmoid router's (scoring='sigmoid'), got scoring={scoring!r}")
        _check_chosen_logits(chosen_logits.contiguous(), logits, ids.shape[1])
        chosen_logits = chosen_logits.contiguous()
    grad_weights = grad_weights.contiguous()
    ids = ids.contiguous()
    ids8 = ids8.contiguous() if ids8 is not None else None
    if keep is not None and not keep.is_contiguous():
        keep = keep.contiguous()
    if group is not None and not group.is_contiguous():
        group = group.contiguous()
    params = backward_params(grad_logits, grad_weights, logits, keep, group, ids, renormalize, scoring=scoring,
                             scale=scale, variant=variant, ids8=ids8, ablation=_ablation,
                             dependent_launch=dependent_launch, chosen_logits=chosen_logits)
    device = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    if device not in _PRELOADED and not torch.cuda.is_current_stream_capturing():
        _preload(lib, device)
    stream = torch.cuda.current_stream(device).cuda_stream
    code = lib.moe_fastmask_route_cuda_backward(ctypes.byref(params), DTYPE_CODES[logits.dtype], device, stream)
    if code != 0:
        message = lib.moe_fastmask_route_cuda_error_string(code).decode(errors="replace")
        raise RuntimeError(
            f"the CUDA routing backward failed to launch (T={num_tokens}, E={num_experts}, top_k={ids.shape[1]}, "
            f"{logits.dtype}): {message}"
        )
    return grad_logits
