"""The public fused router op ``route``: masked scoring + top-k + per-group expert counts.

About 610 lines in one module on purpose: the argument checks, the registered ops with their fake implementations
and autograd, and the backend dispatch are one contract and change together.

Variants of the router (``scoring``, a selection ``bias``, group-limited top-k, a weight ``scale``) cover the
routers of OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS and DeepSeek-V3 / GLM-4.5; see :func:`route`.

Layers, from the outside in:

* :func:`route` — argument checks, backend choice, autograd (:class:`RouteFunction`).
* ``torch.ops.moe_fastmask.route`` — the registered op, differentiable by itself: a composite of the custom ops
  ``route_forward`` (the fused forward; ``counts`` is a declared mutated argument) and ``route_weights_grad`` (the
  gradient with respect to ``logits``, through ``route_backward``). All have fake implementations, so
  ``torch.compile(fullgraph=True)`` traces through them and CUDA graphs capture them.
* the backends — ``cuda`` (the CUDA kernels of ``csrc/route_cuda.cu`` and ``csrc/route_cuda_backward.cu``: the
  forward of every variant, sigmoid up to 256 experts or, top-8 with E a multiple of 32, up to 512; the backward of
  every variant up to 512 experts; Triton for the rest),
  ``triton`` (CUDA, or CPU through ``TRITON_INTERPRET=1``), ``cpp`` (the C++ CPU kernel) and ``torch`` (the
  plain-PyTorch reference in :mod:`moe_fastmask.ops.reference`).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from moe_fastmask.ops import cpp_route, cuda_route, reference, triton_route
from moe_fastmask.ops.triton_route import triton_interpreter_enabled  # noqa: F401 - still importable from here

BACKENDS = ("auto", "cuda", "triton", "cpp", "torch")
MAX_TOP_K = 16
MAX_N_GROUP = 64
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_DTYPES = (torch.int32, torch.int64)
SCORINGS = reference.SCORINGS


# --------------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``backend`` (one of :data:`BACKENDS`) into the concrete backend that runs on ``device``.

    ``auto``: on CUDA the CUDA kernel when it builds and loads (``cuda``: calls it does not cover run on Triton, and
    so does the backward of the small calls ``cuda_route.backward_prefers_triton`` names, where Triton's is the
    faster), else Triton; on CPU the C++ kernel when it builds and loads, else the PyTorch reference with one
    warning; float64 logits (``dtype``), which the GPU kernels do not take, use the reference on CUDA. An explicit
    backend that cannot run on ``device`` raises ``ValueError``; ``triton`` or ``cuda`` with float64 raises
    ``TypeError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            if cuda_route.is_available():
                return "cuda"
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
    if backend == "triton" and dtype == torch.float64:
        raise TypeError(
            "backend='triton' computes in float32 and does not take float64 logits; use backend='torch', 'cpp' or "
            "'auto' for float64"
        )
    if backend == "triton" and not triton_route.is_available(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs a CUDA device, or CPU tensors with "
            "TRITON_INTERPRET=1 set before moe_fastmask is imported, and the triton package"
        )
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors only, got tensors on {device}")
        if not cuda_route.is_available():
            raise ValueError(f"backend='cuda' is not available: {cuda_route.load_error()}")
        if dtype == torch.float64:
            raise TypeError(
                "backend='cuda' computes in float32 and does not take float64 logits; use backend='torch' or 'auto' "
                "for float64"
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


CONCRETE_BACKENDS = ("cuda", "triton", "cpp", "torch")


def _concrete_backend(backend: str, logits: Tensor) -> str:
    """``backend`` as the kernels take it: ``"auto"`` resolved for ``logits``, any other name refused (the registered
    ops are public too, so a misspelt backend must not quietly run the reference)."""
    if backend in CONCRETE_BACKENDS:
        return backend
    if backend == "auto":
        return resolve_backend(backend, logits.device, logits.dtype)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _dense(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous (the kernels index ``keep``, ``group`` and ``bias`` as dense rows), ``None`` kept."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _gpu_fallback(device: torch.device) -> str:
    """Where the ``cuda`` backend sends what its kernels do not cover (other variants and shapes): Triton, or the
    reference where Triton cannot run."""
    return "triton" if triton_route.is_available(device) else "torch"


def _route_forward_impl(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    backend: str,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Run the forward of a backend (the body of the ``moe_fastmask::route_forward`` custom op)."""
    backend = _concrete_backend(backend, logits)
    keep, group, bias = _dense(keep), _dense(group), _dense(bias)
    variant = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, scale=scale)
    if backend == "cuda":
        if cuda_route.supports(logits, top_k, keep, **variant):
            return cuda_route.route_forward(logits, top_k, keep, group, counts, renormalize, **variant)
        backend = _gpu_fallback(logits.device)
    if backend == "triton":
        return triton_route.route_forward(logits, top_k, keep, group, counts, renormalize, **variant)
    if backend == "cpp":
        return cpp_route.route_forward(logits, top_k, keep, group, counts, renormalize, **variant)
    weights, ids = reference.route_reference(logits, top_k, keep, group, counts, renormalize, **variant)
    return weights.contiguous(), ids.contiguous()


