"""Launcher of the packed-key router forward (``moe_fastmask.kernels.route_fast``).

Same argument meanings as :func:`moe_fastmask.ops.triton_route.route_forward` (arguments already validated), plus
the top-k method and launch settings, so the kernel can be timed against the current one and swapped in. Its ranking
contract is the module docstring of :mod:`moe_fastmask.kernels.route_fast`: allowed experts always rank above masked
ones, signed zeros tie, ties go to the lower index, group ids outside ``[0, G)`` are neither masked nor counted.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from moe_fastmask.ops.reference import output_buffers

from moe_fastmask.ops import triton_route

# top-k methods of the kernel's SELECT
SELECT_METHODS = {"bitonic": 0, "tl_topk": 1, "iterative": 2}


@functools.cache
def _kernels():
    from moe_fastmask.kernels import route_fast as kernels

    return kernels


class _FastKernelLauncher(triton_route.KernelLauncher):
    """:class:`~moe_fastmask.ops.triton_route.KernelLauncher` over the kernels of ``route_fast``."""

    def _jit_launch(self, grid, args, num_warps):
        return getattr(_kernels(), self.kernel_name)[grid](*args, num_warps=num_warps)


_FORWARD = _FastKernelLauncher("_route_fast_fwd_kernel", num_runtime_args=11)


def tl_topk_available() -> bool:
    """Whether the installed Triton has ``tl.topk`` (the ``tl_topk`` method needs it)."""
    import triton.language as tl

    return hasattr(tl, "topk")


# the same tiles as the current kernel's, so that the two are timed on equal launches
default_settings = triton_route.calculate_settings


def forward_into(
    weights: Tensor,
    ids: Tensor,
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    select: str = "bitonic",
    lanes_per_row: int = 1,
    early_denom: bool = False,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> object | None:
    """Launch the forward into contiguous ``weights``/``ids`` [T, top_k]; returns Triton's compiled-kernel handle.

    ``lanes_per_row`` (1, 2, 4, ...) spreads each token's row over that many threads of a warp (1: the top-k runs in
    one thread's registers without shuffles; more: fewer registers per thread); 0 keeps the compiler's default tile
    layout. ``early_denom`` computes the softmax denominator before the top-k. ``counts`` may be a view (rows ``E``
    elements apart, unit column stride) of a larger buffer: only its [G, E] elements are ever written. Returns
    None when T == 0.
    """
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return None
    if select not in SELECT_METHODS:
        raise ValueError(f"select must be one of {sorted(SELECT_METHODS)}, got {select!r}")
    if select == "tl_topk" and not tl_topk_available():
        raise RuntimeError("select='tl_topk' needs a Triton with tl.topk")
    if block_t is not None and (block_t < 1 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    if counts is not None and (counts.stride(1) != 1 or (counts.shape[0] > 1 and counts.stride(0) != num_experts)):
        raise ValueError(f"counts must have strides ({num_experts}, 1), got {counts.stride()}")
    if lanes_per_row < 0 or lanes_per_row & (lanes_per_row - 1) or lanes_per_row > 32:
        raise ValueError(f"lanes_per_row must be 0 or a power of two up to 32, got {lanes_per_row}")
    block_e, default_block_t, default_warps = default_settings(num_experts, num_tokens, logits.device.type == "cuda")
    block_t = block_t or default_block_t
    num_warps = num_warps or default_warps
    block_k = triton_route._next_power_of_2(top_k)
    vec = min(block_e, max(1, 16 // logits.element_size()))  # columns per 16-byte load
    if keep is not None:
        num_groups = keep.shape[0]
    elif counts is not None:
        num_groups = counts.shape[0]
    else:
        num_groups = 1
    args = (
        weights,
        ids,
        counts if counts is not None else ids,
        logits,
        keep.view(torch.uint8) if keep is not None else logits,
        group if group is not None else ids,
        logits.stride(0),
        logits.stride(1),
        num_tokens,
        num_experts,
        num_groups,
        top_k,  # TOP_K
        block_t,  # BLOCK_T
        block_e,  # BLOCK_E
        block_k,  # BLOCK_K
        block_t.bit_length() - 1,  # LOG_T
        block_k.bit_length() - 1,  # LOG_K
        block_e.bit_length() - 1,  # IDX_BITS
        logits.dtype == torch.float32 or block_e > 8192,  # WIDE_KEYS (16-bit logits leave 13 low bits)
        block_e == num_experts,  # EVEN_E
        keep is not None,  # HAS_KEEP
        group is not None,  # HAS_GROUP
        counts is not None,  # HAS_COUNTS
        renormalize,  # RENORMALIZE
        logits.device.type == "cuda",  # FAST_EXP
        SELECT_METHODS[select],  # SELECT
        min(lanes_per_row, block_e // vec),  # LANES
        vec,  # VEC
        early_denom,  # EARLY_DENOM
    )
    return _FORWARD((triton_route._cdiv(num_tokens, block_t),), args, num_warps, logits.device)


def route_fast_forward(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None,
    group: Tensor | None,
    counts: Tensor | None,
    renormalize: bool,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    select: str = "bitonic",
    lanes_per_row: int = 1,
    early_denom: bool = False,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused forward on packed keys: ``weights`` [T, top_k] in ``logits.dtype`` and ``ids`` [T, top_k] int64.

    Arguments as :func:`moe_fastmask.ops.triton_route.route_forward` (validated by ``check_route_args``, except
    that group ids outside ``[0, G)`` are allowed: those tokens use every expert and are not counted). ``select``
    is the top-k method (``bitonic``, ``tl_topk``, ``iterative``), ``lanes_per_row`` and ``early_denom`` the layout
    and schedule (see :func:`forward_into`); ``block_t``/``num_warps`` override the defaults.
    """
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, E={logits.shape[1]}], got {top_k}")
    weights, ids = output_buffers(logits, top_k, out)
    forward_into(
        weights, ids, logits, top_k, keep, group, counts, renormalize,
        select=select, lanes_per_row=lanes_per_row, early_denom=early_denom, block_t=block_t, num_warps=num_warps,
    )
    return weights, ids
