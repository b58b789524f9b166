"""Faster forward of the fused router op (masked softmax + top-k + per-group counts) on packed sortable keys.

Pure compute; the launcher lives in :mod:`moe_fastmask.ops.route_fast_launch`. These are candidate forward kernels,
measured against the dispatched one by ``benchmarks/bench_route_variants.py`` (results in ``benchmarks/RESULTS.md``);
``moe_fastmask.route`` does not dispatch to them yet.

Ranking contract (what the ids follow, bit-exactly):

* the key of an allowed expert is its logit; ``-0.0`` and ``+0.0`` are equal; equal keys go to the lower expert
  index;
* a masked expert ranks below every allowed expert, including allowed experts whose logit is ``-inf``; masked
  experts rank among themselves by index (they are chosen only when a row allows fewer than ``top_k`` experts, and
  then get weight 0);
* a token's group ``g`` uses ``keep[g]`` and is counted when ``0 <= g < G``; any other group (``-1``, and
  out-of-range values, which are never read from or written to) uses every expert and is not counted.

Keys: the fp32 logit's bits ``u`` (int32) map to ``ord = u`` for ``u >= 0`` and ``INT32_MIN - u`` for ``u < 0``
(minus the magnitude), an order-preserving map that sends both zeros to 0. The low ``IDX_BITS`` bits then carry
``BLOCK_E - 1 - e``, so one integer comparison orders by logit, then by lower index. 16-bit logits leave at least 13
zero low bits in their fp32 value, so a 32-bit key holds them exactly; float32 logits use 64-bit keys (``ord`` above
the index bits). Masked and padding experts get ``ord = INT32_MIN``, below ``ord(-inf)`` and ``ord(-NaN)``; padding
columns carry the smallest index codes, so they rank below every real expert.

Top-k selection (``SELECT``):

* 0, bitonic: sort runs of ``BLOCK_K`` keys in alternating directions, then repeatedly keep the elementwise max of
  neighbouring runs (a bitonic sequence holding the top ``BLOCK_K`` of both) and re-sort it; each compare-exchange is
  one integer min and one max over a size-2 axis of the row's hypercube (about ``E log^2 k`` of them per row instead
  of ``k E`` for repeated maxima);
* 1, ``tl.topk`` (Triton's own bitonic top-k, where the installed Triton has it);
* 2, repeated maxima (one integer max per pick, then the winner knocked out).

Counts: a key is chosen when it is at least the row's ``TOP_K``-th key (keys are distinct); those hits are summed
per (tile, group) before one atomic per touched (group, expert), as in :mod:`moe_fastmask.kernels.route`.

Weights are computed as in :mod:`moe_fastmask.kernels.route`: fp32 softmax over the allowed experts, the weight of a
chosen expert recomputed from the logit its key holds, optional renormalisation over the chosen ``TOP_K``, then a
cast to the output dtype. A row whose allowed logits are all ``-inf`` gets NaN weights (as ``torch.softmax``).
"""

if __name__ != "moe_fastmask.kernels.route_fast":
    raise ImportError("moe_fastmask's Triton kernels are importable only as 'moe_fastmask.kernels.route_fast'")

import triton
import triton.language as tl

from .route import _exp2  # (the Triton kernels share it)

INT32_MIN = -2147483648


@triton.jit
def _ordered(bits):
    """fp32 bits (int32) -> int32 of the same order, -0.0 and +0.0 both mapped to 0."""
    return tl.where(bits < 0, -2147483648 - bits, bits)


@triton.jit
def _unordered(ordv):
    """Inverse of :func:`_ordered` (up to the sign of zero)."""
    return tl.where(ordv < 0, -2147483648 - ordv, ordv)


@triton.jit
def _key_logit(key, IDX_BITS: tl.constexpr, WIDE_KEYS: tl.constexpr):
    """The fp32 logit a key holds; -inf for masked and padding keys."""
    if WIDE_KEYS:
        ordv = (key >> IDX_BITS).to(tl.int32)
        masked = ordv == -2147483648
    else:
        HIGH_MASK: tl.constexpr = -(1 << IDX_BITS)
        ordv = key & HIGH_MASK
        masked = ordv == -2147483648
    logit = _unordered(ordv).to(tl.float32, bitcast=True)
    return tl.where(masked, -float("inf"), logit)