# the op's schema comes from _route_forward_impl's signature; the function itself stays plain for direct calls
_route_forward_op = torch.library.custom_op(
    "moe_fastmask::route_forward", _route_forward_impl, mutates_args=("counts",)
)


@_route_forward_op.register_fake
def _route_forward_op_fake(logits, top_k, keep, group, counts, renormalize, backend, scoring="softmax", bias=None,
                           n_group=1, topk_group=1, scale=1.0):
    num_tokens = logits.shape[0]
    return (
        logits.new_empty((num_tokens, top_k)),
        logits.new_empty((num_tokens, top_k), dtype=torch.int64),
    )


def _backward_on_triton(logits: Tensor, top_k: int) -> bool:
    """Whether the ``cuda`` backend runs this call's backward on Triton although the CUDA backward takes it: the small
    calls ``cuda_route.backward_prefers_triton`` names, where Triton runs (its kernel is the faster there)."""
    return cuda_route.backward_prefers_triton(logits, top_k) and triton_route.is_available(logits.device)


def _route_backward_impl(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    backend: str,
    scoring: str = "softmax",
    scale: float = 1.0,
    ids8: Tensor | None = None,
    chosen_logits: Tensor | None = None,
) -> Tensor:
    """Gradient of the weights with respect to the logits (the body of ``moe_fastmask::route_backward``; ``ids8``,
    the ids a byte each, and ``chosen_logits``, the sigmoid router's chosen logits, as the CUDA forward wrote them
    for it, only from ``route``'s eager autograd)."""
    backend = _concrete_backend(backend, logits)
    keep, group = _dense(keep), _dense(group)
    if backend == "cuda":
        if (
            not _backward_on_triton(logits, ids.shape[1])
            and cuda_route.supports_backward(grad_weights, logits, ids, scoring=scoring, scale=scale)
            and cuda_route.is_available()
        ):
            return cuda_route.route_backward(grad_weights, logits, keep, group, ids, renormalize, scoring=scoring,
                                             scale=scale, ids8=ids8, chosen_logits=chosen_logits)
        backend = _gpu_fallback(logits.device)
    if backend == "triton":
        return triton_route.route_backward(
            grad_weights, logits, keep, group, ids, renormalize, scoring=scoring, scale=scale
        )
    return reference.route_backward_reference(
        grad_weights, logits, keep, group, ids, renormalize, scoring=scoring, scale=scale
    )


@torch.library.custom_op("moe_fastmask::route_backward", mutates_args=())
def _route_backward_op(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
    backend: str,
    scoring: str = "softmax",
    scale: float = 1.0,
) -> Tensor:
    return _route_backward_impl(grad_weights, logits, keep, group, ids, renormalize, backend, scoring, scale)


