"""Triton kernels of the fused router op: masked softmax + top-k + per-group expert counts, and its backward.

Pure compute; the launchers live in :mod:`moe_fastmask.ops.triton_route`.

Forward layout: one program owns a tile of ``BLOCK_T`` tokens x ``BLOCK_E`` (= next power of two of E) experts in
registers. Each logit is read once; weights and ids are written once, from the flattened ``[BLOCK_T * BLOCK_K]``
output tile (one contiguous range per program); counts are reduced to one histogram per (tile, group) before one
atomic per touched (group, expert), so a hot expert costs one atomic per tile, not one per token.

Tie rule (the same in every backend of ``route``): experts are ordered by their masked logit, highest first — every
expert a token may use ranks above every masked expert (even an allowed logit of -inf), -0.0 equals +0.0, and equal
logits go to the lower expert index. Ordering by the logit is ordering by the weight wherever the weights differ; it
also decides between logits whose float32 weights are equal (within rounding, or underflowed to 0) the same way on
every backend, independently of how each computes ``exp``.

Top-k runs on sortable integer keys: the fp32 logit's bits (-0.0 made +0.0) mapped to a signed integer of the same
order, with the low ``IDX_BITS`` bits replaced by ``BLOCK_E - 1 - e``; masked experts get a key below that of -inf.
One integer max per step then gives both the winner and its index, and equal logits go to the lower expert index.
For 16-bit logits the fp32 value has at least 13 zero low bits, so a 32-bit key holds the logit exactly; float32
logits use 64-bit keys (logit bits above, index below). The weight of a chosen expert is recomputed from the logit the
key holds, ``exp(z - max) / sum``, in fp32 (0 for a masked expert).

Group ids outside ``[-1, G)`` are treated as -1 (no mask, not counted): no id makes a kernel read or write outside
``keep`` or ``counts``.

Router variants (constexpr ``SCORING``: 0 softmax, 1 softmax over the chosen experts only, 2 sigmoid) live in small
helpers so they carry over to another forward: :func:`_selection_values` (what the top-k orders: the logit, or
``sigmoid(z) + bias`` limited to the kept groups by :func:`_group_limit`), :func:`_variant_weights` (the weights of
the chosen experts) and :func:`_variant_grad` (the backward). Sigmoid selection values are full fp32 values, so that
variant always uses 64-bit keys.
"""

if __name__ != "moe_fastmask.kernels.route":
    raise ImportError("moe_fastmask's Triton kernels are importable only as 'moe_fastmask.kernels.route'")

import triton
import triton.language as tl