# ----------------------------------------------------------------------------------------------------------------
# Bitonic top-k on a row hypercube: x [BLOCK_T, BLOCK_E] reshaped to [2] * log2(BLOCK_T * BLOCK_E); the expert
# bits are the innermost dimensions. Dimension ``i`` below counts from the innermost.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _indicator(n_dims: tl.constexpr, i: tl.constexpr):
    """0/1 along hypercube dimension ``i`` (from the innermost), broadcastable against the hypercube."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - i - 1) + [2] + [1] * i)


@triton.jit
def _compare_exchange(h, flip, i: tl.constexpr):
    """Order each pair along dimension ``i``: ascending where ``flip`` is 0, descending where it is 1."""
    n_dims: tl.constexpr = len(h.shape)
    axis: tl.constexpr = n_dims - 1 - i
    hi = tl.max(h, axis=axis, keep_dims=True)
    lo = tl.min(h, axis=axis, keep_dims=True)
    right = _indicator(n_dims, i)
    return tl.where((right ^ flip) != 0, hi, lo)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr):
    """Merge bitonic runs of 2**stage; order 0 ascending, 1 descending, 2 alternating by run."""
    n_dims: tl.constexpr = len(h.shape)
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = tl.full([1] * n_dims, order, tl.int32)
    for s in tl.static_range(stage):
        h = _compare_exchange(h, flip, stage - 1 - s)
    return h


@triton.jit
def _bitonic_topk(x, LOG_T: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K largest keys of each row of x [2**LOG_T, 2**LOG_N], descending: [2**LOG_T, 2**LOG_K]."""
    N_DIMS: tl.constexpr = LOG_T + LOG_N
    if LOG_K == 0:
        out = tl.max(x, axis=1, keep_dims=True)
    else:
        h = tl.reshape(x, [2] * N_DIMS)
        for i in tl.static_range(1, LOG_K + 1):
            h = _bitonic_merge(h, i, 2 if i < LOG_N else 1)
        for i in tl.static_range(LOG_K + 1, LOG_N + 1):
            h = tl.max(h, axis=len(h.shape) - 1 - LOG_K)
            h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else 1)
        out = tl.reshape(h, [1 << LOG_T, 1 << LOG_K])
    return out


@triton.jit
def _row_tile(ptr, rows64, row_stride, col_stride, mask_rows, n_cols, other, BLOCK_T: tl.constexpr,
              BLOCK_E: tl.constexpr, VEC: tl.constexpr, EVEN_E: tl.constexpr, LANES: tl.constexpr):
    """Load ptr[row, col] as a [BLOCK_T, BLOCK_E] tile (``other`` where a row is masked or col >= n_cols).

    LANES >= 1 loads it as [BLOCK_E / (LANES * VEC), BLOCK_T, LANES, VEC] instead: the compiler's coalescing then
    gives each thread VEC contiguous columns and spreads lanes over the LANES chunks of a row and then over rows, so
    a row lives in the registers of LANES threads (1: one thread) and the top-k needs few or no cross-lane
    shuffles (a warp load still covers 32 / LANES rows x LANES * VEC columns). LANES = 0 keeps the default layout.
    """
    if LANES > 0:
        HI: tl.constexpr = BLOCK_E // (LANES * VEC)
        cols4 = (tl.arange(0, HI)[:, None, None, None] * (LANES * VEC) + tl.arange(0, LANES)[None, None, :, None] * VEC
                 + tl.arange(0, VEC)[None, None, None, :])
        offsets = rows64[None, :, None, None] * row_stride + cols4.to(tl.int64) * col_stride
        if EVEN_E:  # a row-only mask keeps VEC-wide vector loads
            mask = tl.broadcast_to(mask_rows[None, :, None, None], [HI, BLOCK_T, LANES, VEC])
        else:
            mask = mask_rows[None, :, None, None] & (cols4 < n_cols)
        x = tl.load(ptr + offsets, mask=mask, other=other)
        x = tl.reshape(tl.permute(x, (1, 0, 2, 3)), [BLOCK_T, BLOCK_E])
    else:
        cols = tl.arange(0, BLOCK_E)
        offsets = rows64[:, None] * row_stride + cols[None, :].to(tl.int64) * col_stride
        if EVEN_E:
            mask = tl.broadcast_to(mask_rows[:, None], [BLOCK_T, BLOCK_E])
        else:
            mask = mask_rows[:, None] & (cols < n_cols)[None, :]
        x = tl.load(ptr + offsets, mask=mask, other=other)
    return x


