"""Launchers of the Triton routing kernels (``moe_fastmask.kernels.route``).

Everything a launch needs is sized from T, E and top_k alone: no host synchronisation, no data-dependent host
decision, so a call can be captured in a CUDA graph. Triton is imported lazily: the package imports (and the other
backends run) on machines without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from moe_fastmask.ops.reference import grad_logits_buffer, kernel_num_groups, output_buffers

# Launch settings, from a sweep on an H100 (E=64, bf16, T from 16 to 262144; benchmarks/bench_route.py --sweep):
# tiles of 2048 logits (32 tokens at E=64) with 4 warps were best at large T for the forward with counts and for the
# backward; small batches use smaller tiles so that more programs share the work, but no fewer than 4 tokens, since
# every program adds one atomic per touched counter.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_T = 128
_MIN_BLOCK_T = 4
_TOKENS_PER_PROGRAM_SMALL_T = 64


@functools.cache
def _probe_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


# torch.compile runs this once while tracing and keeps the result: some torch versions refuse to trace find_spec,
# and trace through a functools.cache wrapper (which would hide this mark), so the mark sits on a plain function.
@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    return _probe_triton()


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``: a CUDA device, or CPU under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and _triton_importable()
    if device.type == "cpu":
        return triton_interpreter_enabled() and _triton_importable()
    return False


@functools.cache
def _kernels():
    from moe_fastmask.kernels import route as kernels

    return kernels


# --------------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------------

# Set MOE_FASTMASK_FAST_LAUNCH=0 to send every launch through Triton's JIT entry point.
FAST_LAUNCH = os.environ.get("MOE_FASTMASK_FAST_LAUNCH", "1") not in ("", "0")


def specialization_traits(arg: object) -> tuple:
    """Every property of a runtime kernel argument that Triton specialises a compiled kernel on.

    Tensors: dtype and 16-byte alignment of the data pointer. Ints: == 1 (turned into a constant), divisible by 16,
    and the integer width the value needs. Two argument lists with equal traits (and equal constexprs) run the
    same compiled kernel.
    """
    if isinstance(arg, Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return (bool, arg)
    if isinstance(arg, int):
        return (arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31), arg < (1 << 63))
    return (type(arg), arg)


class KernelLauncher:
    """Launches a Triton JIT kernel, skipping its per-call argument binding once a specialisation is compiled.

    ``JITFunction.run`` binds and specialises every argument on every call, which costs more host time than the
    routing kernel takes at decode sizes (tens of microseconds). The first launch of each specialisation goes
    through it and keeps the compiled kernel it returns; later launches with the same :func:`specialization_traits`,
    constexprs, ``num_warps`` and device call that kernel's launcher directly, exactly as ``JITFunction.run`` does
    after its cache lookup (same stream, launch metadata and profiler hooks). That call uses Triton and torch
    internals, so it is taken only on the Triton versions in :data:`DIRECT_LAUNCH_VERIFIED`; the interpreter, other
    Triton versions and devices other than the current CUDA device always take the JIT path.
    """

    def __init__(self, kernel_name: str, num_runtime_args: int) -> None:
        self.kernel_name = kernel_name
        self.num_runtime_args = num_runtime_args  # runtime arguments come first, constexprs after
        self.compiled: dict[tuple, object] = {}
        self.direct_launches = 0

    def _jit_launch(self, grid: tuple[int], args: tuple, num_warps: int):
        """Launch through Triton's JIT entry point (compiling on a cache miss); returns the compiled kernel."""
        return getattr(_kernels(), self.kernel_name)[grid](*args, num_warps=num_warps)

    def __call__(self, grid: tuple[int], args: tuple, num_warps: int, device: torch.device):
        if not (FAST_LAUNCH and device.type == "cuda" and _direct_launch_supported()):
            return self._jit_launch(grid, args, num_warps)
        if device.index != torch.cuda.current_device():
            # Triton launches on the current device: make it the tensors' device
            with torch.cuda.device(device):
                return self._jit_launch(grid, args, num_warps)
        runtime_args = args[: self.num_runtime_args]
        key = (device.index, num_warps, tuple(map(specialization_traits, runtime_args)), args[self.num_runtime_args :])
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self._jit_launch(grid, args, num_warps)
            if hasattr(kernel, "packed_metadata"):  # a compiled kernel (not the interpreter's result)
                self.compiled[key] = kernel
            return kernel
        import triton

        stream = torch._C._cuda_getCurrentRawStream(device.index)
        hooks = triton.knobs.runtime
        grid_x, grid_y, grid_z = tuple(grid) + (1,) * (3 - len(grid))
        kernel.run(
            grid_x, grid_y, grid_z, stream, kernel.function, kernel.packed_metadata,
            kernel.launch_metadata(grid, stream, *args), hooks.launch_enter_hook, hooks.launch_exit_hook, *args,
        )
        self.direct_launches += 1
        return kernel


# Triton versions (major.minor) whose ``JITFunction.run`` was checked on a GPU to launch exactly as
# :class:`KernelLauncher` does after its cache lookup (the ``kernel.run`` calling convention, the stream, launch
# metadata and hooks). Triton 3.9 launches through the same call but also runs ``pre_run_hooks`` first, which the
# direct path would skip; versions not listed here take the JIT path.
DIRECT_LAUNCH_VERIFIED = ("3.6",)


def direct_launch_verified(version: str) -> bool:
    """True when Triton ``version`` (e.g. ``"3.6.0"``) is one the direct launch path was verified on."""
    return ".".join(version.split(".")[:2]) in DIRECT_LAUNCH_VERIFIED


@functools.cache
def _direct_launch_supported() -> bool:
    """Whether :class:`KernelLauncher` may call compiled kernels directly with the installed Triton (one notice
    when it may not: every launch then goes through Triton's public JIT entry point)."""
    import triton

    if direct_launch_verified(triton.__version__):
        return True
    warnings.warn(
        f"moe_fastmask: direct kernel launch is verified on Triton {', '.join(DIRECT_LAUNCH_VERIFIED)} only; with "
        f"Triton {triton.__version__} every routing launch goes through Triton's JIT entry point (more host time "
        "per call, same results)",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


_FORWARD = KernelLauncher("_route_fwd_kernel", num_runtime_args=13)
_BACKWARD = KernelLauncher("_route_bwd_kernel", num_runtime_args=12)

# ``route``'s scoring names as the kernels' SCORING constexpr
SCORING_CODES = {"softmax": 0, "softmax_chosen": 1, "sigmoid": 2}


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=4096)  # called on every launch; pure in its arguments
def calculate_settings(num_experts: int, num_tokens: int, on_gpu: bool = True) -> tuple[int, int, int]:
    """(BLOCK_E, BLOCK_T, num_warps) for a [T, E] problem.

    BLOCK_E covers all experts (next power of two, at least 2). BLOCK_T tokens fill a tile of about
    ``_TILE_ELEMENTS`` logits; on a GPU a small batch gets smaller tiles (about T / 64 tokens, at least
    ``_MIN_BLOCK_T``) so that it still spreads over several programs. The interpreter prefers few large tiles.
    """
    block_e = max(2, _next_power_of_2(num_experts))
    block_t = max(1, min(_MAX_BLOCK_T, _TILE_ELEMENTS // block_e))
    if on_gpu:
        small = _next_power_of_2(_cdiv(num_tokens, _TOKENS_PER_PROGRAM_SMALL_T))
        block_t = min(block_t, max(_MIN_BLOCK_T, small))
    else:
        block_t = min(max(block_t, _MAX_BLOCK_T // 2), max(1, _next_power_of_2(num_tokens)))
    num_warps = 4 if block_e * block_t >= 256 else 2
    return block_e, block_t, num_warps


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(
    logits: Tensor, block_t: int | None, num_warps: int | None
) -> tuple[int, int, int, tuple[int]]:
    """(BLOCK_E, BLOCK_T, num_warps, grid) of a launch over ``logits`` [T, E]; given values override the defaults."""
    num_tokens, num_experts = logits.shape
    block_e, default_block_t, default_warps = calculate_settings(num_experts, num_tokens, logits.device.type == "cuda")
    block_t = block_t or default_block_t
    return block_e, block_t, num_warps or default_warps, (_cdiv(num_tokens, block_t),)


def check_dtype(logits: Tensor) -> None:
    """Refuse float64 logits: the kernels compute in float32, which would silently break float64 gradient checks."""
    if logits.dtype == torch.float64:
        raise TypeError(
            "backend='triton' computes in float32 and does not take float64 logits; use backend='torch' or 'cpp' "
            "(or 'auto', which picks one of them for float64) for float64"
        )


def _forward_into(
    weights: Tensor,
    ids: Tensor,
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
    block_t: int | None = None,
    num_warps: int | None = None,
) -> object | None:
    """Launch the forward kernel; returns Triton's handle of the launched kernel (None when T == 0)."""
    check_dtype(logits)
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return None
    block_e, block_t, num_warps, grid = _launch_config(logits, block_t, num_warps)
    # absent tensors pass a placeholder pointer that the kernel never touches (its HAS_* flag is off); the order is
    # the kernel's parameter order, runtime arguments first
    args = (
        weights,
        ids,
        counts if counts is not None else ids,
        logits,
        keep.view(torch.uint8) if keep is not None else logits,
        group if group is not None else ids,
        bias if bias is not None else logits,
        logits.stride(0),
        logits.stride(1),
        num_tokens,
        num_experts,
        kernel_num_groups(keep, counts),
        float(scale),
        top_k,  # TOP_K
        block_t,  # BLOCK_T
        block_e,  # BLOCK_E
        max(2, _next_power_of_2(top_k)),  # BLOCK_K
        block_e.bit_length() - 1,  # IDX_BITS
        logits.dtype == torch.float32 or scoring == "sigmoid",  # WIDE_KEYS: sigmoid keys hold full fp32 values
        block_e == num_experts,  # EVEN_E
        keep is not None,  # HAS_KEEP
        group is not None,  # HAS_GROUP
        counts is not None,  # HAS_COUNTS
        renormalize,  # RENORMALIZE
        logits.device.type == "cuda",  # FAST_EXP
        SCORING_CODES[scoring],  # SCORING
        bias is not None,  # HAS_BIAS
        n_group,  # N_GROUP
        topk_group,  # TOPK_GROUP
        num_experts // n_group,  # GROUP_SIZE
        max(2, _next_power_of_2(n_group)),  # BLOCK_G
    )
    return _FORWARD(grid, args, num_warps, logits.device)


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
    out: tuple[Tensor, Tensor] | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused forward of ``route`` (arguments already validated by ``check_route_args``; the variant arguments are
    those of :func:`moe_fastmask.route`).

    Returns ``weights`` [T, top_k] in ``logits.dtype`` and ``ids`` [T, top_k] int64, both contiguous, and adds the
    chosen experts to ``counts`` in place. ``out=(weights, ids)`` writes into given contiguous tensors instead of
    new ones; ``block_t``/``num_warps`` override :func:`calculate_settings` (for tuning).
    """
    weights, ids = output_buffers(logits, top_k, out)
    _forward_into(
        weights, ids, logits, top_k, keep, group, counts, renormalize, scoring=scoring, bias=bias, n_group=n_group,
        topk_group=topk_group, scale=scale, block_t=block_t, num_warps=num_warps,
    )
    return weights, ids


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
    block_t: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Gradient of ``route``'s weights with respect to ``logits``: contiguous [T, E] in ``logits.dtype``.

    ``grad_weights`` and ``ids`` are [T, top_k]; non-contiguous ones are copied. ``out`` writes into a given
    contiguous tensor.
    """
    check_dtype(logits)
    num_tokens, num_experts = logits.shape
    top_k = ids.shape[1]
    grad_logits = grad_logits_buffer(logits, out)
    if num_tokens == 0:
        return grad_logits
    grad_weights = grad_weights.contiguous()
    ids = ids.contiguous()
    block_e, block_t, num_warps, grid = _launch_config(logits, block_t, num_warps)
    args = (
        grad_logits,
        grad_weights,
        logits,
        keep.view(torch.uint8) if keep is not None else logits,
        group if group is not None else ids,
        ids,
        logits.stride(0),
        logits.stride(1),
        num_tokens,
        num_experts,
        kernel_num_groups(keep, None),
        float(scale),
        top_k,  # TOP_K
        block_t,  # BLOCK_T
        block_e,  # BLOCK_E
        keep is not None,  # HAS_KEEP
        group is not None,  # HAS_GROUP
        renormalize,  # RENORMALIZE
        logits.device.type == "cuda",  # FAST_EXP
        SCORING_CODES[scoring],  # SCORING
    )
    _BACKWARD(grid, args, num_warps, logits.device)
    return grad_logits