@triton.jit
def _flip_sign_order(bits):
    """Map fp32 bits (as int32) to an int32 with the same order as the floats (an involution on int32)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _masked_logits(
    logits_ptr,
    keep_ptr,
    group_ptr,
    rows,
    cols,
    row_valid,
    col_valid,
    stride_t,
    stride_e,
    n_experts,
    n_groups,
    HAS_KEEP: tl.constexpr,
    HAS_GROUP: tl.constexpr,
):
    """Load a [BLOCK_T, BLOCK_E] logits tile as fp32; masked-out, padding and out-of-range entries are -inf.

    Also returns each row's group id (int32; 0 when there is no group tensor, -1 for rows past T and for ids outside
    [-1, n_groups)) and the [BLOCK_T, BLOCK_E] allowed flags (False for masked experts and padding).
    """
    rows64 = rows.to(tl.int64)
    tile_valid = row_valid[:, None] & col_valid[None, :]
    offsets = rows64[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e
    z = tl.load(logits_ptr + offsets, mask=tile_valid, other=-float("inf")).to(tl.float32)
    if HAS_GROUP:
        # range-checked in the ids' own width (an int64 id is not truncated into range first)
        raw = tl.load(group_ptr + rows64, mask=row_valid, other=-1)
        grp = tl.where((raw >= 0) & (raw < n_groups), raw, -1).to(tl.int32)
    else:
        grp = tl.where(row_valid, 0, -1)
    allowed = tile_valid
    if HAS_KEEP:
        if HAS_GROUP:
            keep_rows = tl.maximum(grp, 0)
            keep_offsets = keep_rows[:, None].to(tl.int64) * n_experts + cols[None, :]
            kept = tl.load(keep_ptr + keep_offsets, mask=tile_valid, other=0)
            allowed = tile_valid & ((kept != 0) | (grp < 0)[:, None])
        else:
            kept = tl.load(keep_ptr + cols, mask=col_valid, other=0)
            allowed = tile_valid & (kept != 0)[None, :]
        z = tl.where(allowed, z, -float("inf"))
    return z, grp, allowed


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    """2 ** x in fp32; FAST_EXP uses the flush-to-zero hardware approximation (CUDA only)."""
    if FAST_EXP:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _sigmoid(x, FAST_EXP: tl.constexpr):
    """1 / (1 + exp(-x)) in fp32: 0 at -inf, 1 at +inf."""
    return 1.0 / (1.0 + _exp2(-x * 1.4426950408889634, FAST_EXP))


@triton.jit
def _group_limit(
    values,
    allowed,
    cols,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """DeepSeek-V3's group limit on a [BLOCK_T, BLOCK_E] tile of selection values: -inf outside each row's kept groups.

    Group g holds experts [g * GROUP_SIZE, (g + 1) * GROUP_SIZE) and scores the sum of its two highest allowed
    values (masked experts count as -inf; an exact tie for the highest counts twice). The TOPK_GROUP best groups are
    kept, equal scores going to the lower group index (-0.0 == +0.0 under float comparison).
    """
    gcols = tl.arange(0, BLOCK_G)
    group_of = cols // GROUP_SIZE
    scores = tl.full([BLOCK_T, BLOCK_G], -float("inf"), tl.float32)
    for g in tl.static_range(N_GROUP):
        v = tl.where(allowed & (group_of == g)[None, :], values, -float("inf"))
        first = tl.max(v, axis=1)
        n_first = tl.sum((v == first[:, None]).to(tl.int32), axis=1)
        below = tl.max(tl.where(v < first[:, None], v, -float("inf")), axis=1)
        second = tl.where(n_first >= 2, first, below)
        scores = tl.where(gcols[None, :] == g, (first + second)[:, None], scores)
    # iterative top-TOPK_GROUP of the group scores; padding groups start out taken
    taken = tl.broadcast_to((gcols >= N_GROUP)[None, :], [BLOCK_T, BLOCK_G])
    kept = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(tl.where(taken, -float("inf"), scores), axis=1)
        pick = tl.min(tl.where((~taken) & (scores == best[:, None]), gcols[None, :], BLOCK_G), axis=1)
        hit = gcols[None, :] == pick[:, None]
        taken = taken | hit
        kept = kept | hit
    in_kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for g in tl.static_range(N_GROUP):
        kept_g = tl.sum((kept & (gcols[None, :] == g)).to(tl.int32), axis=1) > 0
        in_kept = in_kept | (kept_g[:, None] & (group_of == g)[None, :])
    return tl.where(in_kept, values, -float("inf"))


@triton.jit
def _selection_values(
    z,
    allowed,
    cols,
    col_valid,
    bias_ptr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    FAST_EXP: tl.constexpr,
):
    """What the top-k orders, from the masked fp32 logits ``z``: ``z`` itself for the softmax variants; for sigmoid
    ``sigmoid(z) + bias``, -inf outside the kept groups when N_GROUP > 1 (masked experts get their key later)."""
    if SCORING == 2:
        values = _sigmoid(z, FAST_EXP)
        if HAS_BIAS:
            values = values + tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
        if N_GROUP > 1:
            values = _group_limit(
                values, allowed, cols, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_T, BLOCK_E, BLOCK_G
            )
        return values
    else:
        return z


@triton.jit
def _variant_weights(
    flat_logit,
    flat_max,
    flat_inv,
    flat_allowed,
    flat_j,
    scale,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCORING: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    FAST_EXP: tl.constexpr,
):
    """Weights of the chosen experts on the flattened [BLOCK_T * BLOCK_K] tile, in fp32.

    flat_logit: each chosen expert's logit; flat_max / flat_inv: the row's max allowed logit and 1 / softmax
    denominator (softmax; flat_inv is 1 for softmax_chosen); flat_allowed: False for a chosen masked expert (weight 0).
    softmax: exp(z - max) / sum; softmax_chosen: the same over the chosen experts; sigmoid: sigmoid(z), renormalised
    as s / (sum + 1e-20). Then times ``scale``.
    """
    FLAT: tl.constexpr = BLOCK_T * BLOCK_K
    if SCORING == 2:
        weights = tl.where(flat_allowed, _sigmoid(flat_logit, FAST_EXP), 0.0)
        if RENORMALIZE:
            picked = tl.reshape(tl.where(flat_j < TOP_K, weights, 0.0), [BLOCK_T, BLOCK_K])
            inv = 1.0 / (tl.sum(picked, axis=1) + 1e-20)
            weights = weights * tl.reshape(tl.broadcast_to(inv[:, None], [BLOCK_T, BLOCK_K]), [FLAT])
    else:
        weights = _exp2((flat_logit - flat_max) * 1.4426950408889634, FAST_EXP) * flat_inv
        # a masked expert (chosen only when fewer than TOP_K are allowed) weighs 0, NaN in a NaN row, like the softmax
        weights = tl.where(flat_allowed, weights, 0.0 * flat_inv)
        if RENORMALIZE or SCORING == 1:
            picked = tl.reshape(tl.where(flat_j < TOP_K, weights, 0.0), [BLOCK_T, BLOCK_K])
            weights = weights * tl.reshape(
                tl.broadcast_to((1.0 / tl.sum(picked, axis=1))[:, None], [BLOCK_T, BLOCK_K]), [FLAT]
            )
    return weights * scale


@triton.jit
def _variant_grad(
    z,
    scattered,
    picked,
    scale,
    SCORING: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    FAST_EXP: tl.constexpr,
):
    """Gradient w.r.t. the masked fp32 logits ``z`` [BLOCK_T, BLOCK_E] of the chosen weights, given the incoming
    gradient scattered to the chosen experts (``scattered``) and their positions (``picked``).

    softmax: with p the masked softmax, dz = p * (Gs - sum Gs p); renormalised (and softmax_chosen) w = p / sum(p
    over chosen) on the chosen experts and dz = w * (Gs - sum Gs w) there, 0 elsewhere. sigmoid: dz = Gs s (1 - s);
    renormalised, with S = sum s + 1e-20: dz = (Gs - sum Gs s / S) / S * s (1 - s). Then times ``scale``.
    """
    if SCORING == 2:
        s = tl.where(picked, _sigmoid(z, FAST_EXP), 0.0)
        grad = scattered
        if RENORMALIZE:
            total = tl.sum(s, axis=1) + 1e-20
            grad = (grad - (tl.sum(grad * s, axis=1) / total)[:, None]) * (1.0 / total)[:, None]
        grad_logits = tl.where(picked, grad * s * (1.0 - s), 0.0)
    else:
        row_max = tl.max(z, axis=1)
        p = _exp2((z - row_max[:, None]) * 1.4426950408889634, FAST_EXP)
        p = p * (1.0 / tl.sum(p, axis=1))[:, None]
        if RENORMALIZE or SCORING == 1:
            w = tl.where(picked, p, 0.0)
            w = w * (1.0 / tl.sum(w, axis=1))[:, None]
        else:
            w = p
        dot = tl.sum(scattered * w, axis=1)
        grad_logits = w * scattered - w * dot[:, None]  # (w (g - dot) overflows where g and -dot are near the max)
        if RENORMALIZE or SCORING == 1:
            grad_logits = tl.where(picked, grad_logits, 0.0)
    return grad_logits * scale


@triton.jit
def _key_logit(key, IDX_BITS: tl.constexpr, WIDE_KEYS: tl.constexpr):
    """The fp32 logit a sortable key holds (exact: its index bits were zero in the logit)."""
    if WIDE_KEYS:
        return _flip_sign_order((key >> IDX_BITS).to(tl.int32)).to(tl.float32, bitcast=True)
    else:
        HIGH_MASK: tl.constexpr = -(1 << IDX_BITS)
        return (_flip_sign_order(key) & HIGH_MASK).to(tl.float32, bitcast=True)


@triton.jit
def _route_fwd_kernel(
    weights_ptr,
    ids_ptr,
    counts_ptr,
    logits_ptr,
    keep_ptr,
    group_ptr,
    bias_ptr,
    stride_t,
    stride_e,
    n_tokens,
    n_experts,
    n_groups,
    scale,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX_BITS: tl.constexpr,
    WIDE_KEYS: tl.constexpr,
    EVEN_E: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_GROUP: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    FAST_EXP: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """weights/ids [T, TOP_K] (contiguous) and counts [G, E] += hits, from logits [T, E] (strided).

    keep: uint8 [G, E] contiguous (HAS_KEEP); group: int32/int64 [T], ids outside [-1, G) act as -1 (HAS_GROUP);
    counts: int64 [G, E]; G = n_groups. ``BLOCK_E = 2 ** IDX_BITS >= E`` (EVEN_E: equal); WIDE_KEYS selects 64-bit
    keys (float32 logits, or sigmoid scoring). bias: float [E] (HAS_BIAS); the variant constexprs are those of
    :func:`_selection_values` and :func:`_variant_weights`.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_valid = rows < n_tokens
    col_valid = cols < n_experts

    z, grp, allowed = _masked_logits(
        logits_ptr, keep_ptr, group_ptr, rows, cols, row_valid, col_valid, stride_t, stride_e, n_experts, n_groups,
        HAS_KEEP, HAS_GROUP,
    )

    # Sortable keys (the tie rule of the module docstring). -0.0 becomes +0.0; negative NaNs sort as -inf (their
    # row's weights are NaN anyway); masked experts hold MASKED, below the key of an allowed -inf; padding experts and
    # chosen experts hold KNOCKED, below every other key, so they are never picked.
    IDX_MASK: tl.constexpr = BLOCK_E - 1
    HIGH_MASK: tl.constexpr = -BLOCK_E
    FLIP_NEG_INF: tl.constexpr = -2139095041  # _flip_sign_order of the bits of -inf
    code = (IDX_MASK - cols)[None, :]
    sel = _selection_values(
        z, allowed, cols, col_valid, bias_ptr, SCORING, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SIZE,
        BLOCK_T, BLOCK_E, BLOCK_G, FAST_EXP,
    )
    z_key = tl.where(sel == 0.0, 0.0, sel)
    ordered = tl.maximum(_flip_sign_order(z_key.to(tl.int32, bitcast=True)), FLIP_NEG_INF)
    if WIDE_KEYS:
        KNOCKED: tl.constexpr = -9223372036854775807 - 1
        MASKED: tl.constexpr = KNOCKED + BLOCK_E
        LOWEST_ALLOWED: tl.constexpr = FLIP_NEG_INF * BLOCK_E
        keys = (ordered.to(tl.int64) << IDX_BITS) | code
        masked_keys = MASKED | code.to(tl.int64)
    else:
        KNOCKED: tl.constexpr = -2147483647 - 1
        MASKED: tl.constexpr = KNOCKED + BLOCK_E
        LOWEST_ALLOWED: tl.constexpr = FLIP_NEG_INF & HIGH_MASK
        keys = (ordered & HIGH_MASK) | code
        masked_keys = MASKED | code
    keys = tl.where(allowed, keys, masked_keys)
    if not EVEN_E:
        keys = tl.where(col_valid[None, :], keys, KNOCKED)

    # Iterative top-k: one integer max per pick, then knock the winner out. The first pick is the row max.
    kcols = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=keys.dtype)
    row_max = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], KNOCKED, keys)
        chosen = tl.where(kcols[None, :] == j, best[:, None], chosen)
        if j == 0:
            # a row without any allowed expert (only with unvalidated masks) has max -inf: NaN weights
            row_max = tl.where(best >= LOWEST_ALLOWED, _key_logit(best, IDX_BITS, WIDE_KEYS), -float("inf"))
    if SCORING == 0:
        # NaN or +inf among the allowed logits, or all of them -inf, make the sum (hence the weights) NaN
        denom = tl.sum(_exp2((z - row_max[:, None]) * LOG2E, FAST_EXP), axis=1)
    else:
        denom = tl.full([BLOCK_T], 1.0, tl.float32)

    # Epilogue on the flattened [BLOCK_T * BLOCK_K] tile: the per-row values above are replicated across the
    # threads that share a row; flattening hands each output element to one thread, then stores stay coalesced.
    FLAT: tl.constexpr = BLOCK_T * BLOCK_K
    flat_key = tl.reshape(chosen, [FLAT])
    flat_max = tl.reshape(tl.broadcast_to(row_max[:, None], [BLOCK_T, BLOCK_K]), [FLAT])
    flat_inv = tl.reshape(tl.broadcast_to((1.0 / denom)[:, None], [BLOCK_T, BLOCK_K]), [FLAT])
    flat_j = tl.arange(0, FLAT) % BLOCK_K
    flat_rows = pid * BLOCK_T + tl.arange(0, FLAT) // BLOCK_K
    ids = tl.minimum((~flat_key & IDX_MASK).to(tl.int32), n_experts - 1)
    out_offsets = flat_rows.to(tl.int64) * TOP_K + flat_j
    out_mask = (flat_rows < n_tokens) & (flat_j < TOP_K)
    if SCORING != 0:
        # sigmoid: the key holds the selection value; softmax over the chosen: a chosen negative NaN's key is -inf's,
        # and its weight must come out NaN. So read the chosen experts' logits back (k values per row, cached)
        flat_logit = tl.load(
            logits_ptr + flat_rows.to(tl.int64) * stride_t + ids.to(tl.int64) * stride_e, mask=out_mask, other=0.0
        ).to(tl.float32)
    else:
        flat_logit = _key_logit(flat_key, IDX_BITS, WIDE_KEYS)
    weights = _variant_weights(
        flat_logit, flat_max, flat_inv, flat_key >= LOWEST_ALLOWED, flat_j, scale,
        TOP_K, BLOCK_T, BLOCK_K, SCORING, RENORMALIZE, FAST_EXP,
    )
    tl.store(weights_ptr + out_offsets, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, ids.to(tl.int64), mask=out_mask)

    if HAS_COUNTS:
        # chosen experts are the knocked-out real columns; histogram per group inside the tile, then few atomics
        hit = keys == KNOCKED
        if not EVEN_E:
            hit = hit & col_valid[None, :]
        if HAS_GROUP:
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
        else:
            hits = tl.sum((hit & row_valid[:, None]).to(tl.int32), axis=0)
            tl.atomic_add(counts_ptr + cols, hits.to(tl.int64), mask=col_valid & (hits > 0), sem="relaxed")


