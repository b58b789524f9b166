"""Loader and wrapper of the C++ CPU routing kernel (``csrc/``).

The sources are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja) into a cache folder keyed by
the torch version, the Python version, the machine and a hash of the sources and build flags:
``$MOE_FASTMASK_CACHE_DIR`` or ``~/.cache/moe_fastmask/cpp`` (``$XDG_CACHE_HOME`` is honoured), then
``<torch>-<python>-<machine>-<hash>/``. A finished build leaves a ``BUILT`` stamp next to the library; later processes
see the stamp and load the library directly, without running the compiler or ninja. Builds of one key are serialised
by an ``flock`` on ``<key>.lock``, which the OS releases when a process dies, so concurrent first uses build once and
an interrupted build never blocks later ones. The library links the C++ runtime the process already has loaded
(torch's ``libstdc++``), never a static copy: see :func:`loaded_cxx_runtime`.

The library registers ``torch.ops.moe_fastmask_C.route_cpu`` (see ``csrc/torch_bindings.cpp``); :func:`route_forward`
is the thin wrapper the ``cpp`` backend of :func:`moe_fastmask.route` calls. ``MOE_FASTMASK_DISABLE_CPP=1`` makes
:func:`is_available` return False, so ``route(backend="auto")`` falls back to the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

LIBRARY_NAME = "moe_fastmask_C"
SOURCE_FILES = ("moe_ops.h", "route_cpu.cpp", "torch_bindings.cpp")
COMPILED_FILES = ("route_cpu.cpp", "torch_bindings.cpp")
# -O3 only, never -march=native: a cached build may be reused on another machine sharing the cache folder (the kernel
# uses 16-byte vectors, the x86-64 / aarch64 baseline). -fopenmp makes at::parallel_for run on torch's OpenMP pool
# (Linux wheels of torch use OpenMP), so torch.set_num_threads sets the kernel's thread count; elsewhere the kernel
# is built without it and runs on one thread.
_OPENMP = sys.platform.startswith("linux")
EXTRA_CFLAGS = ("-O3", "-fopenmp") if _OPENMP else ("-O3",)
EXTRA_LDFLAGS = ("-fopenmp",) if _OPENMP else ()
DISABLE_ENV = "MOE_FASTMASK_DISABLE_CPP"
CACHE_ENV = "MOE_FASTMASK_CACHE_DIR"
_STAMP = "BUILT"
_LOADED_MAPS = "/proc/self/maps"
SCORING_CODES = {"softmax": 0, "softmax_chosen": 1, "sigmoid": 2}  # route's scoring names as the kernel's codes


# --------------------------------------------------------------------------------------------------------------
# Locating, building and loading
# --------------------------------------------------------------------------------------------------------------


def disabled() -> bool:
    """True when ``MOE_FASTMASK_DISABLE_CPP`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def source_dir() -> Path:
    """Folder holding the C++ sources: ``<repo>/csrc`` in a source checkout, ``moe_fastmask/csrc`` when installed."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir.parent / "csrc", package_dir / "csrc"):
        if all((candidate / name).is_file() for name in SOURCE_FILES):
            return candidate
    raise FileNotFoundError(f"C++ sources {SOURCE_FILES} not found next to {package_dir}")


def cache_root() -> Path:
    """``$MOE_FASTMASK_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_fastmask/cpp`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe_fastmask" / "cpp"


def loaded_cxx_runtime() -> str | None:
    """Path of the C++ runtime (``libstdc++.so``) this process has loaded, i.e. torch's; None where it is not known.

    The library is linked against exactly this file. A compiler that finds only a static ``libstdc++.a`` (some
    toolchain wrappers do) would otherwise put a second, private C++ runtime into the library; an error message built
    there then formats numbers through a locale the second runtime never set up, and the process dies
    (segmentation fault) instead of raising.
    """
    try:
        with open(_LOADED_MAPS) as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if "/libstdc++.so" in path and os.path.isfile(path):
                    return path
    except OSError:
        return None
    return None


def link_flags() -> list[str]:
    """Linker flags of the build: OpenMP where used, and the process's own C++ runtime where it is known."""
    runtime = loaded_cxx_runtime()
    return list(EXTRA_LDFLAGS) + ([runtime] if runtime else [])


def build_key(sources: Path) -> str:
    """Cache key: torch version, Python version, machine, and a hash of the sources and flags."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    digest.update(repr((EXTRA_CFLAGS, link_flags(), os.environ.get("CXX", ""))).encode())
    torch_version = torch.__version__.replace("+", "_")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch_version}-{python}-{platform.machine()}-{digest.hexdigest()[:16]}"


def build_dir() -> Path:
    """Folder the library of the current sources is (or will be) built in."""
    return cache_root() / build_key(source_dir())


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY_NAME}::route_cpu", dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def _op_registered() -> bool:
    return _has_kernel("CPU")


@contextlib.contextmanager
def _build_lock(path: Path):
    """Exclusive lock on ``path`` held while building; released by the OS if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on torch's own lock file inside the build folder
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _library_path(directory: Path) -> Path:
    return directory / f"{LIBRARY_NAME}.so"