@triton.jit
def _iterative_topk(keys, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr, KNOCKED):
    """Top TOP_K keys by repeated maxima (descending, [BLOCK_T, BLOCK_K]; columns past TOP_K are KNOCKED)."""
    kcols = tl.arange(0, BLOCK_K)
    chosen = tl.full([BLOCK_T, BLOCK_K], KNOCKED, dtype=keys.dtype)
    for j in tl.static_range(TOP_K):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], KNOCKED, keys)
        chosen = tl.where(kcols[None, :] == j, best[:, None], chosen)
    return chosen


@triton.jit
def _route_fast_fwd_kernel(
    weights_ptr,
    ids_ptr,
    counts_ptr,
    logits_ptr,
    keep_ptr,
    group_ptr,
    stride_t,
    stride_e,
    n_tokens,
    n_experts,
    n_groups,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOG_T: tl.constexpr,
    LOG_K: tl.constexpr,
    IDX_BITS: tl.constexpr,
    WIDE_KEYS: tl.constexpr,
    EVEN_E: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_GROUP: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    FAST_EXP: tl.constexpr,
    SELECT: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    EARLY_DENOM: tl.constexpr,
):
    """weights/ids [T, TOP_K] (contiguous) and counts [G, E] += hits, from logits [T, E] (strided).

    keep: uint8 [G, E] contiguous (HAS_KEEP); group: int32/int64 [T] (HAS_GROUP); counts: int64 [G, E] rows
    ``n_experts`` apart. ``BLOCK_E = 2 ** IDX_BITS >= E`` (EVEN_E: equal); ``BLOCK_K = 2 ** LOG_K`` is the power of two
    at least TOP_K; ``BLOCK_T = 2 ** LOG_T``; WIDE_KEYS selects 64-bit keys (float32 logits); SELECT picks the
    top-k method (module docstring); LANES threads hold a row (0: the compiler's tile layout), VEC columns per
    vector load; EARLY_DENOM computes the softmax denominator before the top-k (one more row max).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_valid = rows < n_tokens
    col_valid = cols < n_experts
    rows64 = rows.to(tl.int64)

    z = _row_tile(logits_ptr, rows64, stride_t, stride_e, row_valid, n_experts, -float("inf"),
                  BLOCK_T, BLOCK_E, VEC, EVEN_E, LANES).to(tl.float32)

    # group ids outside [0, G) are compared in their own dtype (no truncation), then mean "no group"
    if HAS_GROUP:
        graw = tl.load(group_ptr + rows64, mask=row_valid, other=-1)
        in_range = (graw >= 0) & (graw < n_groups)
        grp = tl.where(in_range, graw, -1).to(tl.int32)
    else:
        in_range = row_valid
        grp = tl.where(row_valid, 0, -1)
    if HAS_KEEP:
        if HAS_GROUP:
            kept = _row_tile(keep_ptr, tl.maximum(grp, 0).to(tl.int64), n_experts, 1, row_valid & in_range,
                             n_experts, 1, BLOCK_T, BLOCK_E, VEC, EVEN_E, LANES)
            allowed = kept != 0
        else:
            kept = tl.load(keep_ptr + cols, mask=col_valid, other=0)
            allowed = (kept != 0)[None, :]
        if not EVEN_E:
            allowed = allowed & col_valid[None, :]
    else:
        if EVEN_E:
            allowed = tl.full([1, BLOCK_E], 1, tl.int1)
        else:
            allowed = col_valid[None, :]
    z = tl.where(allowed, z, -float("inf"))

    IDX_MASK: tl.constexpr = BLOCK_E - 1
    code = (IDX_MASK - cols)[None, :]
    ordv = _ordered(z.to(tl.int32, bitcast=True))
    if WIDE_KEYS:
        keys = tl.where(allowed, ordv.to(tl.int64), -2147483648) << IDX_BITS | code
        KNOCKED: tl.constexpr = -9223372036854775807 - 1
        TOP: tl.constexpr = 9223372036854775807
    else:
        keys = tl.where(allowed, ordv, -2147483648) | code
        KNOCKED: tl.constexpr = -2147483647 - 1
        TOP: tl.constexpr = 2147483647

    if EARLY_DENOM:
        # softmax denominator before the top-k, from the row max of the keys: z is dead during the top-k
        row_max = _key_logit(tl.max(keys, axis=1), IDX_BITS, WIDE_KEYS)
        denom = tl.sum(_exp2((z - row_max[:, None]) * LOG2E, FAST_EXP), axis=1)
    if SELECT == 0:
        chosen = _bitonic_topk(keys, LOG_T, IDX_BITS, LOG_K)
    elif SELECT == 1:
        if BLOCK_K == 1:
            chosen = tl.max(keys, axis=1, keep_dims=True)
        else:
            chosen = tl.topk(keys, BLOCK_K, dim=1)
    else:
        chosen = _iterative_topk(keys, BLOCK_T, BLOCK_K, TOP_K, KNOCKED)

    kcols = tl.arange(0, BLOCK_K)
    if not EARLY_DENOM:
        row_max = _key_logit(tl.max(chosen, axis=1), IDX_BITS, WIDE_KEYS)
        denom = tl.sum(_exp2((z - row_max[:, None]) * LOG2E, FAST_EXP), axis=1)
    # NaN or +inf among the allowed logits, or all of them -inf, make the sum (hence the weights) NaN

    FLAT: tl.constexpr = BLOCK_T * BLOCK_K
    flat_key = tl.reshape(chosen, [FLAT])
    flat_max = tl.reshape(tl.broadcast_to(row_max[:, None], [BLOCK_T, BLOCK_K]), [FLAT])
    flat_inv = tl.reshape(tl.broadcast_to((1.0 / denom)[:, None], [BLOCK_T, BLOCK_K]), [FLAT])
    flat_j = tl.arange(0, FLAT) % BLOCK_K
    flat_rows = pid * BLOCK_T + tl.arange(0, FLAT) // BLOCK_K
    weights = _exp2((_key_logit(flat_key, IDX_BITS, WIDE_KEYS) - flat_max) * LOG2E, FAST_EXP) * flat_inv
    if RENORMALIZE:
        picked = tl.reshape(tl.where(flat_j < TOP_K, weights, 0.0), [BLOCK_T, BLOCK_K])
        weights = weights * tl.reshape(
            tl.broadcast_to((1.0 / tl.sum(picked, axis=1))[:, None], [BLOCK_T, BLOCK_K]), [FLAT]
        )
    ids = tl.minimum((~flat_key & IDX_MASK).to(tl.int32), n_experts - 1)
    out_offsets = flat_rows.to(tl.int64) * TOP_K + flat_j
    out_mask = (flat_rows < n_tokens) & (flat_j < TOP_K)
    tl.store(weights_ptr + out_offsets, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, ids.to(tl.int64), mask=out_mask)

    if HAS_COUNTS:
        # keys are distinct, so the chosen ones are exactly those >= the row's TOP_K-th key
        kth = tl.min(tl.where(kcols[None, :] < TOP_K, chosen, TOP), axis=1)
        hit = keys >= kth[:, None]
        NO_GROUP: tl.constexpr = 2147483647
        pending = row_valid & (grp >= 0)
        g = tl.min(tl.where(pending, grp, NO_GROUP), axis=0)
        while g < NO_GROUP:
            in_group = pending & (grp == g)
            hits = tl.sum((hit & in_group[:, None]).to(tl.int32), axis=0)
            tl.atomic_add(
                counts_ptr + g.to(tl.int64) * n_experts + cols, hits.to(tl.int64),
                mask=col_valid & (hits > 0), sem="relaxed",
            )
            pending = pending & (grp != g)
            g = tl.min(tl.where(pending, grp, NO_GROUP), axis=0)