@_route_backward_op.register_fake
def _route_backward_op_fake(grad_weights, logits, keep, group, ids, renormalize, backend, scoring="softmax",
                            scale=1.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("moe_fastmask::route_weights_grad", mutates_args=())
def _route_weights_grad_op(
    logits: Tensor,
    weights: Tensor,
    ids: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    renormalize: bool,
    backend: str,
    scoring: str = "softmax",
    scale: float = 1.0,
) -> Tensor:
    """``weights`` (a copy) made differentiable with respect to ``logits``: the autograd half of ``route``."""
    return weights.clone()


@_route_weights_grad_op.register_fake
def _route_weights_grad_op_fake(logits, weights, ids, keep, group, renormalize, backend, scoring="softmax",
                                scale=1.0):
    return torch.empty_like(weights)


def _route_weights_grad_setup_context(ctx, inputs, output):
    logits, weights, ids, keep, group, renormalize, backend, scoring, scale = inputs
    ctx.save_for_backward(logits, keep, group, ids)
    ctx.renormalize = renormalize
    ctx.backend = backend
    ctx.scoring = scoring
    ctx.scale = scale


def _route_weights_grad_backward(ctx, grad_weights):
    logits, keep, group, ids = ctx.saved_tensors
    grad_logits = torch.ops.moe_fastmask.route_backward(
        grad_weights.contiguous(), logits, keep, group, ids, ctx.renormalize, ctx.backend, ctx.scoring, ctx.scale
    )
    return grad_logits, None, None, None, None, None, None, None, None


_route_weights_grad_op.register_autograd(_route_weights_grad_backward, setup_context=_route_weights_grad_setup_context)

# ``moe_fastmask::route``, the public registered op: the fused forward (``route_forward``, which mutates ``counts``)
# plus, when ``logits`` needs a gradient, ``route_weights_grad``. Autograd formulas can only be registered on
# functional ops, so the op is a composite of the two: differentiable by itself under torch.compile, AOT dispatch
# and direct ``torch.ops`` calls.
_LIBRARY = torch.library.Library("moe_fastmask", "FRAGMENT")
_LIBRARY.define(
    "route(Tensor logits, SymInt top_k, Tensor? keep, Tensor? group, Tensor(a4!)? counts, bool renormalize, "
    'str backend, str scoring="softmax", Tensor? bias=None, SymInt n_group=1, SymInt topk_group=1, '
    "float scale=1.) -> (Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def _route_composite(logits, top_k, keep, group, counts, renormalize, backend, scoring="softmax", bias=None,
                     n_group=1, topk_group=1, scale=1.0):
    backend = _concrete_backend(backend, logits)  # (once, for the forward and the backward alike)
    # the shape, dtype and device checks of route (no data read): the op is public, and its kernels trust them.
    # Not while compiling: route checked its arguments before tracing reached the op, and here sizes may be symbolic
    if not torch.compiler.is_compiling() and all(type(v) is int for v in (top_k, n_group, topk_group)):
        check_route_args(logits, top_k, keep, group, counts, renormalize, validate=False, scoring=scoring, bias=bias,
                         n_group=n_group, topk_group=topk_group, scale=scale)
    weights, ids = torch.ops.moe_fastmask.route_forward(
        logits.detach(), top_k, keep, group, counts, renormalize, backend, scoring, bias, n_group, topk_group, scale
    )
    if logits.requires_grad and torch.is_grad_enabled():
        weights = torch.ops.moe_fastmask.route_weights_grad(
            logits, weights, ids, keep, group, renormalize, backend, scoring, scale
        )
    return weights, ids


_LIBRARY.impl("route", _route_composite, "CompositeImplicitAutograd")


class RouteFunction(torch.autograd.Function):
    """Eager autograd of ``route`` (the registered op's formula without its dispatch layers): gradients flow to
    ``logits`` through ``weights``; ``ids`` and counts have none."""

    @staticmethod
    def forward(ctx, logits, top_k, keep, group, counts, renormalize, backend, scoring="softmax", bias=None,
                n_group=1, topk_group=1, scale=1.0):
        keep, group, bias = _dense(keep), _dense(group), _dense(bias)  # (the CUDA call below and the backward)
        variant = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, scale=scale)
        ids8 = chosen = None
        cuda = backend == "cuda" and cuda_route.supports(logits, top_k, keep, **variant)
        if cuda and cuda_route.default_router(scoring, scale) and (
            cuda_route.compact_ids_apply(logits, top_k, keep)
            and not _backward_on_triton(logits, top_k)
        ):
            # the ids a byte each too, for the backward's lane kernel (it reads 8 bytes per row instead of 64)
            ids8 = torch.empty(logits.shape[0], top_k, dtype=torch.uint8, device=logits.device)
            weights, ids = cuda_route.route_forward(logits, top_k, keep, group, counts, renormalize, ids8=ids8)
        elif cuda and cuda_route.saves_chosen_logits(logits, top_k, scoring=scoring, n_group=n_group):
            # the chosen experts' logits too (4 bytes an entry), which the sigmoid router's backward reads instead of
            # gathering each one and its keep flag from the rows
            chosen = torch.empty(logits.shape[0], top_k, dtype=torch.float32, device=logits.device)
            weights, ids = cuda_route.route_forward(logits, top_k, keep, group, counts, renormalize,
                                                    chosen_logits=chosen, **variant)
        else:
            weights, ids = _route_forward_impl(
                logits, top_k, keep, group, counts, renormalize, backend, scoring, bias, n_group, topk_group, scale
            )
        ctx.save_for_backward(logits, keep, group, ids, ids8, chosen)
        ctx.renormalize = renormalize
        ctx.backend = backend
        ctx.scoring = scoring
        ctx.scale = scale
        ctx.mark_non_differentiable(ids)
        # no zero-filled [T, k] int64 grad for the ids (16 MB at T = 262,144, k = 8: a memset as long as a fifth of
        # the backward kernel), and none for unused weights
        ctx.set_materialize_grads(False)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, grad_ids):
        if grad_weights is None:
            return (None,) * 12
        logits, keep, group, ids, ids8, chosen = ctx.saved_tensors
        grad_logits = _route_backward_impl(
            grad_weights.contiguous(), logits, keep, group, ids, ctx.renormalize, ctx.backend, ctx.scoring, ctx.scale,
            ids8=ids8, chosen_logits=chosen,
        )
        return (grad_logits,) + (None,) * 11


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------