@triton.jit
def _route_bwd_kernel(
    grad_logits_ptr,
    grad_weights_ptr,
    logits_ptr,
    keep_ptr,
    group_ptr,
    ids_ptr,
    stride_t,
    stride_e,
    n_tokens,
    n_experts,
    n_groups,
    scale,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_GROUP: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    FAST_EXP: tl.constexpr,
    SCORING: tl.constexpr,
):
    """grad_logits [T, E] (contiguous, logits' dtype) from grad_weights [T, TOP_K] and ids [T, TOP_K] (contiguous).

    Gs is the incoming gradient scattered to the chosen experts; the formula of each variant is in
    :func:`_variant_grad`.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_valid = rows < n_tokens
    col_valid = cols < n_experts

    z, grp, allowed = _masked_logits(
        logits_ptr, keep_ptr, group_ptr, rows, cols, row_valid, col_valid, stride_t, stride_e, n_experts, n_groups,
        HAS_KEEP, HAS_GROUP,
    )
    rows64 = rows.to(tl.int64)
    scattered = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    picked = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + rows64 * TOP_K + j, mask=row_valid, other=-1).to(tl.int32)
        grad = tl.load(grad_weights_ptr + rows64 * TOP_K + j, mask=row_valid, other=0.0).to(tl.float32)
        at = cols[None, :] == expert[:, None]
        scattered = tl.where(at, grad[:, None], scattered)
        picked = picked | at

    grad_logits = _variant_grad(z, scattered, picked, scale, SCORING, RENORMALIZE, FAST_EXP)

    offsets = rows64[:, None] * n_experts + cols[None, :]
    tl.store(
        grad_logits_ptr + offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )
