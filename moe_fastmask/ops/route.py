"""The public fused router op ``route``: masked softmax + top-k + per-group expert counts.

Layers, from the outside in:

* :func:`route` — argument checks, backend choice, autograd (:class:`RouteFunction`).
* ``torch.ops.moe_fastmask.route`` / ``route_backward`` — custom ops (``torch.library.custom_op``) with fake
  implementations, so ``torch.compile(fullgraph=True)`` traces through them and CUDA graphs capture them; ``counts``
  is a declared mutated argument.
* the backends — ``triton`` (CUDA, or CPU through ``TRITON_INTERPRET=1``), ``cpp`` (the C++ CPU kernel) and
  ``torch`` (the plain-PyTorch reference in :mod:`moe_fastmask.ops.reference`).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from moe_fastmask.ops import reference

BACKENDS = ("auto", "triton", "cpp", "torch")
MAX_TOP_K = 16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------------


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` (one of :data:`BACKENDS`) into the concrete backend that runs on ``device``.

    ``auto``: Triton on CUDA; on CPU the C++ kernel when it builds and loads, else the PyTorch reference with one
    warning. An explicit backend that cannot run on ``device`` raises ``ValueError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from moe_fastmask.ops import cpp_route, triton_route

    if backend == "auto":
        if device.type == "cuda":
            if triton_route.is_available(device):
                return "triton"
            _warn_once("moe_fastmask.route: Triton is not available; using the PyTorch reference on CUDA")
            return "torch"
        if device.type == "cpu" and cpp_route.is_available():
            return "cpp"
        if device.type == "cpu":
            _warn_once(
                "moe_fastmask.route: the C++ CPU kernel could not be built or loaded "
                f"({cpp_route.load_error()}); using the PyTorch reference"
            )
        return "torch"
    if backend == "triton" and not triton_route.is_available(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs a CUDA device, or CPU tensors with "
            "TRITON_INTERPRET=1 set before moe_fastmask is imported, and the triton package"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
        if not cpp_route.is_available():
            raise ValueError(f"backend='cpp' is not available: {cpp_route.load_error()}")
    return backend


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


def _route_forward_impl(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Run the forward of a concrete backend (the body of the ``moe_fastmask::route`` custom op)."""
    if backend == "triton":
        from moe_fastmask.ops import triton_route

        return triton_route.route_forward(logits, top_k, keep, group, counts, renormalize)
    if backend == "cpp":
        from moe_fastmask.ops import cpp_route

        return cpp_route.route_forward(logits, top_k, keep, group, counts, renormalize)
    weights, ids = reference.route_reference(logits, top_k, keep, group, counts, renormalize)
    return weights.contiguous(), ids.contiguous()