def check_variant_args(
    logits: Tensor,
    top_k: int,
    renormalize: bool,
    scoring: str,
    bias: Tensor | None,
    n_group: int,
    topk_group: int,
    scale: float,
) -> None:
    """The checks of ``route``'s router-variant arguments (shape, dtype and range only; no device data is read)."""
    num_experts = logits.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "softmax_chosen" and renormalize:
        raise ValueError("renormalize=True has no meaning with scoring='softmax_chosen' (its weights already sum to 1)")
    # (x - x == 0 holds for finite x only; unlike math.isfinite it also takes the symbolic float that
    # torch.compile(dynamic=True) makes of a float argument)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat)) or not scale - scale == 0:
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if bias is not None:
        if scoring != "sigmoid":
            raise ValueError(f"bias (a selection bias) needs scoring='sigmoid', got scoring={scoring!r}")
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.shape != (num_experts,):
            raise ValueError(f"bias must have shape [E] = [{num_experts}], got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device} but logits are on {logits.device}")
        if bias.requires_grad:
            raise ValueError("bias must not require grad: it only chooses experts and gets no gradient")
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n_group != 1:
        if scoring != "sigmoid":
            raise ValueError(f"group-limited top-k (n_group={n_group}) needs scoring='sigmoid', got {scoring!r}")
        if n_group < 1 or num_experts % n_group != 0 or num_experts // n_group < 2:
            raise ValueError(
                f"n_group must divide E={num_experts} into groups of at least 2 experts, got n_group={n_group}"
            )
        if n_group > MAX_N_GROUP:
            raise ValueError(f"n_group must be at most {MAX_N_GROUP}, got {n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        if topk_group * (num_experts // n_group) < top_k:
            raise ValueError(
                f"topk_group={topk_group} groups of {num_experts // n_group} experts hold fewer than top_k={top_k}"
            )
    elif topk_group != 1:
        raise ValueError(f"topk_group={topk_group} needs n_group > 1")


def _value_checks_allowed(device: torch.device) -> bool:
    """Value checks read device data: skip them while compiling or capturing a CUDA graph (they cannot sync)."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_route_args(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    validate: bool = True,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for anything ``route`` cannot compute correctly.

    Shape, dtype and device checks always run (they read no data). With ``validate=True`` the value checks run
    too — group ids in range and every ``keep`` row allowing at least ``top_k`` experts — except while compiling
    or capturing a CUDA graph. They read the current data on every call (a cache keyed on the tensor's version
    would miss edits through ``.data`` or ``.numpy()``), with one host synchronisation for both; hot loops that
    validated their inputs once pass ``validate=False``.
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
    check_variant_args(logits, top_k, renormalize, scoring, bias, n_group, topk_group, scale)

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
        if counts.dim() != 2 or counts.shape[1] != num_experts or counts.shape[0] < 1:
            raise ValueError(
                f"counts must have shape [G, E] = [G, {num_experts}] with G >= 1, got {tuple(counts.shape)}"
            )
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
    # one small tensor, one host sync: [fewest kept experts, lowest group id, highest group id]
    stats = []
    if keep is not None:
        stats.append(keep.sum(dim=-1).min())
    if group is not None and num_tokens > 0:
        stats += [group.min().long(), group.max().long()]
    if not stats:
        return
    values = torch.stack([v.to(torch.int64) for v in stats]).tolist()
    if keep is not None:
        fewest = values.pop(0)
        if fewest < top_k:
            rows = (keep.sum(dim=-1) < top_k).nonzero().flatten().tolist()
            raise ValueError(f"keep rows {rows} allow fewer than top_k={top_k} experts (fewest: {fewest})")
    if values:
        low, high = values
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
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Fused MoE routing: mask, scores over experts, top-k, optional renormalisation and per-group counts.

    Args:
        logits: ``[T, E]`` router logits, float32 / float16 / bfloat16, any strides.
        top_k: experts chosen per token, ``1 <= top_k <= min(E, 16)``.
        keep: ``None`` or bool ``[G, E]``: the experts each token group may use. A ``False`` (masked) expert gets
            weight 0 and ranks below every allowed expert, whatever their weights, so it is never chosen while the
            row allows at least ``top_k`` experts (which ``validate`` checks).
        group: ``None`` or int32/int64 ``[T]`` in ``[-1, G)``: each token's group. Group -1 tokens are routed with
            no mask and not counted. ``None`` puts every token in group 0. With ``validate=False`` an id outside
            ``[-1, G)`` is not an error: that token is treated as group -1 (no mask, not counted), and nothing is
            ever read or written outside ``keep`` and ``counts``.
        counts: ``None`` or int64 ``[G, E]``, contiguous, accumulated in place:
            ``counts[g, e] += number of tokens of group g routed to e`` (each (token, chosen expert) once).
        renormalize: if True the ``top_k`` weights of each token sum to 1 (OLMoE's ``norm_topk_prob``).
        backend: ``"auto"`` (the CUDA kernel, else Triton, on CUDA; C++ on CPU; the reference if neither),
            ``"cuda"`` (the CUDA kernels: the forward of every variant (sigmoid with ``E <= 256``, or the sigmoid
            calls ``cuda_route.chunk_takes`` accepts: top-8 with E a multiple of 32 up to 512), the backward of every
            variant with ``E <= 512``; Triton for the other shapes), ``"triton"``,
            ``"cpp"`` or ``"torch"``.
        validate: run the value checks (group range, ``keep`` rows with at least ``top_k`` experts). They read
            device data; pass False in hot loops whose inputs were validated once. Shape, dtype and device checks
            always run.
        scoring: how experts are scored and weighted.
            ``"softmax"`` (default): softmax over the allowed experts, top-k by logit, weights = the chosen
            probabilities (OLMoE, Qwen2/3-MoE; Mixtral with ``renormalize=True``).
            ``"softmax_chosen"``: top-k by logit, weights = softmax over the chosen logits only (GPT-OSS'
            ``softmax(topk(logits))``); ``renormalize`` must be False.
            ``"sigmoid"``: scores ``s = sigmoid(z)``, top-k by ``s + bias`` (within the kept groups), weights = the
            chosen ``s``; renormalised as ``s / (sum + 1e-20)`` (DeepSeek-V3, GLM-4.5).
        bias: ``None`` or float ``[E]`` (sigmoid only): a per-expert selection bias that decides which experts are
            chosen but does not enter the weights (DeepSeek-V3's ``e_score_correction_bias``). No gradient.
        n_group, topk_group: group-limited top-k (sigmoid only): the experts form ``n_group`` contiguous groups of
            ``E / n_group``; each group scores the sum of its two highest ``s + bias`` (masked experts count as
            -inf), the ``topk_group`` best groups are kept (equal scores: lower group index) and the top-k is taken
            within them. Experts of the other groups rank below every expert of a kept group, above masked ones.
            ``n_group=1`` (default) means no group limit.
        scale: multiplies the final weights (DeepSeek-V3's ``routed_scaling_factor``).

    Returns:
        ``weights`` ``[T, top_k]`` in ``logits.dtype`` and ``ids`` ``[T, top_k]`` int64. Tie rule, the same in
        every backend: experts are ordered by their masked logit, highest first — every expert a token may use
        ranks above every masked expert (even an allowed logit of -inf), -0.0 equals +0.0, and equal logits go to
        the lower expert index. So with the softmax scorings ids and counts are bit-identical across backends, and
        weights descend. With ``keep=None`` and the defaults this equals Hugging Face OLMoE's router: softmax in
        float32, top-k, optional renormalisation, cast to ``logits.dtype``. ``weights`` is differentiable with
        respect to ``logits`` (``bias`` gets no gradient; the choice of experts has none). float64 logits compute in
        float64 (``auto`` picks a backend that can; ``triton`` refuses them). With ``scoring="sigmoid"`` the tie
        rule orders by the selection value ``sigmoid(z) + bias`` (-inf outside the kept groups) instead of the
        logit; each backend computes the sigmoid with its own ``exp``, so two experts whose selection values differ
        only by rounding may be ordered differently on different backends (equal logits and biases always tie
        exactly), and weights need not descend. A keep mask means the same in every variant: a masked expert is
        never chosen while the row allows ``top_k`` experts, and counts count the chosen experts.

    NaN policy: logits are not scanned for NaN (that would synchronise with the device on every call). With
    ``"softmax"`` a token with a NaN (or +inf) logit among its allowed experts gets NaN weights; its ids are allowed
    experts but otherwise unspecified, and they are counted like any others. A token whose allowed logits are all
    -inf gets NaN weights and, by the tie rule, its allowed experts in ascending index order as ids (counted). With
    ``"softmax_chosen"`` the same holds for the chosen logits; with ``"sigmoid"`` a NaN logit among a token's allowed
    experts makes its ids allowed experts but otherwise unspecified (counted), and a chosen one makes its own weight
    NaN (with ``renormalize`` the token's weights). A NaN of either sign counts as NaN.
    """
    variant = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, scale=scale)
    check_route_args(logits, top_k, keep, group, counts, renormalize, validate=validate, **variant)
    concrete = resolve_backend(backend, logits.device, logits.dtype)
    return route_prechecked(logits, top_k, keep, group, counts, renormalize, concrete, **variant)


def route_prechecked(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    backend: str,
    *,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """:func:`route` without its argument checks, on a concrete backend (``"cuda"``, ``"triton"``, ``"cpp"`` or
    ``"torch"``).

    For callers that route many times with arguments they validated once and a backend they resolved once with
    :func:`resolve_backend` — a model integration calling it in every layer of every decode step, where the checks
    would cost a noticeable share of the step's host time. Arguments that :func:`check_route_args` would reject give
    undefined results here.
    """
    scale = float(scale)
    variant = (scoring, bias, n_group, topk_group, scale)
    if torch.compiler.is_compiling():
        # compiled graphs need the registered op: opaque to the tracer, with its fake and its autograd formula
        return torch.ops.moe_fastmask.route(logits, top_k, keep, group, counts, renormalize, backend, *variant)
    if not (logits.requires_grad and torch.is_grad_enabled()):
        # Eager inference (e.g. every layer of every decode step): skip the autograd and custom-op dispatch layers,
        # which cost more host time than the kernel itself at small T.
        return _route_forward_impl(logits, top_k, keep, group, counts, renormalize, backend, *variant)
    return RouteFunction.apply(logits, top_k, keep, group, counts, renormalize, backend, *variant)