def _built(directory: Path) -> bool:
    return (directory / _STAMP).is_file() and _library_path(directory).is_file()


def _compile_and_load(directory: Path) -> None:
    """Compile the sources into ``directory`` (caller holds the lock) and load the library into this process."""
    from torch.utils import cpp_extension

    sources = source_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # torch's own lock file of an interrupted build would make load() wait forever; we hold the flock, so it is stale
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[str(sources / name) for name in COMPILED_FILES],
        extra_cflags=list(EXTRA_CFLAGS),
        extra_ldflags=link_flags(),
        extra_include_paths=[str(sources)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    stamp = directory / f"{_STAMP}.tmp{os.getpid()}"
    stamp.write_text(f"{torch.__version__}\n{sources}\n")
    os.replace(stamp, directory / _STAMP)


def _build_and_load() -> str:
    """Load the library of the current sources, building it first unless a finished build is cached; returns the
    path of the library now serving the op ("" if it was registered before, by other means)."""
    if _op_registered():
        return ""
    directory = build_dir()
    if not _built(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory.parent / f"{directory.name}.lock"):
            if not _built(directory):
                _compile_and_load(directory)
                return str(_library_path(directory))
    torch.ops.load_library(str(_library_path(directory)))
    return str(_library_path(directory))


def _register_fake() -> None:
    """Fake (meta) implementation, so FakeTensor tracing and torch.compile see the op: it only writes its outputs."""
    if _has_kernel("Meta"):
        return

    @torch.library.register_fake(f"{LIBRARY_NAME}::route_cpu")
    def _route_cpu_fake(topk_weights, topk_ids, counts, logits, keep, group, renormalize, scoring=0, bias=None,
                        n_group=1, topk_group=1, scale=1.0):
        return None


@functools.cache
def _load() -> tuple[bool, str, str]:
    """Build (if needed) and load once per process; returns (success, error message, library path)."""
    try:
        path = _build_and_load()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
        message = str(exc).strip()
        if len(message) > 2000:
            message = message[:1000] + "\n...\n" + message[-1000:]
        return False, f"{type(exc).__name__}: {message}", ""
    if not _op_registered():
        return False, f"the library loaded but torch.ops.{LIBRARY_NAME}.route_cpu is not registered", path
    _register_fake()
    return True, "", path


# torch.compile calls these once while tracing (they build, load and read the environment) and keeps the result.
@torch.compiler.assume_constant_result
def is_available() -> bool:
    """True when the C++ kernel is (or can be) built and loaded, and ``MOE_FASTMASK_DISABLE_CPP`` is not set."""
    if disabled():
        return False
    return _load()[0]


@torch.compiler.assume_constant_result
def load_error() -> str:
    """Why :func:`is_available` is False (``""`` when it is True)."""
    if disabled():
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    return _load()[1]


def build() -> str:
    """Build the library ahead of time (nothing to do when cached) and load it; returns the path of the library.

    Works with ``MOE_FASTMASK_DISABLE_CPP`` set too (it only stops :func:`is_available` from using the kernel).
    """
    ok, error, path = _load()
    if not ok:
        raise RuntimeError(f"building the C++ routing kernel failed: {error}")
    return path


# --------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------


def route_forward(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Run ``torch.ops.moe_fastmask_C.route_cpu`` on already validated arguments; returns ``(weights, ids)``.

    ``counts`` is accumulated in place. float64 logits (only used by gradient checks) go to the PyTorch reference,
    since the kernel computes in float32. Builds or loads the library on first use, so every entry point that reaches
    this (``route``, ``route_prechecked``, ``torch.ops.moe_fastmask.route``) works in a fresh process.
    """
    if logits.dtype == torch.float64:
        from moe_fastmask.ops import reference

        weights, ids = reference.route_reference(
            logits, top_k, keep, group, counts, renormalize, scoring=scoring, bias=bias, n_group=n_group,
            topk_group=topk_group, scale=scale,
        )
        return weights.contiguous(), ids.contiguous()
    ok, error, _ = _load()  # cached after the first call
    if not ok:
        raise RuntimeError(f"the C++ routing kernel is not available: {error}")
    num_tokens = logits.shape[0]
    weights = torch.empty((num_tokens, top_k), dtype=logits.dtype, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    torch.ops.moe_fastmask_C.route_cpu(
        weights, ids, counts, logits, keep, group, renormalize, SCORING_CODES[scoring], bias, n_group, topk_group,
        float(scale),
    )
    return weights, ids