@torch.library.custom_op("moe_fastmask::route", mutates_args=("counts",))
def _route_op(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _route_forward_impl(logits, top_k, keep, group, counts, renormalize, backend)


@_route_op.register_fake
def _route_op_fake(logits, top_k, keep, group, counts, renormalize, backend):
    num_tokens = logits.shape[0]
    return (
        logits.new_empty((num_tokens, top_k)),
        logits.new_empty((num_tokens, top_k), dtype=torch.int64),
    )


def _route_backward_impl(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    backend: str,
) -> Tensor:
    """Gradient of the weights with respect to the logits (the body of ``moe_fastmask::route_backward``)."""
    if backend == "triton":
        from moe_fastmask.ops import triton_route

        return triton_route.route_backward(grad_weights, logits, keep, group, ids, renormalize)
    return reference.route_backward_reference(grad_weights, logits, keep, group, ids, renormalize)


@torch.library.custom_op("moe_fastmask::route_backward", mutates_args=())
def _route_backward_op(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    backend: str,
) -> Tensor:
    return _route_backward_impl(grad_weights, logits, keep, group, ids, renormalize, backend)


@_route_backward_op.register_fake
def _route_backward_op_fake(grad_weights, logits, keep, group, ids, renormalize, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class RouteFunction(torch.autograd.Function):
    """Autograd of ``route``: gradients flow to ``logits`` through ``weights``; ``ids`` and counts have none."""

    @staticmethod
    def forward(ctx, logits, top_k, keep, group, counts, renormalize, backend):
        # Compiled graphs need the registered op (opaque to the tracer, with its fake); eager calls skip its
        # dispatch overhead.
        if torch.compiler.is_compiling():
            weights, ids = torch.ops.moe_fastmask.route(logits, top_k, keep, group, counts, renormalize, backend)
        else:
            weights, ids = _route_forward_impl(logits, top_k, keep, group, counts, renormalize, backend)
        ctx.save_for_backward(logits, keep, group, ids)
        ctx.renormalize = renormalize
        ctx.backend = backend
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, grad_ids):
        logits, keep, group, ids = ctx.saved_tensors
        backward_op = torch.ops.moe_fastmask.route_backward if torch.compiler.is_compiling() else _route_backward_impl
        grad_logits = backward_op(grad_weights.contiguous(), logits, keep, group, ids, ctx.renormalize, ctx.backend)
        return grad_logits, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------

# min kept experts per row of each validated keep mask, keyed weakly by the tensor, stamped with its version
# (tensors compare elementwise, so the dictionary must key them by identity)
_KEEP_MIN_KEPT = WeakIdKeyDictionary()


def _value_checks_allowed(device: torch.device) -> bool:
    """Value checks read device data: skip them while compiling or capturing a CUDA graph (they cannot sync)."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def min_kept_experts(keep: Tensor) -> int:
    """Fewest experts any row of ``keep`` allows; computed once per mask version (one host sync), then cached."""
    cached = _KEEP_MIN_KEPT.get(keep)
    if cached is not None and cached[0] == keep._version:
        return cached[1]
    value = int(keep.sum(dim=-1).min().item()) if keep.numel() else 0
    _KEEP_MIN_KEPT[keep] = (keep._version, value)
    return value


def check_route_args(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    validate: bool = True,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for anything ``route`` cannot compute correctly.

    Shape, dtype and device checks always run (they read no data). With ``validate=True`` the value checks run
    too — group ids in range and every ``keep`` row allowing at least ``top_k`` experts — except while compiling
    or capturing a CUDA graph. The ``keep`` check is cached per mask version, so only the group range check
    synchronises with the device on each call; hot loops that validated their groups once pass ``validate=False``.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, E] (2-D), got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be float32, float16 or bfloat16 (float64 for checks), got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        raise ValueError("logits must have at least one expert column (E >= 1)")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= min(num_experts, MAX_TOP_K):
        raise ValueError(f"top_k must be in [1, min(E, {MAX_TOP_K})] = [1, {min(num_experts, MAX_TOP_K)}], got {top_k}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")

    num_groups = None
    if keep is not None:
        if not isinstance(keep, Tensor):
            raise TypeError(f"keep must be a torch.Tensor or None, got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
        if keep.dim() != 2 or keep.shape[1] != num_experts or keep.shape[0] < 1:
            raise ValueError(f"keep must have shape [G, E] = [G, {num_experts}] with G >= 1, got {tuple(keep.shape)}")
        if keep.device != logits.device:
            raise ValueError(f"keep is on {keep.device} but logits are on {logits.device}")
        num_groups = keep.shape[0]
    if counts is not None:
        if not isinstance(counts, Tensor):
            raise TypeError(f"counts must be a torch.Tensor or None, got {type(counts).__name__}")
        if counts.dtype != torch.int64:
            raise TypeError(f"counts must be int64, got {counts.dtype}")
        if counts.dim() != 2 or counts.shape[1] != num_experts:
            raise ValueError(f"counts must have shape [G, E] = [G, {num_experts}], got {tuple(counts.shape)}")
        if num_groups is not None and counts.shape[0] != num_groups:
            raise ValueError(f"counts has {counts.shape[0]} groups but keep has {num_groups}")
        if counts.device != logits.device:
            raise ValueError(f"counts is on {counts.device} but logits are on {logits.device}")
        if not counts.is_contiguous():
            raise ValueError("counts must be contiguous: it is accumulated in place")
        if counts.requires_grad:
            raise ValueError("counts must not require grad")
        num_groups = counts.shape[0]
    if group is not None:
        if not isinstance(group, Tensor):
            raise TypeError(f"group must be a torch.Tensor or None, got {type(group).__name__}")
        if group.dtype not in GROUP_DTYPES:
            raise TypeError(f"group must be int32 or int64, got {group.dtype}")
        if group.dim() != 1 or group.shape[0] != num_tokens:
            raise ValueError(f"group must have shape [T] = [{num_tokens}], got {tuple(group.shape)}")
        if group.device != logits.device:
            raise ValueError(f"group is on {group.device} but logits are on {logits.device}")

    if not validate or not _value_checks_allowed(logits.device):
        return
    if keep is not None:
        fewest = min_kept_experts(keep)
        if fewest < top_k:
            rows = (keep.sum(dim=-1) < top_k).nonzero().flatten().tolist()
            raise ValueError(f"keep rows {rows} allow fewer than top_k={top_k} experts (fewest: {fewest})")
    if group is not None and num_tokens > 0:
        low, high = (int(v) for v in torch.stack([group.min(), group.max()]).tolist())
        limit = num_groups if num_groups is not None else None
        if low < -1 or (limit is not None and high >= limit):
            bound = f"[-1, {limit})" if limit is not None else "[-1, ...)"
            raise ValueError(f"group ids must be in {bound}; got values from {low} to {high}")


# --------------------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------------------


def route(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None = None,
    group: Tensor | None = None,
    counts: Tensor | None = None,
    renormalize: bool = False,
    backend: str = "auto",
    *,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fused MoE routing: mask, softmax over experts, top-k, optional renormalisation and per-group counts.

    Args:
        logits: ``[T, E]`` router logits, float32 / float16 / bfloat16, any strides.
        top_k: experts chosen per token, ``1 <= top_k <= min(E, 16)``.
        keep: ``None`` or bool ``[G, E]``: the experts each token group may use (a ``False`` expert's logit is
            treated as -inf, so it gets probability 0 and is never chosen).
        group: ``None`` or int32/int64 ``[T]`` in ``[-1, G)``: each token's group. Group -1 tokens are routed with
            no mask and not counted. ``None`` puts every token in group 0.
        counts: ``None`` or int64 ``[G, E]``, contiguous, accumulated in place:
            ``counts[g, e] += number of tokens of group g routed to e`` (each (token, chosen expert) once).
        renormalize: if True the ``top_k`` weights of each token sum to 1 (OLMoE's ``norm_topk_prob``).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU, the reference if neither), ``"triton"``, ``"cpp"`` or
            ``"torch"``.
        validate: run the value checks (group range, ``keep`` rows with at least ``top_k`` experts). They read
            device data; pass False in hot loops whose inputs were validated once. Shape, dtype and device checks
            always run.

    Returns:
        ``weights`` ``[T, top_k]`` in ``logits.dtype`` and ``ids`` ``[T, top_k]`` int64, ordered by descending
        weight; ties go to the lower expert index. With ``keep=None`` this equals Hugging Face OLMoE's router:
        softmax in float32, top-k, optional renormalisation, cast to ``logits.dtype``. ``weights`` is
        differentiable with respect to ``logits``.

    NaN policy: logits are not scanned for NaN (that would synchronise with the device on every call). A token with
    a NaN (or +inf) logit among its allowed experts, or with all its allowed logits -inf, gets NaN weights; its ids
    are valid expert indices in ``[0, E)`` but otherwise unspecified, and they are counted like any others.
    """
    check_route_args(logits, top_k, keep, group, counts, renormalize, validate=validate)
    return route_prechecked(logits, top_k, keep, group, counts, renormalize, resolve_backend(backend, logits.device))


def route_prechecked(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """:func:`route` without its argument checks, on a concrete backend (``"triton"``, ``"cpp"`` or ``"torch"``).

    For callers that route many times with arguments they validated once and a backend they resolved once with
    :func:`resolve_backend` — a model integration calling it in every layer of every decode step, where the checks
    would cost a noticeable share of the step's host time. Arguments that :func:`check_route_args` would reject give
    undefined results here.
    """
    if keep is not None and not keep.is_contiguous():
        keep = keep.contiguous()
    if group is not None and not group.is_contiguous():
        group = group.contiguous()
    if not (logits.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
        # Eager inference (e.g. every layer of every decode step): skip the autograd and custom-op dispatch layers,
        # which cost more host time than the kernel itself at small T. Compiled code and training go through the
        # registered op.
        return _route_forward_impl(logits, top_k, keep, group, counts, renormalize, backend)
    return RouteFunction.apply(logits, top_k, keep, group, counts, renormalize, backend)
