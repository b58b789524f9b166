"""The CUDA kernel of ``route`` (``backend="cuda"``, ``csrc/route_cuda.cu``) against the PyTorch reference, and its
loader's behaviour on machines where it cannot run.

GPU tests (marked ``gpu``) skip without a CUDA device or without ``nvcc``; a build that fails where both exist fails
them with the compiler's message. The CPU tests check the loader (disabled by its environment variable, unavailable
without CUDA), the dispatch (calls the kernel does not cover go to Triton or the reference without an error), and,
where ``nvcc`` exists, that the source compiles into a library whose launcher matches the Python side.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import cuda_emulation
from conftest import SESSION_SEED, start_sm90_build
from route_cases import (
    POISON_ID,
    VARIANTS,
    adversarial_logits,
    matching_rows,
    recount,
    tolerance,
    variant_kwargs,
)

from moe_fastmask import route
from moe_fastmask.ops import cuda_route, reference, resolve_backend, triton_route

route_module = importlib.import_module("moe_fastmask.ops.route")

INF = math.inf
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POISON_COUNT = 0x5A5A5A5A
HAS_CUDA = torch.cuda.is_available()

gpu = pytest.mark.gpu


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------


KINDS = ("distinct", "normal", "wide", "ties", "bf16_quantised", "signed_zeros", "subnormal", "neg_inf")


def make_keep(G: int, E: int, k: int, tight: bool, gen: torch.Generator) -> torch.Tensor:
    """Bool [G, E]: each group keeps exactly k (tight) or a random number >= k of experts."""
    keep = torch.zeros(G, E, dtype=torch.bool)
    for g in range(G):
        n = k if tight else int(torch.randint(k, E + 1, (1,), generator=gen))
        keep[g, torch.randperm(E, generator=gen)[:n]] = True
    return keep


def run_cuda(logits, top_k, keep, group, counts, renormalize, prefetch=None, variant=None, ablation=None, **knobs):
    """The kernel on poisoned outputs: (weights, ids)."""
    T = logits.shape[0]
    weights = torch.full((T, top_k), float("nan"), dtype=logits.dtype, device=logits.device)
    ids = torch.full((T, top_k), POISON_ID, dtype=torch.int64, device=logits.device)
    cuda_route.route_forward(logits, top_k, keep, group, counts, renormalize, out=(weights, ids), prefetch=prefetch,
                             variant=variant, _ablation=ablation, **knobs)
    torch.cuda.synchronize()
    return weights, ids


def kernel_configs(logits, top_k, keep):
    """(prefetch, variant) pairs to check a call on: the split kernel's two instances, and the lane kernel where it
    takes the call (elsewhere it runs the split kernel)."""
    configs = [(True, "split"), (False, "split")]
    if cuda_route.lane_takes(logits, top_k, keep):
        configs.append((None, "lane"))
    return configs


def check_against_reference(logits, top_k, keep=None, group=None, num_groups=1, renormalize=False, counts=True,
                            where=""):
    for prefetch, variant in kernel_configs(logits, top_k, keep):
        _check_against_reference(logits, top_k, keep, group, num_groups, renormalize, counts,
                                 f"{where} prefetch={prefetch} variant={variant}", prefetch, variant)


def assert_matches_reference(weights, ids, counts, start, logits, top_k, keep, group, renormalize, where,
                             variant=None):
    """A kernel's outputs against the reference on the same call: ids exact, counts (the kernel's, which started at
    ``start``; both None without counts) exact, weights within tolerance with NaN exactly where the reference has
    NaN. Ids outside [0, G) act as -1 in every backend; the reference's own handling is the oracle. ``variant``:
    route's router-variant arguments; with sigmoid scoring (selection values from each backend's own exp) a row may
    choose other experts of the same selection values within rounding (route_cases.matching_rows), as many allowed
    ones, each once; counts are then those of the kernel's own ids, and weights are compared on the matching rows."""
    variant = variant or {}
    ref_counts = None if start is None else start.clone()
    ref_w, ref_ids = reference.route_reference(logits, top_k, keep, group, ref_counts, renormalize, **variant)
    same = torch.ones(ids.shape[0], dtype=torch.bool)
    if variant.get("scoring") == "sigmoid":
        T, E = logits.shape
        allowed = reference.allowed_experts(T, keep, group)
        allowed = torch.ones(T, E, dtype=torch.bool) if allowed is None else allowed
        assert bool(((ids >= 0) & (ids < E)).all()), f"ids out of range; {where}"
        assert torch.equal(allowed.gather(1, ids).sum(1), allowed.gather(1, ref_ids).sum(1)), f"masked picks; {where}"
        assert all(len(set(row)) == top_k for row in ids.tolist()), f"an expert chosen twice; {where}"
        same = matching_rows(ids, ref_ids, logits, allowed, variant, exact=False, where=where)
        if counts is not None:
            assert torch.equal(counts - start, recount(ids, group, counts.shape[0], E)), f"counts differ; {where}"
    else:
        bad = (ids != ref_ids).any(1).nonzero().flatten().tolist()
        assert not bad, f"ids differ; {where} rows {bad[:6]}: {ids[bad[:2]].tolist()} vs {ref_ids[bad[:2]].tolist()}"
        if counts is not None:
            assert torch.equal(counts, ref_counts), f"counts differ; {where}"
    weights, ref_w = weights[same], ref_w[same]
    nan = ref_w.isnan()
    assert torch.equal(weights.isnan(), nan), f"NaN pattern differs; {where}"
    atol, rtol = tolerance(logits.dtype)
    torch.testing.assert_close(weights[~nan], ref_w[~nan], atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")


def _check_against_reference(logits, top_k, keep, group, num_groups, renormalize, counts, where, prefetch, variant):
    """ids and counts exact, weights within tolerance (NaN exactly where the reference has NaN)."""
    T, E = logits.shape
    start = torch.randint(0, 1000, (num_groups, E), dtype=torch.int64, device=logits.device) if counts else None
    counts_cuda = start.clone() if counts else None
    weights, ids = run_cuda(logits, top_k, keep, group, counts_cuda, renormalize, prefetch, variant)
    assert_matches_reference(weights, ids, counts_cuda, start, logits, top_k, keep, group, renormalize, where)
    if counts and prefetch is not False and T <= 300:  # an independent per-token recount (a Python loop: small T only)
        cpu_group = None if group is None else group.cpu()
        assert torch.equal((counts_cuda - start).cpu(), recount(ids, cpu_group, num_groups, E)), where


# --------------------------------------------------------------------------------------------------------------
# GPU: the kernel against the reference
# --------------------------------------------------------------------------------------------------------------

# (24, 60 and 120 experts of 16-bit logits, top_k <= 8: the lane kernel's padded rows, E_PAD = 32, 64 and 128)
SHAPES = [(8, 1), (8, 2), (8, 8), (16, 4), (16, 16), (24, 8), (32, 8), (60, 4), (60, 8), (64, 1), (64, 8), (64, 16),
          (100, 10), (120, 8), (128, 8), (128, 16), (5, 3), (256, 8), (256, 16), (12, 12), (1, 1), (200, 16)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E, k", SHAPES, ids=[f"E{e}-k{k}" for e, k in SHAPES])
def test_random_shapes_against_reference(cuda_kernel, E, k, dtype):
    gen = torch.Generator().manual_seed(SESSION_SEED + E * 131 + k)
    rng = random.Random(SESSION_SEED + E + k)
    for T in (1, 7, 33, 257, 1000, 4099):
        with_groups = rng.random() < 0.7
        G = rng.choice([1, 2, 5]) if with_groups else 1  # without group ids every token is group 0
        mask = rng.choice(["none", "loose", "tight"])
        keep = None if mask == "none" else make_keep(G, E, k, mask == "tight", gen).cuda()
        group = torch.randint(-1, G, (T,), generator=gen).cuda() if with_groups else None
        renorm = rng.random() < 0.5
        logits = adversarial_logits("distinct", T, E, dtype, gen).cuda()
        check_against_reference(logits, k, keep, group, G, renorm, where=f"T={T} E={E} k={k} {dtype} mask={mask}")


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_values_against_reference(cuda_kernel, kind, dtype):
    gen = torch.Generator().manual_seed(SESSION_SEED + hash(kind) % 1000)
    for E, k in ((64, 8), (60, 8), (8, 2), (128, 16), (16, 16), (32, 4), (128, 8), (120, 8), (24, 4)):
        for tight in (False, True):
            G, T = 3, 517
            logits = adversarial_logits(kind, T, E, dtype, gen).cuda()
            keep = make_keep(G, E, k, tight, gen).cuda()
            group = torch.randint(-1, G, (T,), generator=gen).cuda()
            for renorm in (False, True):
                check_against_reference(logits, k, keep, group, G, renorm,
                                        where=f"{kind} E={E} k={k} {dtype} tight={tight} renorm={renorm}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E, k", [(512, 8), (512, 16), (300, 10), (257, 1)], ids=lambda v: str(v))
def test_wide_routers_of_16_bit_logits(cuda_kernel, E, k, dtype):
    """Up to 512 experts of 16-bit logits run the split kernel (a row over a whole warp); float32 rows of more than
    256 experts do not (they go to Triton)."""
    assert cuda_route.supports(torch.empty(1, E, dtype=dtype, device="cuda"), k)
    assert not cuda_route.supports(torch.empty(1, E, dtype=torch.float32, device="cuda"), k)
    gen = torch.Generator().manual_seed(SESSION_SEED + E * 7 + k)
    for kind in ("distinct", "ties", "wide", "neg_inf"):
        for T, tight in ((1, False), (33, True), (1000, False)):
            G = 3
            logits = adversarial_logits(kind, T, E, dtype, gen).cuda()
            keep = make_keep(G, E, k, tight, gen).cuda()
            group = torch.randint(-1, G, (T,), generator=gen).cuda()
            for renorm in (False, True):
                check_against_reference(logits, k, keep, group, G, renorm,
                                        where=f"{kind} T={T} E={E} k={k} {dtype} tight={tight} renorm={renorm}")


@gpu
def test_tie_rule_examples(cuda_kernel):
    cases = [
        ([[-0.0, 0.0, -1.0]], 1, None, [[0]]),
        ([[0.0, -0.0, -1.0]], 1, None, [[0]]),
        ([[0.0, 1e-8, -5.0]], 1, None, [[1]]),
        ([[1e-8, 0.0, -5.0]], 2, None, [[0, 1]]),
        ([[0.3, -0.2, 1.0, -INF]], 2, [[False, False, True, True]], [[2, 3]]),
        ([[3.0, -INF, 2.0, -INF, 1.0, -INF]], 3, [[False, True, False, True, False, True]], [[1, 3, 5]]),
        ([[4.0, 3.0, -50.0, 2.0, 1.0]], 3, [[False, False, True, False, False]], [[2, 0, 1]]),
    ]
    for dtype in DTYPES:
        for rows, k, keep, expected in cases:
            if dtype == torch.float16 and 1e-8 in rows[0]:
                continue  # 1e-8 is 0 in float16
            logits = torch.tensor(rows, dtype=dtype, device="cuda")
            keep_t = None if keep is None else torch.tensor(keep, device="cuda")
            counts = torch.zeros(1, logits.shape[1], dtype=torch.int64, device="cuda")
            weights, ids = run_cuda(logits, k, keep_t, None, counts, False)
            assert ids.tolist() == expected, (rows, keep, dtype)
            if dtype != torch.float32:  # the lane kernel on the same rows, padded to 32 experts
                padded = torch.full((1, 32), -INF, dtype=dtype, device="cuda")
                padded[:, : logits.shape[1]] = logits
                keep_p = torch.zeros(1, 32, dtype=torch.bool, device="cuda")
                keep_p[:, : logits.shape[1]] = True if keep_t is None else keep_t
                assert cuda_route.lane_takes(padded, k, keep_p)
                _, lane_ids = run_cuda(padded, k, keep_p, None, None, False, variant="lane")
                assert lane_ids.tolist() == expected, (rows, keep, dtype, "lane")
            assert counts.cpu().squeeze(0).tolist() == [int(e in expected[0]) for e in range(logits.shape[1])]
    # the all--inf row: NaN weights; fewer allowed than k: the masked ones weigh 0
    w, _ = run_cuda(torch.tensor([[3.0, -INF, 2.0, -INF]], device="cuda"), 2,
                    torch.tensor([[False, True, False, True]], device="cuda"), None, None, False)
    assert bool(w.isnan().all())
    w, _ = run_cuda(torch.tensor([[4.0, 3.0, -50.0, 2.0]], device="cuda"), 3,
                    torch.tensor([[False, False, True, False]], device="cuda"), None, None, True)
    assert w.tolist() == [[1.0, 0.0, 0.0]]


@gpu
@pytest.mark.parametrize("group_dtype", [torch.int64, torch.int32], ids=str)
def test_out_of_range_groups_never_read_or_written(cuda_kernel, group_dtype):
    """validate=False: ids outside [-1, G) act as -1; counts is a view into a poisoned buffer that stays poisoned."""
    G, E, k = 2, 64, 8
    bad = [3, 1000, -2, 2**31 - 1, -(2**31)] + ([2**32 + 1, -(2**40)] if group_dtype == torch.int64 else [])
    group = torch.tensor(([0, 1, -1, 1, 0] + bad) * 37, dtype=group_dtype, device="cuda")
    T = group.numel()
    gen = torch.Generator().manual_seed(SESSION_SEED)
    for dtype in DTYPES:
        logits = torch.randn(T, E, generator=gen).to(dtype).cuda()
        keep = make_keep(G, E, k, False, gen).cuda()
        buffer = torch.full((G + 2, E), POISON_COUNT, dtype=torch.int64, device="cuda")
        counts = buffer[1 : G + 1]
        counts.zero_()
        weights, ids = route(logits, k, keep, group, counts, True, "cuda", validate=False)
        torch.cuda.synchronize()
        assert (buffer[0] == POISON_COUNT).all() and (buffer[G + 1] == POISON_COUNT).all()
        as_minus_one = torch.where((group >= 0) & (group < G), group, -1).long()
        ref_counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        ref_w, ref_ids = reference.route_reference(logits, k, keep, as_minus_one, ref_counts, True)
        assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts), dtype
        torch.testing.assert_close(weights, ref_w, atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])


@gpu
@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset"])
def test_strided_and_misaligned_logits(cuda_kernel, layout):
    """Any strides: column-major views, rows of a wider tensor, a storage offset that breaks 16-byte alignment."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 5)
    for dtype in DTYPES:
        base = torch.randn(300, 65, generator=gen).to(dtype).cuda()
        if layout == "transposed":
            logits = base[:, :64].t().contiguous().t()
        elif layout == "sliced":
            logits = base[:, :64]
        else:
            logits = base.view(-1)[1 : 1 + 299 * 64].view(299, 64)
        keep = make_keep(2, 64, 8, False, gen).cuda()
        group = torch.randint(-1, 2, (logits.shape[0],), generator=gen).cuda()
        check_against_reference(logits, 8, keep, group, 2, True, where=f"{layout} {dtype}")


@gpu
def test_skewed_load_and_many_groups_count_exactly(cuda_kernel):
    """Every token on the same experts (same-address atomics), and G * E past the shared histogram (global atomics)."""
    E, k, T = 64, 8, 100_000
    logits = torch.full((T, E), -3.0, device="cuda")
    logits[:, 5:13] = 2.0
    for G in (1, 4, 200):
        group = torch.randint(0, G, (T,), device="cuda")
        counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        for dtype, variant in ((torch.bfloat16, "split"), (torch.float32, "split"), (torch.bfloat16, "lane")):
            counts.zero_()
            _, ids = run_cuda(logits.to(dtype), k, None, group, counts, False, variant=variant)
            assert torch.equal(ids, torch.arange(5, 13, device="cuda").expand(T, k))
            expected = torch.zeros(G, E, dtype=torch.int64, device="cuda")
            expected[:, 5:13] = torch.bincount(group, minlength=G)[:, None]
            assert torch.equal(counts, expected), (G, dtype, variant)


@gpu
def test_lane_kernel_options_and_grids_give_the_ops_results(cuda_kernel):
    """Every grid policy and option set of the lane kernel (the benchmark's choices) gives the reference's ids and
    counts and weights within tolerance, on row counts that leave a partial last tile and several tiles per warp;
    the loads-and-stores-only instance under each option set gives the first k experts."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 23)
    E, k, G = 64, 8, 3
    subsets = lane_option_sets()
    for T in (1, 1000, 300_001):
        logits = adversarial_logits("distinct", T, E, torch.bfloat16, gen).cuda()
        keep = make_keep(G, E, k, False, gen).cuda()
        group = torch.randint(-1, G, (T,), generator=gen).cuda()
        ref_counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        ref_w, ref_ids = reference.route_reference(logits, k, keep, group, ref_counts, False)
        for policy, subset in itertools.product(cuda_route.GRID_POLICIES, subsets):
            counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
            w, ids = run_cuda(logits, k, keep, group, counts, False, variant="lane", _grid_policy=policy,
                              _lane_options=subset)
            assert torch.equal(ids, ref_ids), (T, policy, subset)
            assert torch.equal(counts, ref_counts), (T, policy, subset)
            torch.testing.assert_close(w, ref_w, atol=tolerance(w.dtype)[0], rtol=tolerance(w.dtype)[1])
            if "topk8" not in subset and not set(subset) & set(cuda_route.LANE_FULL_KERNEL_OPTIONS):
                _, ids = run_cuda(logits, k, keep, group, None, False, ablation="load_store", _grid_policy=policy,
                                  _lane_options=subset)
                assert torch.equal(ids, torch.arange(k, device="cuda").expand(T, k)), (T, policy, subset)
    with pytest.raises(ValueError, match="_lane_options"):
        cuda_route.route_forward(logits, 4, keep, group, None, False, _lane_options=("topk8",))
    with pytest.raises(ValueError, match="_lane_options"):
        cuda_route.route_forward(logits, k, keep, group, None, False, _lane_options=("fast",))
    for name in cuda_route.LANE_FULL_KERNEL_OPTIONS:
        with pytest.raises(ValueError, match=f"_lane_options '{name}'"):
            cuda_route.route_forward(logits, k, keep, group, None, False, _ablation="load_store", _lane_options=(name,))
    for pair in cuda_route.LANE_EXCLUSIVE_OPTIONS:
        with pytest.raises(ValueError, match="do not combine"):
            cuda_route.route_forward(logits, k, keep, group, None, False, _lane_options=pair)
    with pytest.raises(ValueError, match="_grid_policy"):
        cuda_route.route_forward(logits, k, keep, group, None, False, _grid_policy="all")


def lane_option_sets() -> list[tuple[str, ...]]:
    """Every set of the lane kernel's option names that the launcher takes (none holding an exclusive pair)."""
    names = sorted(cuda_route.LANE_OPTIONS)
    subsets = [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
    return [c for c in subsets if not any(set(pair) <= set(c) for pair in cuda_route.LANE_EXCLUSIVE_OPTIONS)]


def one_pass_softmax_case(gen: torch.Generator):
    """bf16 [T, 64] logits (CPU), a keep mask of 2 groups and group ids around the edges of the lane kernel's one-pass
    softmax denominator (summed against the largest logit of a row's first 8 experts, masked or not): (logits, keep,
    group). Each 32-row warp holds one kind of row among normal ones; see test_one_pass_softmax_edges_and_fallbacks."""
    E, G = 64, 2
    T = 32 * 9 + 3
    logits = torch.randn(T, E, generator=gen)
    keep = torch.ones(G, E, dtype=torch.bool)
    keep[1, :] = False
    keep[1, torch.randperm(E, generator=gen)[:12]] = True
    keep[1, 3] = False  # (a masked expert of the first chunk)
    keep[1, 20] = True
    group = torch.randint(0, G, (T,), generator=gen)
    special = [32 * w + 7 for w in range(9)]
    group[special] = 1
    # warp 0: normal rows only
    # warp 1: a masked logit of the first chunk 100 above the allowed ones: the allowed terms underflow (falls back)
    logits[special[1], 3] = 100.0
    # warp 2: an allowed logit 90 above the first chunk's: its term overflows (falls back)
    logits[special[2], 20] = 90.0
    # warp 3 / 4: a masked +inf / NaN (the sum turns NaN; falls back; the reference ignores them)
    logits[special[3], 3] = float("inf")
    logits[special[4], 3] = float("nan")
    # warp 5: an allowed logit 40 above the first chunk's, and another row's masked one 30 above the allowed ones
    # (both within the one pass's range: 2^58 and 2^-43 terms)
    logits[special[5], 20] = 40.0
    logits[special[5] + 1, 3], group[special[5] + 1] = 30.0, 1
    # warp 6: the first chunk all -inf (masked or not); warp 7: allowed logits near 1e30 (the reference far from 0);
    # warp 8 (partial): an allowed +inf
    logits[special[6], :8] = float("-inf")
    logits[special[7]] = 1.0e30 + logits[special[7]] * 1.0e28
    logits[special[8], 20] = float("inf")
    return logits.to(torch.bfloat16), keep, group


def bf16_from_order(order: torch.Tensor) -> torch.Tensor:
    """bf16 values of given 16-bit orders (the kernel's value order: 0x8000 + bits for a positive value, 0xFFFF - bits
    for a negative one)."""
    bits = torch.where(order >= 0x8000, order - 0x8000, 0xFFFF - order)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)


def packed_window_case(gen: torch.Generator):
    """bf16 [T, 64] logits (CPU) with rows on both sides of the packed top-k's window edge, and its masks: (logits,
    keep, tight_keep, group), see test_packed_top_k_window_edges_and_warp_fallbacks."""
    E, k, G = 64, 8, 3
    T = 32 * 12 + 5  # (a partial last tile)
    window = 1023
    base_logits = torch.randn(T, E, generator=gen)
    keep = make_keep(G, E, k + 1, False, gen)  # (k + 1: every group still keeps k once expert 5 is masked)
    keep[:, 5] = False
    group = torch.randint(0, G, (T,), generator=gen)
    group[224:256] = G  # out of range: unmasked, uncounted
    order = torch.full((T, E), 0, dtype=torch.int64)
    top = 0x8000 + 0x3F80 + int(torch.randint(0, 0x200, (1,), generator=gen))  # a positive largest logit near 1..4
    top_negative = 0x4000 + int(torch.randint(0, 0x200, (1,), generator=gen))  # a negative one near -2..-4
    # warp 0: every row's 8th largest allowed logit at the window's lowest step (inside), with or without the mask
    # warp 1: the same rows, one of them with its 8th largest one step below the window (the warp falls back)
    # warp 2: 8th largest far below (many binades), in every row
    # warps 8 and 9: warps 0 and 1 with every logit negative (the window among the negative values)
    edges = {0: ([1] * 32, top), 1: ([1] * 31 + [0], top), 2: ([-3000] * 32, top), 8: ([1] * 32, top_negative),
             9: ([1] * 31 + [0], top_negative)}
    for w, (edge_offsets, row_top) in edges.items():
        for lane, offset in enumerate(edge_offsets):
            r = 32 * w + lane
            values = torch.randint(row_top - window - 2500, row_top - window - 5, (E,), generator=gen)  # below
            kept = keep[group[r]].nonzero().flatten()
            picks = kept[torch.randperm(len(kept), generator=gen)[:8]]  # (allowed in the row's group)
            values[picks[0]] = row_top
            values[picks[1:7]] = torch.randint(row_top - window + 1, row_top + 1, (6,), generator=gen)
            values[picks[7]] = row_top - window + offset  # offset 1: inside (the lowest step), 0: just below
            order[r] = values
    logits = base_logits.to(torch.bfloat16)
    for w in edges:
        logits[32 * w:32 * w + 32] = bf16_from_order(order[32 * w:32 * w + 32])
    # warp 3: exact ties at the edge and at the top; warp 4: all negative; warp 5: the largest logit masked (huge)
    logits[96:128] = bf16_from_order(torch.randint(top - window, top - window + 3, (32, E), generator=gen))
    logits[128:160] = -logits[128:160].abs() - 0.5
    logits[160:192, 5] = 1.0e30
    # warp 6: NaN in one row, +inf in another, -inf everywhere in a third; warp 7: tight masks (every group keeps 8)
    logits[192, 7] = float("nan")
    logits[200, 9] = float("inf")
    logits[210] = float("-inf")
    tight_keep = make_keep(G, E, k, True, gen)
    return logits, keep, tight_keep, group


def few_kept(tight_keep: torch.Tensor) -> torch.Tensor:
    """``tight_keep`` with its group 1 keeping 5 experts (fewer than k = 8: the packed top-k never tries its rows)."""
    few = tight_keep.clone()
    few[1, few[1].nonzero().flatten()[5:]] = False
    return few


@gpu
def test_packed_top_k_window_edges_and_warp_fallbacks(cuda_kernel):
    """The lane kernel's 16-bit-key top-k (bf16, E=64) keeps each row's picks exact where they fit its window (1023
    order steps below the row's largest logit) and hands the whole warp to the 32-bit keys where one row does not.
    Rows here sit on both sides of the window's edge (among positive and among negative logits), with and without the
    other rows of their warp fitting, with the largest logit masked, all logits negative, fewer allowed experts than
    k (in every group, and in one group only), NaN and +-inf; every layout is checked against the reference."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 29)
    E, k, G = 64, 8, 3
    logits, keep, tight_keep, group = (t.cuda() for t in packed_window_case(gen))
    runs = [(keep, options) for options in (("topk8",), ("topk8", "packed16"), ("topk8", "tournament", "stage_ids"))] + [
        (tight_keep, ("packed16",)), (few_kept(tight_keep), ("topk8", "packed16")), (tight_keep, ("tournament",)),
        (few_kept(tight_keep), ("topk8", "tournament")), (None, None)]
    for i, (keep_r, options) in enumerate(runs):
        where = f"run {i}: options={options}"
        group_r = group.cuda() if keep_r is not None else None
        start = torch.zeros(G, E, dtype=torch.int64, device="cuda") if keep_r is not None else None
        counts = None if start is None else start.clone()
        weights, ids = run_cuda(logits, k, keep_r, group_r, counts, False, variant="lane", _lane_options=options)
        assert_matches_reference(weights, ids, counts, start, logits, k, keep_r, group_r, False, where)


@gpu
def test_timeline_instance_gives_the_ops_results_and_stamps_each_warp(cuda_kernel):
    """route_forward's _timeline runs the op's lane instance with per-warp stamps: the op's results, every warp that
    ran stamped with its round-robin share of the tiles and its stamps in order (check_timeline); a buffer of the
    wrong shape, or other options with it, are refused."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 41)
    T, E, k, G = 32 * 700 + 9, 64, 8, 3
    logits = torch.randn(T, E, generator=gen).to(torch.bfloat16).cuda()
    keep = make_keep(G, E, k, False, gen).cuda()
    group = torch.randint(-1, G, (T,), generator=gen).cuda()
    assert cuda_route.timeline_slots() == TIMELINE_SLOTS
    for options in (None, ("sm_block",)):
        timeline = torch.zeros(8192, TIMELINE_SLOTS, dtype=torch.int64, device="cuda")
        start = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        counts = start.clone()
        weights, ids = cuda_route.route_forward(logits, k, keep, group, counts, False, _timeline=timeline,
                                                _lane_options=options)
        assert_matches_reference(weights, ids, counts, start, logits, k, keep, group, False, f"timeline {options}")
        check_timeline(timeline.cpu(), -(-T // 32))
    with pytest.raises(ValueError, match="_timeline must be"):
        cuda_route.route_forward(logits, k, keep, group, None, False, _timeline=timeline[:, :5].contiguous())
    with pytest.raises(ValueError, match="_timeline runs"):
        cuda_route.route_forward(logits, k, keep, group, None, False, _timeline=timeline, _lane_options=("topk8",))


def test_default_variant_hands_small_128_expert_calls_to_split(monkeypatch):
    """Without an explicit variant, calls with E = 128 under LANE_MIN_TOKENS[128] rows run the split kernel (measured
    faster there), every other call the default variant; $MOE_FASTMASK_CUDA_VARIANT=split takes every call."""
    monkeypatch.delenv(cuda_route.VARIANT_ENV, raising=False)
    cuda_route._variant_default.cache_clear()
    try:
        limit = cuda_route.LANE_MIN_TOKENS[128]
        for dtype in (torch.bfloat16, torch.float16):
            assert cuda_route.default_variant(torch.empty(1, 128, dtype=dtype)) == "split"
            assert cuda_route.default_variant(torch.empty(limit - 1, 128, dtype=dtype)) == "split"
            assert cuda_route.default_variant(torch.empty(limit, 128, dtype=dtype)) == "lane"
            for E in (32, 64):
                assert cuda_route.default_variant(torch.empty(1, E, dtype=dtype)) == "lane"
        monkeypatch.setenv(cuda_route.VARIANT_ENV, "split")
        cuda_route._variant_default.cache_clear()
        assert cuda_route.default_variant(torch.empty(limit, 128, dtype=torch.bfloat16)) == "split"
        assert cuda_route.default_variant(torch.empty(1, 64, dtype=torch.bfloat16)) == "split"
    finally:
        cuda_route._variant_default.cache_clear()


@gpu
def test_128_expert_calls_around_the_size_rule_match_the_reference(cuda_kernel):
    """The op at E = 128 around LANE_MIN_TOKENS[128] (split below, lane with its tournament top-k from it on), top-8
    and top-4, gives the reference's ids and counts and weights within tolerance, as the lane kernel does at the
    small sizes when asked for it."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 43)
    limit, G = cuda_route.LANE_MIN_TOKENS[128], 3
    for T, k in ((limit - 1, 8), (limit, 8), (limit - 1, 4), (limit + 33, 4)):
        logits = adversarial_logits("ties", T, 128, torch.bfloat16, gen).cuda()
        keep = make_keep(G, 128, k, True, gen).cuda()
        group = torch.randint(-1, G, (T,), generator=gen).cuda()
        for variant in (None, "lane"):
            start = torch.zeros(G, 128, dtype=torch.int64, device="cuda")
            counts = start.clone()
            weights, ids = run_cuda(logits, k, keep, group, counts, False, variant=variant)
            assert_matches_reference(weights, ids, counts, start, logits, k, keep, group, False,
                                     f"T={T} k={k} variant={variant}")


@gpu
def test_tournament_top_k_gives_the_ops_results(cuda_kernel):
    """The lane kernel's tournament top-k (option "tournament": each chunk of 8 experts offers its largest key below
    the last pick) gives the reference's ids and counts, and weights within tolerance, on every adversarial kind of
    logits (exact ties, -inf, wide values, NaN), with loose and tight masks and a group keeping fewer than k experts,
    with and without the top_k == 8 instance, renormalised or not."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 41)
    E, k, G, T = 64, 8, 3, 3001
    for kind, tight in itertools.product(KINDS, (False, True)):
        logits = adversarial_logits(kind, T, E, torch.bfloat16, gen).cuda()
        keep = make_keep(G, E, k, tight, gen)
        if tight:
            keep = few_kept(keep)
        keep = keep.cuda()
        group = torch.randint(-1, G, (T,), generator=gen).cuda()
        for options, renormalize in ((("topk8", "tournament", "stage_ids"), False), (("tournament",), True)):
            start = torch.zeros(G, E, dtype=torch.int64, device="cuda")
            counts = start.clone()
            weights, ids = run_cuda(logits, k, keep, group, counts, renormalize, variant="lane",
                                    _lane_options=options)
            assert_matches_reference(weights, ids, counts, start, logits, k, keep, group, renormalize,
                                     f"{kind} tight={tight} options={options}")
    # the op itself takes it for the lane kernel's top-8 calls at E = 64 and 128 (16-bit logits; E = 32 keeps the
    # sorting network) where there are more tiles than two thirds of the warps in a full wave (csrc/route_cuda.cu,
    # tournament_pays: at most 24 warps per SM)
    T = 32 * 24 * torch.cuda.get_device_properties(0).multi_processor_count + 999
    for dtype, E_op in itertools.product((torch.bfloat16, torch.float16), (32, 64, 128)):
        logits = adversarial_logits("normal", T, E_op, dtype, gen).cuda()
        keep = make_keep(G, E_op, k, False, gen).cuda()
        group = torch.randint(-1, G, (T,), generator=gen).cuda()
        for keep_r, group_r in ((keep, group), (None, None)):
            start = torch.zeros(G if keep_r is not None else 1, E_op, dtype=torch.int64, device="cuda")
            counts = start.clone()
            weights, ids = run_cuda(logits, k, keep_r, group_r, counts, False, variant="lane")
            assert_matches_reference(weights, ids, counts, start, logits, k, keep_r, group_r, False,
                                     f"the op at T={T}, E={E_op}, {dtype}, mask={keep_r is not None}")


@gpu
def test_one_pass_softmax_edges_and_fallbacks(cuda_kernel):
    """The lane kernel's softmax denominator summed in the top-k's pass, against the reference and the two-pass
    instance: rows whose terms underflow or overflow against the first chunk's largest logit, masked +inf and NaN,
    a first chunk of -inf, logits near 1e30 and an allowed +inf (each in a warp of normal rows, which fall back with
    it), and rows within the one pass's range; with and without top_k == 8 specialisation, renormalised or not."""
    logits, keep, group = (t.cuda() for t in one_pass_softmax_case(torch.Generator().manual_seed(SESSION_SEED + 31)))
    k, G = 8, 2
    for options, renormalize in itertools.product(((), ("topk8",), ("two_pass_softmax",), ("topk8", "tournament")),
                                                  (False, True)):
        start = torch.zeros(G, 64, dtype=torch.int64, device="cuda")
        counts = start.clone()
        weights, ids = run_cuda(logits, k, keep, group, counts, renormalize, variant="lane", _lane_options=options)
        assert_matches_reference(weights, ids, counts, start, logits, k, keep, group, renormalize,
                                 f"options={options} renormalize={renormalize}")


@gpu
def test_lane_kernel_ablations_run_the_lane_kernel(cuda_kernel):
    """The benchmark's lane-kernel instances with parts removed: copying only gives the first k experts; top-k
    without the mask the unmasked ids; top-k with the mask (with or without the softmax) the op's ids, by the sorting
    network and by the tournament alike; none counts.
    (Their weights are not the op's.)"""
    gen = torch.Generator().manual_seed(SESSION_SEED + 19)
    T, E, k, G = 1000, 64, 8, 3
    logits = adversarial_logits("distinct", T, E, torch.bfloat16, gen).cuda()
    keep = make_keep(G, E, k, False, gen).cuda()
    group = torch.randint(-1, G, (T,), generator=gen).cuda()
    _, masked_ids = reference.route_reference(logits, k, keep, group, None, False)
    _, unmasked_ids = reference.route_reference(logits, k, None, None, None, False)
    expected = {"load_store": torch.arange(k, device="cuda").expand(T, k), "topk": unmasked_ids,
                "mask_topk": masked_ids, "mask_topk_softmax": masked_ids, "topk_tournament": unmasked_ids,
                "mask_topk_tournament": masked_ids, "mask_topk_softmax_tournament": masked_ids}
    assert set(expected) == set(cuda_route.LANE_ABLATIONS)
    for name, ids_expected in expected.items():
        counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        _, ids = run_cuda(logits, k, keep, group, counts, False, ablation=name)
        assert torch.equal(ids, ids_expected), name
        assert int(counts.abs().sum()) == 0, name
    with pytest.raises(ValueError, match="_ablation"):
        cuda_route.route_forward(logits.float(), k, keep, group, None, False, _ablation="topk")
    with pytest.raises(ValueError, match="top_k == 8"):
        cuda_route.route_forward(logits, 6, keep, group, None, False, _ablation="mask_topk_tournament")
    with pytest.raises(ValueError, match="variant"):
        cuda_route.route_forward(logits, k, keep, group, None, False, variant="rows")


@gpu
def test_route_dispatch_and_gradient(cuda_kernel):
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "cuda"
    gen = torch.Generator().manual_seed(SESSION_SEED + 9)
    logits = torch.randn(77, 64, generator=gen).cuda()
    keep = make_keep(2, 64, 8, False, gen).cuda()
    group = torch.randint(-1, 2, (77,), generator=gen).cuda()
    grad_out = torch.randn(77, 8, generator=gen).cuda()
    for renorm in (False, True):
        x = logits.clone().requires_grad_()
        weights, ids = route(x, 8, keep, group, None, renorm, "cuda")
        (weights * grad_out).sum().backward()
        ref_x = logits.double().requires_grad_()
        ref_w, ref_ids = reference.route_reference(ref_x, 8, keep, group, None, renorm)
        (ref_w * grad_out.double()).sum().backward()
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-6, rtol=1e-5)


@gpu
def test_opcheck_and_cuda_graph(cuda_kernel):
    gen = torch.Generator().manual_seed(SESSION_SEED + 11)
    logits = torch.randn(6, 8, generator=gen).cuda().requires_grad_()
    keep = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    keep[1, :3] = False
    group = torch.tensor([0, 1, -1, 1, 0, 1], device="cuda")
    counts = torch.zeros(2, 8, dtype=torch.int64, device="cuda")
    for renorm in (False, True):
        torch.library.opcheck(torch.ops.moe_fastmask.route.default, (logits, 3, keep, group, counts, renorm, "cuda"))

    x = torch.randn(4099, 64, device="cuda", dtype=torch.bfloat16)
    counts = torch.zeros(1, 64, dtype=torch.int64, device="cuda")
    route(x, 8, counts=counts, backend="cuda")  # warm-up (builds, loads) outside the capture
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(x, 8, counts=counts, backend="cuda", validate=False)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref_counts = torch.zeros(1, 64, dtype=torch.int64, device="cuda")
    _, ref_ids = reference.route_reference(x, 8, None, None, ref_counts)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, 3 * ref_counts)


@gpu
def test_uncovered_calls_fall_back_without_error(cuda_kernel):
    """Sigmoid routers that neither the split kernel (E <= 256) nor the chunk kernel (chunk_takes) takes, float32 rows
    of more than 256 experts, rows of more than 512 and masks too large for shared memory run on Triton (or the
    reference)."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 13)
    for E, k, dtype, kwargs in ((300, 4, torch.float32, dict(scoring="sigmoid")),
                                (512, 16, torch.bfloat16, dict(scoring="sigmoid", n_group=4, topk_group=2)),
                                (288, 8, torch.float16, dict(scoring="sigmoid", n_group=4, topk_group=2))):
        wide = torch.randn(65, E, generator=gen).to(dtype).cuda()
        assert not cuda_route.supports(wide, k, **kwargs), (E, k, kwargs)
        w, ids = route(wide, k, backend="cuda", **kwargs)
        triton_w, triton_ids = route(wide, k, backend="triton", **kwargs)
        assert torch.equal(ids, triton_ids) and torch.equal(w, triton_w), (E, k, kwargs)
    logits = torch.randn(65, 64, generator=gen).cuda()
    for wide in (torch.randn(9, 512, generator=gen).cuda(), torch.randn(9, 513, generator=gen).cuda().bfloat16()):
        assert not cuda_route.supports(wide, 8)
        assert torch.equal(route(wide, 8, backend="cuda")[1], route(wide, 8, backend="triton")[1])
    many = torch.ones(5000, 64, dtype=torch.bool, device="cuda")
    assert not cuda_route.supports(logits, 4, many)
    group = torch.randint(0, 5000, (65,), generator=gen).cuda()
    counts = [torch.zeros(5000, 64, dtype=torch.int64, device="cuda") for _ in range(2)]
    ids = [route(logits, 4, many, group, c, backend=b)[1] for c, b in zip(counts, ("cuda", "triton"))]
    assert torch.equal(ids[0], ids[1]) and torch.equal(counts[0], counts[1]) and int(counts[0].sum()) == 65 * 4
    # the largest mask the kernel keeps in shared memory (E=200 pads to 256: 8 words per group), with counts past the
    # shared histogram: it runs the kernel, equal to Triton
    logits = torch.randn(300, 200, generator=gen).cuda()
    edge = torch.rand(512, 200, generator=gen).cuda() < 0.5
    edge[:, :8] = True
    assert cuda_route.supports(logits, 8, edge) and not cuda_route.supports(logits, 8, edge.repeat(2, 1))
    group = torch.randint(-1, 512, (300,), generator=gen).cuda()
    counts = [torch.zeros(512, 200, dtype=torch.int64, device="cuda") for _ in range(2)]
    ids = [route(logits, 8, edge, group, c, backend=b)[1] for c, b in zip(counts, ("cuda", "triton"))]
    assert torch.equal(ids[0], ids[1]) and torch.equal(counts[0], counts[1])


# --------------------------------------------------------------------------------------------------------------
# CPU: loader and dispatch
# --------------------------------------------------------------------------------------------------------------


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cuda_route.DISABLE_ENV, "1")
    assert cuda_route.disabled()
    assert not cuda_route.is_available()
    assert cuda_route.DISABLE_ENV in cuda_route.load_error()
    if HAS_CUDA and triton_route.is_available("cuda"):
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.setenv(cuda_route.DISABLE_ENV, "0")
    assert not cuda_route.disabled()


@pytest.mark.skipif(HAS_CUDA, reason="checks the machines without a CUDA device")
def test_unavailable_without_cuda():
    assert not cuda_route.is_available()
    assert "CUDA" in cuda_route.load_error()
    assert resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors only"):
        route(torch.randn(4, 8), 2, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        resolve_backend("cuda", torch.device("cpu"))


def test_forward_variant_sends_the_sigmoid_routers_to_the_chunk_kernel(monkeypatch):
    """route_forward's kernel by default: the chunk kernel for the sigmoid calls chunk_takes accepts (DeepSeek-V3's,
    GLM-4.5's, Kimi-K2's shapes) from CHUNK_MIN_TOKENS rows on (under it for those the split kernel does not take),
    the default variant for the rest; $MOE_FASTMASK_CUDA_VARIANT=split keeps those the split kernel takes on it,
    =chunk runs the chunk kernel wherever it applies; an explicit "chunk" elsewhere is an error."""
    monkeypatch.delenv(cuda_route.VARIANT_ENV, raising=False)
    sigmoid = dict(scoring="sigmoid")
    large = cuda_route.CHUNK_MIN_TOKENS

    def rows(T, E):  # (logits of that shape: only the shape is read)
        return torch.empty(1, E).expand(T, E)

    for E, k, n_group in ((256, 8, 8), (160, 8, 1), (384, 8, 1), (512, 2, 4), (32, 1, 1)):
        assert cuda_route.forward_variant(rows(large, E), k, scoring="sigmoid", n_group=n_group) == "chunk", E
        if E <= cuda_route.MAX_SIGMOID_EXPERTS:
            assert cuda_route.forward_variant(rows(large, E), k, "split", scoring="sigmoid", n_group=n_group) == "split"
        # under the size: the split kernel where it takes the call (E <= 256), else still the chunk kernel
        small = cuda_route.forward_variant(rows(large - 1, E), k, scoring="sigmoid", n_group=n_group)
        assert small == ("lane" if E <= cuda_route.MAX_SIGMOID_EXPERTS else "chunk"), E
        # a training call's forward saves the chosen logits for the backward where the chunk kernel runs it
        assert cuda_route.saves_chosen_logits(rows(large, E), k, scoring="sigmoid", n_group=n_group), E
        assert cuda_route.saves_chosen_logits(rows(large - 1, E), k, scoring="sigmoid",
                                              n_group=n_group) == (small == "chunk"), E
    for E, k, n_group in ((256, 16, 8), (160, 8, 4), (60, 4, 1), (544, 8, 1), (256, 8, 16)):
        assert not cuda_route.chunk_takes(E, k, scoring="sigmoid", n_group=n_group), (E, k, n_group)
        assert cuda_route.forward_variant(rows(large, E), k, scoring="sigmoid", n_group=n_group) == "lane"
        assert not cuda_route.saves_chosen_logits(rows(large, E), k, scoring="sigmoid", n_group=n_group)
        with pytest.raises(ValueError, match="variant 'chunk'"):
            cuda_route.forward_variant(rows(4, E), k, "chunk", scoring="sigmoid", n_group=n_group)
    # not the softmax routers, on the chunk kernel or not
    assert not cuda_route.saves_chosen_logits(rows(large, 512).bfloat16(), 10)
    assert not cuda_route.saves_chosen_logits(rows(large, 64), 8)
    for name in ("split", "lane"):  # (the split kernel's sigmoid router: E <= 256)
        with pytest.raises(ValueError, match="up to 256 experts"):
            cuda_route.forward_variant(rows(large, 384), 8, name, **sigmoid)
    assert not cuda_route.chunk_takes(256, 8, scoring="softmax")
    assert cuda_route.forward_variant(rows(large, 64), 8) == "lane"
    with pytest.raises(ValueError, match="variant 'chunk'"):
        cuda_route.forward_variant(rows(4, 256), 8, "chunk")
    with pytest.raises(ValueError, match="variant must be one of"):
        cuda_route.forward_variant(rows(4, 256), 8, "rows", **sigmoid)
    try:  # (the environment is read once)
        for name, chunk_call, other_call in (("split", "split", "split"), ("chunk", "chunk", "lane")):
            monkeypatch.setenv(cuda_route.VARIANT_ENV, name)
            cuda_route._variant_default.cache_clear()
            assert cuda_route.forward_variant(rows(large, 256), 8, **sigmoid) == chunk_call, name
            assert cuda_route.forward_variant(rows(4, 256), 8, **sigmoid) == chunk_call, name
            assert cuda_route.forward_variant(rows(large, 64), 8) == other_call, name
            assert cuda_route.forward_variant(rows(4, 384), 8, **sigmoid) == "chunk", name  # (E > 256: chunk only)
    finally:
        monkeypatch.delenv(cuda_route.VARIANT_ENV, raising=False)
        cuda_route._variant_default.cache_clear()


def test_forward_variant_sends_wide_softmax_routers_to_the_chunk_kernel(monkeypatch):
    """The softmax routers of 16-bit logits that chunk_takes accepts run the chunk kernel by default from
    CHUNK_SOFTMAX_MIN_EXPERTS experts and CHUNK_MIN_TOKENS rows on (Qwen3-Next's 512 experts, top-10), the default
    variant below either; an explicit "chunk" takes any of them, float32 logits, top_k over 16 and group limits
    none; $MOE_FASTMASK_CUDA_VARIANT=split keeps them on the split kernel, =chunk sends every one to the chunk
    kernel."""
    monkeypatch.delenv(cuda_route.VARIANT_ENV, raising=False)
    large, wide = cuda_route.CHUNK_MIN_TOKENS, cuda_route.CHUNK_SOFTMAX_MIN_EXPERTS

    def rows(T, E, dtype=torch.bfloat16):  # (logits of that shape: only the shape and dtype are read)
        return torch.empty(1, E, dtype=dtype).expand(T, E)

    for dtype in (torch.float16, torch.bfloat16):
        for E, k in ((512, 10), (256, 8), (384, 16), (wide, 1), (192, 16)):
            assert cuda_route.chunk_takes(E, k, dtype=dtype), (E, k)
            assert cuda_route.forward_variant(rows(large, E, dtype), k) == "chunk", (E, k)
            assert cuda_route.forward_variant(rows(large, E, dtype), k, scoring="softmax_chosen") == "chunk"
            assert cuda_route.forward_variant(rows(large - 1, E, dtype), k) == "lane", (E, k)  # (the split kernel)
            assert cuda_route.forward_variant(rows(large, E, dtype), k, "split") == "split"
        for E, k in ((32, 8), (128, 8), (wide - 32, 16)):  # (narrower: the chunk kernel on request only)
            assert cuda_route.chunk_takes(E, k, dtype=dtype), (E, k)
            logits = rows(large, E, dtype)
            assert cuda_route.forward_variant(logits, k) == cuda_route.default_variant(logits) != "chunk", (E, k)
            assert cuda_route.forward_variant(rows(4, E, dtype), k, "chunk") == "chunk", (E, k)
    for E, k, dtype, n_group in ((512, 10, torch.float32, 1), (256, 17, torch.bfloat16, 1), (60, 4, torch.bfloat16, 1),
                                 (544, 8, torch.bfloat16, 1), (256, 8, torch.bfloat16, 2), (256, 8, None, 1)):
        assert not cuda_route.chunk_takes(E, k, dtype=dtype, n_group=n_group), (E, k, dtype, n_group)
    assert not cuda_route.chunk_takes(256, 8, scoring="bad", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="variant 'chunk'.*float16 / bfloat16"):
        cuda_route.forward_variant(rows(large, 512, torch.float32), 10, "chunk")
    try:  # (the environment is read once)
        for name, expected in (("split", "split"), ("chunk", "chunk")):
            monkeypatch.setenv(cuda_route.VARIANT_ENV, name)
            cuda_route._variant_default.cache_clear()
            assert cuda_route.forward_variant(rows(large, 512), 10) == expected, name
            assert cuda_route.forward_variant(rows(4, 128), 8) == expected, name
    finally:
        monkeypatch.delenv(cuda_route.VARIANT_ENV, raising=False)
        cuda_route._variant_default.cache_clear()


@gpu
def test_wide_softmax_routers_from_the_chunk_kernels_size_through_the_op(cuda_kernel):
    """The op (``route``, backend "cuda") where its default is the chunk kernel's softmax: Qwen3-Next's router (512
    bf16 experts, top-10, renormalised) and top-8 / top-16 of 256 float16 experts with a scale, with keep masks
    (tight ones too), group ids and counts, at CHUNK_MIN_TOKENS rows and more (several grid-stride steps a warp at
    the largest size), ids and counts exact against the reference."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 59)
    shapes = ((512, 10, torch.bfloat16, True, {}), (256, 8, torch.float16, False, dict(scale=2.5)),
              (256, 16, torch.bfloat16, False, dict(scoring="softmax_chosen")))
    for n, (E, k, dtype, renormalize, route_variant) in enumerate(shapes):
        T = (cuda_route.CHUNK_MIN_TOKENS, 3 * cuda_route.CHUNK_MIN_TOKENS + 37, 12 * cuda_route.CHUNK_MIN_TOKENS)[n]
        assert cuda_route.forward_variant(torch.empty(1, E, dtype=dtype).expand(T, E), k) == "chunk", (E, T)
        logits = adversarial_logits(("normal", "ties", "wide")[n], T, E, dtype, gen)
        keep = make_keep(3, E, k, n == 1, gen)
        group = torch.randint(-1, 3, (T,), generator=gen)
        start = torch.randint(0, 1000, (3, E), dtype=torch.int64)
        counts = start.cuda()
        weights, ids = route(logits.cuda(), k, keep.cuda(), group.cuda(), counts, renormalize, backend="cuda",
                             **route_variant)
        assert_matches_reference(weights.cpu(), ids.cpu(), counts.cpu(), start, logits, k, keep, group, renormalize,
                                 f"E={E} T={T} {dtype}", variant=route_variant)


def test_supports_cuda_tensors_only():
    x = torch.randn(4, 64)
    assert not cuda_route.supports(x, 8)  # CPU tensor
    assert not cuda_route.supports(x, 8, scoring="sigmoid")
    meta = torch.empty(4, 64, device="meta", dtype=torch.bfloat16)
    assert not cuda_route.supports(meta, 8)


@gpu
def test_sigmoid_routers_from_the_chunk_kernels_size_through_the_op(cuda_kernel):
    """The op (``route``, backend "cuda") at CHUNK_MIN_TOKENS rows and more, where its default is the chunk kernel
    (several grid-stride steps a warp at the largest size): DeepSeek-V3's, GLM-4.5's and Kimi-K2's routers with keep
    masks (tight ones too), group ids and counts, against the reference as assert_matches_reference has it."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 53)
    shapes = ((256, 8, torch.float32, dict(n_group=8, topk_group=4)), (160, 8, torch.bfloat16, {}),
              (384, 8, torch.float32, {}))
    for n, (E, k, dtype, groups) in enumerate(shapes):
        T = (cuda_route.CHUNK_MIN_TOKENS, 3 * cuda_route.CHUNK_MIN_TOKENS + 37, 12 * cuda_route.CHUNK_MIN_TOKENS)[n]
        route_variant = dict(scoring="sigmoid", bias=torch.randn(E, generator=gen) * 0.1, scale=2.5, **groups)
        chosen = cuda_route.forward_variant(torch.empty(1, E).expand(T, E), k, scoring="sigmoid",
                                            n_group=groups.get("n_group", 1))
        assert chosen == "chunk", (E, T)
        logits = adversarial_logits(("normal", "ties", "wide")[n], T, E, dtype, gen)
        keep = make_keep(3, E, k, n == 1, gen)
        group = torch.randint(-1, 3, (T,), generator=gen)  # (route validates them: -1 or a keep row)
        start = torch.randint(0, 1000, (3, E), dtype=torch.int64)
        counts = start.cuda()
        device_variant = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in route_variant.items()}
        weights, ids = route(logits.cuda(), k, keep.cuda(), group.cuda(), counts, True, backend="cuda",
                             **device_variant)
        assert_matches_reference(weights.cpu(), ids.cpu(), counts.cpu(), start, logits, k, keep, group, True,
                                 f"E={E} T={T} {dtype}", variant=route_variant)


@gpu
@pytest.mark.parametrize("name", [name for name in VARIANTS if name != "softmax"] + ["softmax_scaled"])
def test_router_variants_against_reference(cuda_kernel, name):
    """The router variants on the GPU (the kernels the op runs: the lane kernel for the softmax variants where it
    applies, the chunk kernel for the sigmoid ones where it applies, else the split kernel), every dtype, shapes from
    Mixtral's to DeepSeek-V3's and Kimi-K2's, keep masks and group ids, adversarial values: as
    assert_matches_reference has it; the calls that supports() refuses (float32 softmax routers over 256 experts,
    sigmoid top-16 of 512) are not taken."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 41 + len(name))
    for n, (dtype, (E, k)) in enumerate(itertools.product(DTYPES, VARIANT_SHAPES + [(384, 8), (512, 8), (512, 16)])):
        route_variant = _route_variant(name, E, k, gen)
        renormalize = route_variant.pop("renormalize", False)
        device_variant = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in route_variant.items()}
        kind = ("normal", "ties", "wide", "neg_inf", "signed_zeros")[n % 5]
        T = (1, 37, 1000, 4099)[n % 4]
        logits = adversarial_logits(kind, T, E, dtype, gen)
        keep = make_keep(3, E, k, n % 2 == 0, gen)
        group = torch.randint(-1, 4, (T,), generator=gen)
        taken = cuda_route.supports(logits.cuda(), k, keep.cuda(), **device_variant)
        sigmoid = route_variant.get("scoring") == "sigmoid"
        chunk = cuda_route.chunk_takes(E, k, scoring="sigmoid", n_group=route_variant.get("n_group", 1))
        assert taken == (E <= 256 or (dtype != torch.float32 and not sigmoid) or (sigmoid and chunk)), (name, E)
        if not taken:
            continue
        start = torch.randint(0, 1000, (3, E), dtype=torch.int64)
        counts = start.cuda()
        weights, ids = run_cuda(logits.cuda(), k, keep.cuda(), group.cuda(), counts, renormalize, **device_variant)
        assert_matches_reference(weights.cpu(), ids.cpu(), counts.cpu(), start, logits, k, keep, group, renormalize,
                                 f"{name} E={E} k={k} T={T} {dtype} {kind}", variant=route_variant)
        if sigmoid and chunk:  # the chunk kernel whatever the size (the op takes it from CHUNK_MIN_TOKENS rows on)
            counts = start.cuda()
            weights, ids = run_cuda(logits.cuda(), k, keep.cuda(), group.cuda(), counts, renormalize,
                                    variant="chunk", **device_variant)
            assert_matches_reference(weights.cpu(), ids.cpu(), counts.cpu(), start, logits, k, keep, group,
                                     renormalize, f"{name} E={E} k={k} T={T} {dtype} {kind} chunk",
                                     variant=route_variant)


@pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")
def test_forward_impl_of_the_cuda_backend_falls_back_on_what_it_does_not_cover(monkeypatch):
    """A call the kernel does not take (here: CPU tensors) runs on Triton, or on the reference without Triton,
    with no error; the backward of the cuda backend too."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 17)
    logits = torch.randn(9, 16, generator=gen)
    keep = make_keep(2, 16, 4, False, gen)
    group = torch.randint(-1, 2, (9,), generator=gen)
    ref_counts = torch.zeros(2, 16, dtype=torch.int64)
    ref_w, ref_ids = reference.route_reference(logits, 4, keep, group, ref_counts, True)
    grad = torch.randn(9, 4, generator=gen)
    ref_grad = reference.route_backward_reference(grad, logits, keep, group, ref_ids, True)
    choices = [True, False] if triton_route.is_available("cpu") else [False]
    for triton_ok in choices:
        monkeypatch.setattr(triton_route, "is_available", lambda device, ok=triton_ok: ok)
        assert route_module._gpu_fallback(torch.device("cpu")) == ("triton" if triton_ok else "torch")
        counts = torch.zeros(2, 16, dtype=torch.int64)
        w, ids = route_module._route_forward_impl(logits, 4, keep, group, counts, True, "cuda")
        assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts), triton_ok
        torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
        g = route_module._route_backward_impl(grad, logits, keep, group, ids, True, "cuda")
        torch.testing.assert_close(g, ref_grad, atol=1e-6, rtol=1e-5)


@gpu
def test_forward_writes_the_ids_a_byte_each_for_the_backward(cuda_kernel):
    """route_forward(ids8=...) writes the ids once more as uint8 (over a poisoned buffer), on the calls
    compact_ids_apply() accepts; it refuses the others with a clear error."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 41)
    for E in cuda_route.LANE_BACKWARD_EXPERTS:
        for dtype in (torch.float16, torch.bfloat16):
            for T in (1, 37, 4099):
                logits = torch.randn(T, E, generator=gen).to(dtype).cuda()
                keep = (torch.rand(3, E, generator=gen) < 0.7).cuda()
                keep[:, :8] = True
                group = torch.randint(-1, 3, (T,), generator=gen).cuda()
                assert cuda_route.compact_ids_apply(logits, 8, keep)
                ids8 = torch.full((T, 8), 0xEE, dtype=torch.uint8, device="cuda")
                weights, ids = cuda_route.route_forward(logits, 8, keep, group, None, False, ids8=ids8)
                assert torch.equal(ids8.long(), ids), (E, dtype, T)
                _, ref_ids = reference.route_reference(logits, 8, keep, group, None, False)
                assert torch.equal(ids, ref_ids)
    logits = torch.randn(40, 64, generator=gen).to(torch.bfloat16).cuda()
    refused = [
        (logits, 4, dict(ids8=torch.empty(40, 4, dtype=torch.uint8, device="cuda"))),  # top_k != 8
        (logits.float(), 8, dict(ids8=torch.empty(40, 8, dtype=torch.uint8, device="cuda"))),  # float32
        (logits, 8, dict(ids8=torch.empty(40, 8, dtype=torch.uint8, device="cuda"), variant="split")),
        (logits, 8, dict(ids8=torch.empty(40, 8, dtype=torch.int64, device="cuda"))),  # not uint8
        (torch.randn(40, 128, device="cuda", dtype=torch.bfloat16), 8,
         dict(ids8=torch.empty(40, 8, dtype=torch.uint8, device="cuda"))),  # E = 128: no lane backward
    ]
    for x, k, kwargs in refused:
        with pytest.raises(ValueError, match="ids8"):
            cuda_route.route_forward(x, k, None, None, None, False, **kwargs)


def test_build_key_and_command():
    source = cuda_route.source_path()
    assert source.name == "route_cuda.cu" and source.is_file()
    key90 = cuda_route.build_key(source, "/usr/bin/nvcc", ("90",))
    assert key90 != cuda_route.build_key(source, "/usr/bin/nvcc", ("80", "90"))
    assert key90 != cuda_route.build_key(source, "/opt/nvcc", ("90",))
    command = cuda_route.nvcc_command("nvcc", source, Path("out.so"), ("80", "90"))
    assert command[0] == "nvcc" and command[-1] == str(source)
    assert "arch=compute_90,code=sm_90" in command and "arch=compute_80,code=sm_80" in command
    assert "-Xptxas" in command and "-shared" in command


@pytest.mark.parametrize("splits", [True, False])
def test_the_build_splits_compilation_over_the_cores_where_nvcc_can(tmp_path, splits):
    """``--split-compile 0`` where ``nvcc --help`` offers it (CUDA 12 on), never for an nvcc without it (CUDA 11:
    an unknown option fails the build)."""
    fake = tmp_path / "nvcc"
    options = "--threads <number>\\n--split-compile <number>" if splits else "--threads <number>"
    fake.write_text(f'#!/bin/sh\nprintf "Usage: nvcc [options]\\n{options}\\n"\n')
    fake.chmod(0o755)
    command = cuda_route.nvcc_command(str(fake), cuda_route.source_path(), Path("out.so"), ("90",))
    assert (command[command.index("--split-compile") + 1] == "0") if splits else "--split-compile" not in command
    assert command[-1] == str(cuda_route.source_path())
    missing = cuda_route.nvcc_command(str(tmp_path / "absent"), cuda_route.source_path(), Path("out.so"), ("90",))
    assert "--split-compile" not in missing


def kernel_bodies(source: str) -> dict[str, str]:
    """Each ``__global__`` function of a CUDA source: its name and body (the text between its braces)."""
    bodies = {}
    for match in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^;{]*?\)\s*)?(\w+)\s*\(", source):
        start = source.index("{", match.end())
        depth, end = 0, start
        for end in range(start, len(source)):
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                break
        bodies[match.group(1)] = source[start + 1:end]
    return bodies


# what a kernel must not do before dependent_launch_start: read or write global memory (by these helpers and fields)
GLOBAL_ACCESSES = ("__ldg", "__ldcs", "__stcs", "cp_async", "issue(", "load_group(", "fill_mask_table(", "atomicAdd",
                   "stamp(", "timeline_buffer", "p.keep[", "p.group", "logits[", "p.counts", "p.ids", "p.weights")


def test_every_kernel_waits_for_the_kernel_before_it_touches_memory():
    """The kernels go out as programmatic dependent launches: each calls dependent_launch_start (the wait for the
    kernel before it) once, before any of its global memory accesses, and every launch goes through launch_kernel."""
    kernels = {}
    for source in (cuda_route.source_path(), cuda_route.backward_source_path()):
        text = source.read_text()
        assert "<<<" not in text, f"{source.name}: a kernel launched without launch_kernel"
        kernels.update(kernel_bodies(text))
    assert sorted(kernels) == ["route_bwd_kernel", "route_bwd_lane_kernel", "route_bwd_sigmoid_kernel",
                               "route_chunk_kernel", "route_chunk_softmax_kernel", "route_fwd_kernel",
                               "route_lane_kernel"]
    for name, body in kernels.items():
        assert body.count("dependent_launch_start(p.dependent_launch);") == 1, name
        before = body[:body.index("dependent_launch_start(")]
        # (lambdas defined before the wait, such as issue and load_group, are only called after it)
        before_calls = re.sub(r"auto \w+ = \[[^\]]*\]\([^)]*\) \{.*?\n  \};", "", before, flags=re.S)
        # (testing a pointer or its alignment, copying or casting it, is no access)
        before_calls = re.sub(r"p\.\w+ [!=]= nullptr|reinterpret_cast<uintptr_t>\(p\.\w+\)|= p\.\w+;"
                              r"|static_cast<[^>]*\*>\(p\.\w+\)", "", before_calls)
        touched = [token for token in GLOBAL_ACCESSES if token in before_calls]
        assert not touched, (name, touched)


def test_arch_override(monkeypatch):
    monkeypatch.setenv(cuda_route.ARCH_ENV, "90, 80")
    assert cuda_route.target_archs() == ("80", "90")
    monkeypatch.setenv(cuda_route.ARCH_ENV, "9.0")
    assert cuda_route.target_archs() == ("90",)


@pytest.mark.skipif(cuda_route.find_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests build and run the kernel")
@pytest.mark.prebuild.with_args(start_sm90_build)
def test_source_compiles_and_the_launcher_matches_the_python_side(sm90_build_cache):
    """Compile for sm_90 in a fresh process (no device needed) and call the launcher: it refuses shapes it does not
    take before touching a device, and reports a CUDA error (not a crash) when there is no device."""
    code = (
        "import ctypes, torch\n"
        "from moe_fastmask.ops import cuda_route as c\n"
        "lib = c._bind(c._build())\n"
        "p = c.RouteParams(num_tokens=4, num_experts=513, top_k=8, num_groups=1)\n"
        "print('too wide', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None))\n"
        "p = c.RouteParams(num_tokens=4, num_experts=300, top_k=8, num_groups=1)\n"
        "print('too wide f32', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 0, 0, None))\n"
        "p = c.RouteParams(num_tokens=4, num_experts=64, top_k=17, num_groups=1)\n"
        "print('k too large', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None))\n"
        "p = c.RouteParams(num_tokens=0, num_experts=64, top_k=8, num_groups=1)\n"
        "print('empty', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None))\n"
        "lane = dict(num_tokens=4, num_experts=64, top_k=8, num_groups=1, stride_t=64, stride_e=1, vector_loads=1,\n"
        "            variant=1, ids8=64)\n"
        "for name, change, dtype in (('k4', dict(top_k=4), 2), ('split', dict(variant=0), 2), ('f32', {}, 0),\n"
        "                            ('odd', dict(ids8=65), 2), ('ablation', dict(ablation=1), 2),\n"
        "                            ('padded', dict(num_experts=60, stride_t=60, vector_loads=2), 2)):\n"
        "    p = c.RouteParams(**dict(lane, **change))\n"
        "    print('ids8', name, lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), dtype, 0, None))\n"
        "sig = dict(num_tokens=4, num_experts=256, top_k=8, num_groups=1, n_group=1, scale=1.0, scoring=1)\n"
        "for name, change in (('sigmoid too wide', dict(num_experts=300)), ('bad scoring', dict(scoring=5)),\n"
        "                     ('bias on softmax', dict(scoring=0, bias=64)), ('groups on softmax', dict(scoring=0,\n"
        "                      n_group=4, topk_group=2)), ('groups of 1', dict(n_group=256, topk_group=8)),\n"
        "                     ('topk_group 0', dict(n_group=8, topk_group=0)), ('inf scale', dict(scale=1e39)),\n"
        "                     ('chunk softmax bias', dict(variant=2, scoring=0, bias=64)),\n"
        "                     ('chunk k9', dict(variant=2, top_k=9)),\n"
        "                     ('chunk E 300', dict(variant=2, num_experts=300)),\n"
        "                     ('chunk E 544', dict(variant=2, num_experts=544)),\n"
        "                     ('chunk groups of 16', dict(variant=2, n_group=16, topk_group=4))):\n"
        "    p = c.RouteParams(**dict(sig, **change))\n"
        "    print('variant', name, lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None))\n"
        "p = c.RouteParams(**dict(sig, variant=2, scoring=0))\n"
        "print('chunk softmax f32', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 0, 0, None))\n"
        "p = c.RouteParams(**dict(sig, variant=2, scoring=0, top_k=17))\n"
        "print('chunk softmax k17', lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None))\n"
        "if not torch.cuda.is_available():\n"
        "    p = c.RouteParams(num_tokens=4, num_experts=64, top_k=8, num_groups=1)\n"
        "    rc = lib.moe_fastmask_route_cuda_forward(ctypes.byref(p), 2, 0, None)\n"
        "    print('no device', rc != 0, lib.moe_fastmask_route_cuda_error_string(rc).decode())\n"
        "log = (c._build().parent / 'build.log').read_text()\n"
        "print('registers lines', sum('registers' in line for line in log.splitlines()))\n"
    )
    env = dict(os.environ, MOE_FASTMASK_CACHE_DIR=str(sm90_build_cache), MOE_FASTMASK_CUDA_ARCH="90")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("too wide 1", "too wide f32 1", "k too large 1", "empty 0", "ids8 k4 1", "ids8 split 1",
                 "ids8 f32 1", "ids8 odd 1", "ids8 ablation 1", "ids8 padded 1", "variant sigmoid too wide 1",
                 "variant bad scoring 1", "variant bias on softmax 1", "variant groups on softmax 1",
                 "variant groups of 1 1", "variant topk_group 0 1", "variant inf scale 1",
                 "variant chunk softmax bias 1", "chunk softmax f32 1",
                     "chunk softmax k17 1", "variant chunk k9 1", "variant chunk E 300 1", "variant chunk E 544 1",
                 "variant chunk groups of 16 1"):
        assert line in out.stdout, out.stdout
    if not HAS_CUDA:
        assert "no device True" in out.stdout, out.stdout
    # split: one kernel per (dtype, padded E, top-k bound, prefetch): 3 x (6 x 2 - 1) x 2 = 66, the top-2 and top-4
    # bounds of E_PAD 8 and 16: 3 x 2 x 2 x 2 = 24, and E = 512 for the 16-bit dtypes: 2 x 2 x 2 = 8; its sigmoid
    # router's, one per (dtype, padded E up to 256, top-k bound 8 or 16), no prefetch: 3 x (6 x 2 - 1) = 33; lane: one per
    # (16-bit dtype, E in 32 / 64 / 128, with or without a mask, top_k == 8 or not) = 24, its padded rows' (16-bit
    # dtype, E_PAD 32 / 64 / 128; mask on, top_k at run time) = 6, the tournament top-k's instances that the op
    # takes at large T (16-bit dtype, E = 64 or 128, top_k == 8, with or without a mask) = 8, and 51 benchmark
    # instances (bf16, E=64: the loads-and-stores-only one under 6 option sets, the other 6 ablations (3 steps, by
    # the network and by the tournament), and the full kernel under the 40 option sets (top_k == 8 or not; 32-bit
    # keys, packed keys or a two-pass softmax under 6 memory option sets, the tournament under 2) less the 3 that
    # the op uses, and the 2 timeline instances); backward (csrc/route_cuda_backward.cu): one per (dtype, padded E,
    # vector or checked access) = 3 x 7 x 2 = 42, and the sigmoid router's vector ones, one per (dtype, padded E up to
    # 256) = 18, and its own kernel, one per dtype = 3; its lane kernel, one per (16-bit dtype, E = 32 or 64, with or
    # without a mask, int64 or one-byte ids) = 16, and its loads-and-stores-only benchmark instance; the sigmoid
    # router's chunk kernel, one per dtype = 3, and its softmax routers', one per (16-bit dtype, lists of 8 or 16) = 4
    assert "registers lines 307" in out.stdout, out.stdout
    assert ctypes.sizeof(cuda_route.RouteParams) == 168  # (4 bytes of padding before the bias pointer, as in C)


@pytest.mark.skipif(cuda_route.find_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("name", ["bench_minmax_pipes.cu", "bench_bwd_traffic.cu"])
def test_standalone_microbenchmarks_compile_for_sm90(name, tmp_path):
    """The standalone CUDA microbenchmarks in benchmarks/ (no torch) compile for sm_90 without spills, as their
    header's command builds them (RESULTS.md quotes their numbers)."""
    source = Path(__file__).resolve().parents[1] / "benchmarks" / name
    out = subprocess.run([cuda_route.find_nvcc(), "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90",
                          "-Xptxas", "-v", "-cubin", "-o", str(tmp_path / "out.cubin"), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out.cubin").stat().st_size > 0
    spills = [line for line in out.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")]
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills


# --------------------------------------------------------------------------------------------------------------
# CPU: the kernel source itself, compiled for the host with an emulation of the device (and AddressSanitizer)
# --------------------------------------------------------------------------------------------------------------

# the source's device-only statements, and their host stand-ins (tests/cuda_emulation.py)
FORWARD_EMU_SUBSTITUTIONS = {
    **cuda_emulation.LANE16_SUBSTITUTIONS,
    'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));': "y = emu_ex2(x);",
    'asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));': "y = emu_rcp(x);",
    'asm("prmt.b32 %0, %1, 0, 0xBB99;" : "=r"(d) : "r"(w));': "d = emu_prmt(w, 0, 0xBB99);",
    'asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));': "d = emu_bf16x2_max_nan(a, b);",
    "extern __shared__ __align__(16) unsigned int smem[];":
        "unsigned int* const smem = reinterpret_cast<unsigned int*>(emu_smem_base);",
    "extern __shared__ __align__(16) unsigned char lane_smem[];": "unsigned char* const lane_smem = emu_smem_base;",
    "extern __shared__ __align__(16) unsigned int chunk_shared[];":
        "unsigned int* const chunk_shared = reinterpret_cast<unsigned int*>(emu_smem_base);",
    'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));': "t = static_cast<uint64_t>(clock64());",
    'asm volatile("mov.u32 %0, %%smid;" : "=r"(id));': "id = blockIdx.x % emu_sms;",
}


def build_forward_emulation(directory: Path, sanitize: bool) -> Path:
    """csrc/route_cuda.cu compiled for the host (see tests/cuda_emulation.py); returns the library's path."""
    return cuda_emulation.build_emulation(cuda_emulation.kernel_source(cuda_route.source_path()),
                                          FORWARD_EMU_SUBSTITUTIONS, directory,
                                          "route_cuda_host", sanitize)


def start_forward_emulation_build() -> None:
    """(``prebuild``) build_forward_emulation's build, started in the background."""
    cuda_emulation.start_build(cuda_emulation.kernel_source(cuda_route.source_path()), FORWARD_EMU_SUBSTITUTIONS,
                               "route_cuda_host")


def emulated_forward(library: Path):
    """A launcher on CPU tensors through the emulated library, with the Python side's arguments: (weights, ids)
    written over poisoned outputs; ``options`` names from ``LANE_OPTIONS``."""
    lib = ctypes.CDLL(str(library))
    lib.moe_fastmask_route_cuda_forward.argtypes = [
        ctypes.POINTER(cuda_route.RouteParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    assert lib.moe_fastmask_route_cuda_params_size() == ctypes.sizeof(cuda_route.RouteParams)

    lib.moe_fastmask_route_cuda_set_timeline.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.moe_fastmask_route_cuda_lane_smem.argtypes = [ctypes.POINTER(cuda_route.RouteParams), ctypes.c_int]
    lib.moe_fastmask_route_cuda_lane_smem.restype = ctypes.c_int64

    def run(logits, top_k, keep, group, counts, renormalize, variant="lane", options=None, grid_policy="wave",
            ids8=False, timeline=None, route_variant=None, saved=None):
        # saved: write the chosen experts' logits too (default: on the chunk kernel's sigmoid calls, as the op does)
        T = logits.shape[0]
        sigmoid = (route_variant or {}).get("scoring") == "sigmoid"
        saved = variant == "chunk" and sigmoid if saved is None else saved
        chosen = torch.full((T, top_k), 0.25, dtype=torch.float32) if saved else None  # (poisoned)
        weights = torch.full((T, top_k), float("nan"), dtype=logits.dtype)
        ids = torch.full((T, top_k), POISON_ID, dtype=torch.int64)
        ids8_out = torch.full((T, top_k), 0xEE, dtype=torch.uint8) if ids8 else None  # (poisoned)
        lane_options = 0 if options is None else cuda_route.lane_option_bits(options)
        if timeline is not None:  # (the timeline instance: the op's instance with stamps, with options or not)
            lane_options = cuda_route.timeline_option_bits(options)
        route_variant = dict(route_variant or {})
        if route_variant.get("bias") is not None:  # (the kernel's bias: float32, as route_forward passes it)
            route_variant["bias"] = route_variant["bias"].float().contiguous()
        params = cuda_route.forward_params(weights, ids, logits, top_k, keep, group, counts, renormalize,
                                           variant=variant, grid_policy=grid_policy, lane_options=lane_options,
                                           ids8=ids8_out, chosen_logits=chosen, **route_variant)
        if variant == "lane" and lane_options == 0:  # (the op's calls) the launcher takes what lane_takes says
            taken = lib.moe_fastmask_route_cuda_lane_smem(ctypes.byref(params), cuda_route.DTYPE_CODES[logits.dtype])
            scoring = route_variant.get("scoring", "softmax")
            assert (taken > 0) == cuda_route.lane_takes(logits, top_k, keep, scoring=scoring), (
                tuple(logits.shape), top_k, taken)
        if timeline is not None:
            assert lib.moe_fastmask_route_cuda_set_timeline(timeline.data_ptr(), timeline.shape[0]) == 0
        code = lib.moe_fastmask_route_cuda_forward(ctypes.byref(params), cuda_route.DTYPE_CODES[logits.dtype], 0, None)
        if timeline is not None:
            lib.moe_fastmask_route_cuda_set_timeline(None, 0)
        assert code == 0, code
        if ids8:  # the ids once more, a byte each
            assert torch.equal(ids8_out.long(), ids), "ids8 differs from the ids"
        if saved:  # each chosen expert's logit exactly, -inf where masked
            torch.testing.assert_close(chosen, reference.chosen_logits_reference(logits, ids, keep, group), rtol=0,
                                       atol=0, equal_nan=True, msg=lambda m: f"chosen_logits E={logits.shape[1]}\n{m}")
        return weights, ids

    run.library = lib
    return run


def check_emulated(run, logits, top_k, keep, group, num_groups, renormalize, where, **launch):
    """ids and counts exact, weights within tolerance (NaN exactly where the reference has NaN); with a
    ``route_variant``, as assert_matches_reference has it. Returns the run's (weights, ids)."""
    start = torch.randint(0, 1000, (num_groups, logits.shape[1]), dtype=torch.int64)
    counts = start.clone()
    weights, ids = run(logits, top_k, keep, group, counts, renormalize, **launch)
    assert_matches_reference(weights, ids, counts, start, logits, top_k, keep, group, renormalize, f"{where} {launch}",
                             variant=launch.get("route_variant"))
    return weights, ids


TIMELINE_SLOTS = 32  # csrc/route_cuda.cu's kTimelineSlots


def check_timeline(timeline: torch.Tensor, num_tiles: int) -> None:
    """The stamps of the lane kernel's timeline instance (rows of warps that ran: a start stamp): the warps' tiles
    dealt round-robin (warp w takes tiles w, w + W, ...: counts differing by one at most, summing to the tiles), and
    each warp's cycle stamps in order (start, then each tile's landing, weights and stores, the loop's end, the
    kernel's end), its global-timer stamps too."""
    ran = timeline[:, 2] != 0
    warps = int(ran.sum())
    assert warps > 0 and bool(ran[:warps].all()) and not bool(ran[warps:].any()), "warps that ran are not the first"
    tiles = timeline[:warps, 5]
    expected = torch.tensor([len(range(w, num_tiles, warps)) for w in range(warps)])
    assert torch.equal(tiles, expected), f"tiles per warp {tiles.tolist()} vs {expected.tolist()}"
    for w in range(warps):
        row = timeline[w].tolist()
        n = min(row[5], 8)
        cycles = [row[2]] + row[8:8 + 3 * n] + [row[4], row[6]]
        assert cycles == sorted(cycles), f"warp {w}: cycle stamps out of order {cycles}"
        assert row[1] <= row[3], f"warp {w}: global timer stamps out of order {row[1]}, {row[3]}"


def check_lane_grid(library: Path) -> None:
    """The lane kernel's grid (csrc/route_cuda.cu, lane_grid) on an H200's shapes (132 SMs; blocks of 8, 4 and 2 warps
    at E = 32, 64 and 128, 3, 6 and 4 resident): at most a full wave; the op's policy (2) gives every warp at least two
    tiles where there are enough, and never trades a grid whose busiest SM holds 8 warps or more for one that leaves it
    fewer (a smaller busiest share with too few warps to hide a tile's latency: at E = 64 from T = 67,585 to 84,480 it
    had taken one block of 4 warps per SM, where two or three are faster), while one block of 8 warps per SM (E = 32)
    stays where its share is the smallest."""
    lib = ctypes.CDLL(str(library))
    lib.moe_fastmask_route_cuda_lane_grid.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_int]
    sms = 132

    def busiest_warps(blocks: int, per_block: int) -> int:
        return -(-blocks // sms) * per_block

    for per_block, resident in ((8, 3), (4, 6), (2, 4)):
        def grid(policy: int, tiles: int) -> int:
            return lib.moe_fastmask_route_cuda_lane_grid(policy, tiles, per_block, sms, resident)

        wave = sms * resident
        for tiles in list(range(1, 4000, 7)) + [2112, 2113, 2304, 2640, 2641, 8192, 12000, 40000]:
            where = (per_block, resident, tiles)
            for policy in (0, 1, 2):
                blocks = grid(policy, tiles)
                assert 1 <= blocks <= min(wave, -(-tiles // per_block)), (where, policy, blocks)
            blocks = grid(2, tiles)
            if tiles >= 2 * sms * per_block:  # at least two tiles a warp
                assert blocks <= -(-(-(-tiles // 2)) // per_block), (where, blocks)
            least = -(-tiles // (wave * per_block))
            least = max(least, 2) if tiles >= 2 * sms * per_block else least
            least_blocks = -(-(-(-tiles // least)) // per_block)  # the grid of the least tiles a warp
            if busiest_warps(least_blocks, per_block) >= 8:
                assert busiest_warps(blocks, per_block) >= 8, (where, blocks, least_blocks)
            if blocks != least_blocks:  # a larger n only for a smaller busiest share
                n = -(-tiles // (blocks * per_block))
                assert busiest_warps(blocks, per_block) * n < busiest_warps(least_blocks, per_block) * least, where
    grid = lib.moe_fastmask_route_cuda_lane_grid
    assert grid(2, 2304, 4, sms, 6) == 288  # E = 64, T = 73,728: two or three blocks per SM (not 116: 5 tiles a warp)
    assert grid(2, 2048, 4, sms, 6) == 256 and grid(2, 8192, 4, sms, 6) == 512  # T = 65,536 and 262,144: as before
    assert grid(2, 2304, 8, sms, 3) == 96  # E = 32, T = 73,728: one block of 8 warps per SM at most, 3 tiles a warp
    assert grid(2, 1280, 2, sms, 4) == 320  # E = 128, T = 40,960: two tiles a warp (not 128 blocks of 2 warps)


def emulated_forward_checks(library: str) -> None:
    """Both forward kernels of the source, on CPU tensors through the emulation (2 SMs, so the grid-stride loops take
    several steps): random shapes and masks with int32 / int64 and out-of-range group ids, the adversarial values,
    the packed top-k's window edges, every lane-kernel option set and grid policy, and strided rows."""
    check_lane_grid(Path(library))
    run = emulated_forward(Path(library))
    gen = torch.Generator().manual_seed(SESSION_SEED + 37)
    shapes = [(8, 2), (12, 3), (7, 5), (32, 8), (60, 4), (64, 8), (64, 4), (128, 8), (256, 16)]
    for dtype in DTYPES:
        # (16-bit: 512 experts; bf16: the lane kernel's padded rows at E_PAD = 32 and 128 too, E_PAD = 64 being (60, 4)
        # in both dtypes, here and below)
        wider = [(512, 10)] if dtype != torch.float32 else []
        for E, k in shapes + wider + ([(20, 4), (120, 8)] if dtype == torch.bfloat16 else []):
            for T in (1, 45, 200):
                logits = adversarial_logits("normal", T, E, dtype, gen)
                G = 3
                keep = make_keep(G, E, k, bool(T % 2), gen)
                group = torch.randint(-1, G + 1, (T,), generator=gen)
                if T % 3 == 0:
                    group = group.to(torch.int32)
                else:  # int64 ids out of range whose low 32 bits are a valid group
                    group[::7], group[3::11] = 2**32 + 1, -(2**32) + 2
                variants = ["split"] + (["lane"] if cuda_route.lane_takes(logits, k, keep) else [])
                for variant in variants:
                    check_emulated(run, logits, k, keep, group, G, T % 5 == 0, f"E={E} k={k} T={T} {dtype}",
                                   variant=variant)
                    if variant == "lane" and cuda_route.compact_ids_apply(logits, k, keep):
                        check_emulated(run, logits, k, keep, group, G, False, f"E={E} k={k} T={T} {dtype} ids8",
                                       variant=variant, ids8=True)
                    check_emulated(run, logits, k, None, None, 1, False, f"E={E} k={k} T={T} {dtype} no mask",
                                   variant=variant)
    for kind in KINDS:
        for dtype in (torch.float16, torch.bfloat16):
            for E, k in ((64, 8), (32, 4), (60, 4)):
                logits = adversarial_logits(kind, 70, E, dtype, gen)
                keep = make_keep(2, E, k, False, gen)
                group = torch.randint(-1, 2, (70,), generator=gen)
                for variant in ("lane", "split"):
                    check_emulated(run, logits, k, keep, group, 2, False, f"{kind} E={E} {dtype}", variant=variant)
                if E == 64 and dtype == torch.bfloat16:  # (the tournament top-k: an option of this shape)
                    check_emulated(run, logits, k, keep, group, 2, False, f"{kind} tournament",
                                   options=("topk8", "tournament", "stage_ids"))
    # the op's top-8 calls of the lane kernel at a T where E = 64 and 128 take the tournament top-k (E = 32 the
    # network): the emulation's 2 SMs hold one block each, so past two thirds of a tile a warp of the two blocks (E =
    # 32: 8 warps a block, 64: 4, 128: 2) the op takes it (tournament_pays); T gives each warp two tiles, the last partial
    for dtype, E in itertools.product((torch.float16, torch.bfloat16), (32, 64, 128)):
        T = 2 * 32 * 256 // E * 2 + 37  # (a partial last tile)
        for kind in ("ties", "neg_inf", "wide"):
            logits = adversarial_logits(kind, T, E, dtype, gen)
            keep = make_keep(3, E, 8, kind == "ties", gen)
            group = torch.randint(-1, 3, (T,), generator=gen)
            check_emulated(run, logits, 8, keep, group, 3, kind == "wide", f"{kind} E={E} {dtype} op's tournament")
    # the packed top-k at its windows' edges, and every option set and grid of the lane kernel
    logits, keep, tight_keep, group = packed_window_case(torch.Generator().manual_seed(SESSION_SEED + 29))
    for i, options in enumerate(lane_option_sets()):  # (the two masks and grids in turn: each set under one)
        check_emulated(run, logits, 8, (keep, tight_keep)[i % 2], group, 3, False, "window case", options=options,
                       grid_policy="balanced" if len(options) % 2 else "wave")
    for options in (("topk8", "packed16"), ("topk8", "tournament"), ("tournament", "stage_ids")):
        check_emulated(run, logits, 8, few_kept(tight_keep), group, 3, False, "window case, a group keeping 5",
                       options=options)
    # the one-pass softmax denominator's edges (each falling back in its own warp)
    logits, keep, group = one_pass_softmax_case(torch.Generator().manual_seed(SESSION_SEED + 31))
    for options in ((), ("two_pass_softmax",), ("topk8", "tournament", "stage_ids")):
        check_emulated(run, logits, 8, keep, group, 2, bool(options), "one-pass softmax case", options=options)
    # normal logits, every expert kept: every warp's rows fit the packed top-k's windows (its fast path throughout)
    logits = adversarial_logits("normal", 300, 64, torch.bfloat16, gen)
    keep_all = torch.ones(3, 64, dtype=torch.bool)
    group = torch.randint(-1, 3, (300,), generator=gen)
    for options in (("packed16",), ("topk8", "packed16")):
        check_emulated(run, logits, 8, keep_all, group, 3, False, "normal, all kept", options=options)
    # the timeline instance: the op's results, and each warp's stamps in order over its share of the tiles
    logits = adversarial_logits("normal", 32 * 11 + 7, 64, torch.bfloat16, gen)
    keep = make_keep(3, 64, 8, False, gen)
    group = torch.randint(-1, 3, (logits.shape[0],), generator=gen)
    for options in (None, ("sm_block",)):
        timeline = torch.zeros(64, TIMELINE_SLOTS, dtype=torch.int64)
        check_emulated(run, logits, 8, keep, group, 3, False, f"timeline {options}", timeline=timeline,
                       options=options)
        check_timeline(timeline, -(-logits.shape[0] // 32))
    # strided rows (the lane kernel takes 16-byte aligned row strides; the split kernel any)
    wide = adversarial_logits("distinct", 50, 80, torch.bfloat16, gen)
    check_emulated(run, wide[:, :64], 8, None, None, 1, False, "row stride 80")
    check_emulated(run, wide[:, 3:67], 8, None, None, 1, False, "misaligned rows")
    # padded rows (E = 60: the lane kernel with 8-byte copies) with a row stride, 8-byte aligned or not
    keep = make_keep(2, 60, 4, False, gen)
    group = torch.randint(-1, 2, (50,), generator=gen)
    check_emulated(run, wide[:, :60], 4, keep, group, 2, False, "padded rows, row stride 80")
    check_emulated(run, wide[:, 4:64], 4, None, None, 1, False, "padded rows at an 8-byte offset")
    check_emulated(run, wide[:, 2:62], 4, keep, group, 2, False, "padded rows, misaligned (the split kernel)")
    check_emulated(run, wide.t().contiguous().t()[:, :64], 8, None, None, 1, False, "column-major logits")
    emulated_variant_checks(run, gen)
    emulated_chunk_checks(run, gen)
    emulated_chunk_softmax_checks(run, gen)
    print("emulated forward checks passed")


# router shapes of the variants' emulated checks: Mixtral's, E_PAD 16 and 32 (row in one, two and four lanes),
# Qwen2-MoE's padded rows, OLMoE's, GPT-OSS' and Qwen3-MoE's 128, GLM-4.5's 160 and DeepSeek-V3's 256 (E_PAD 256)
VARIANT_SHAPES = [(8, 2), (16, 4), (24, 6), (60, 4), (64, 8), (128, 4), (160, 8), (256, 8), (256, 16)]


def _route_variant(name: str, E: int, k: int, gen: torch.Generator) -> dict:
    """route's variant arguments of route_cases.VARIANTS' ``name`` for E experts and top-k (DeepSeek-V3's 8 groups, 4
    kept, at E = 256), or ``"softmax_scaled"``: the softmax, not renormalised, times a scale."""
    if name == "softmax_scaled":
        return dict(scoring="softmax", scale=0.75)
    route_variant = variant_kwargs(name, E, gen, k)
    if name == "sigmoid_groups" and E == 256:
        route_variant.update(n_group=8, topk_group=4)
    return route_variant


def emulated_variant_checks(run, gen: torch.Generator) -> None:
    """route's router variants (route_cases.VARIANTS: a scale, softmax over the chosen experts, sigmoid scoring with a
    bias and DeepSeek-V3's group limit) through both forward kernels against the reference: every shape of
    VARIANT_SHAPES in turn with each dtype, keep masks (tight ones: kept groups holding fewer allowed experts than
    top_k), out-of-range group ids and partial warps, then adversarial values."""
    names = [name for name in VARIANTS if name != "softmax"] + ["softmax_scaled"]
    for n, (name, (E, k)) in enumerate(itertools.product(names, VARIANT_SHAPES)):
        dtype = DTYPES[n % 3]
        T = (45, 200, 1)[n % 3]
        route_variant = _route_variant(name, E, k, gen)
        renormalize = route_variant.pop("renormalize", False)
        logits = adversarial_logits("normal", T, E, dtype, gen)
        keep = make_keep(3, E, k, n % 2 == 0, gen)
        group = torch.randint(-1, 4, (T,), generator=gen)
        lane = cuda_route.lane_takes(logits, k, keep, scoring=route_variant.get("scoring", "softmax"))
        kernels = ["split"] + (["lane"] if lane else [])
        for kernel in kernels:
            check_emulated(run, logits, k, keep, group, 3, renormalize, f"{name} E={E} k={k} T={T} {dtype}",
                           variant=kernel, route_variant=route_variant)
        check_emulated(run, logits, k, None, None, 1, renormalize, f"{name} E={E} k={k} T={T} {dtype} no mask",
                       route_variant=route_variant)
    for n, (name, kind) in enumerate(itertools.product(names, KINDS)):
        E, k = ((64, 8), (256, 8), (16, 4))[n % 3]
        dtype = DTYPES[n % 3] if E != 64 else torch.bfloat16
        route_variant = _route_variant(name, E, k, gen)
        renormalize = route_variant.pop("renormalize", False)
        logits = adversarial_logits(kind, 70, E, dtype, gen)
        keep = make_keep(2, E, k, n % 2 == 1, gen)
        group = torch.randint(-1, 2, (70,), generator=gen)
        check_emulated(run, logits, k, keep, group, 2, renormalize, f"{name} {kind} E={E} {dtype}",
                       route_variant=route_variant)


# the chunk kernel's shapes (E, top_k, n_group, topk_group): one to sixteen columns, GLM-4.5's 160, DeepSeek-V3's 8
# groups of one column, groups of two columns, Kimi-K2's 384 experts, and top-k below 8
CHUNK_SHAPES = [(32, 8, 1, 1), (64, 3, 2, 1), (96, 8, 3, 2), (160, 8, 1, 1), (256, 8, 8, 4), (256, 6, 4, 2),
                (384, 8, 1, 1), (512, 8, 16, 4), (512, 1, 1, 1)]


def check_forward_launcher_refuses_saved_logits(library: ctypes.CDLL) -> None:
    """The forward launcher writes chosen_logits on the chunk kernel's sigmoid calls alone: it refuses them
    (cudaErrorInvalidValue, before any launch) on the split kernel and for a softmax router."""
    logits = torch.randn(40, 64).bfloat16()
    for variant, scoring, refused in (("split", "sigmoid", True), ("chunk", "softmax", True),
                                      ("chunk", "sigmoid", False)):
        weights, ids = torch.empty(40, 8, dtype=torch.bfloat16), torch.empty(40, 8, dtype=torch.int64)
        chosen = torch.empty(40, 8)  # (alive until the launch returns)
        params = cuda_route.forward_params(weights, ids, logits, 8, None, None, None, False, variant=variant,
                                           scoring=scoring, chosen_logits=chosen)
        code = library.moe_fastmask_route_cuda_forward(ctypes.byref(params), cuda_route.DTYPE_CODES[logits.dtype], 0,
                                                       None)
        assert (code != 0) == refused, (variant, scoring, code)


def emulated_chunk_checks(run, gen: torch.Generator) -> None:
    """The sigmoid router's chunk kernel (chunk_takes' calls) against the reference, and against the split kernel
    where that takes the call too (the same selection values, so the same ids): every shape of CHUNK_SHAPES with each
    dtype, with and without a bias and renormalisation, keep masks (tight ones: kept groups holding fewer allowed
    experts than top_k, so that rows take the other groups' experts at -inf), out-of-range group ids and partial
    warps; then adversarial values, strided and misaligned rows, and a bias of -inf on some experts."""
    for n, ((E, k, n_group, topk_group), dtype) in enumerate(itertools.product(CHUNK_SHAPES, DTYPES)):
        assert cuda_route.chunk_takes(E, k, scoring="sigmoid", n_group=n_group), (E, k, n_group)
        T = (45, 200, 1, 9)[n % 4]
        route_variant = dict(scoring="sigmoid", n_group=n_group, topk_group=topk_group, scale=(1.0, 2.5)[n % 2])
        if n % 3:
            route_variant["bias"] = torch.randn(E, generator=gen) * 0.1
        renormalize = n % 2 == 0
        logits = adversarial_logits(("normal", "ties", "wide")[n % 3], T, E, dtype, gen)
        keep = make_keep(3, E, k, n % 2 == 0, gen)
        group = torch.randint(-1, 4, (T,), generator=gen)
        if n % 4 == 1:
            group = group.to(torch.int32)
        where = f"chunk E={E} k={k} groups {n_group}/{topk_group} T={T} {dtype}"
        for keep_g, group_g, G in ((keep, group, 3), (None, None, 1)):
            # without the saved logits here (check_emulated's run saves them): the same results
            weights, ids = run(logits, k, keep_g, group_g, None, renormalize, variant="chunk",
                               route_variant=route_variant, saved=False)
            checked = check_emulated(run, logits, k, keep_g, group_g, G, renormalize, where, variant="chunk",
                                     route_variant=route_variant)
            assert torch.equal(ids, checked[1]), f"{where}: the saved logits changed the ids"
            torch.testing.assert_close(weights, checked[0], rtol=0, atol=0, equal_nan=True)
            if E <= cuda_route.MAX_SIGMOID_EXPERTS:  # the split kernel: the same ids, weights within rounding
                split_w, split_ids = run(logits, k, keep_g, group_g, None, renormalize, variant="split",
                                         route_variant=route_variant)
                assert torch.equal(ids, split_ids), f"{where}: chunk and split kernels chose differently"
                torch.testing.assert_close(weights, split_w, equal_nan=True, msg=lambda m: f"{where}\n{m}")
    for n, kind in enumerate(KINDS):
        E, k, n_group, topk_group = CHUNK_SHAPES[4 + n % 4]
        dtype = DTYPES[n % 3]
        route_variant = dict(scoring="sigmoid", n_group=n_group, topk_group=topk_group,
                             bias=torch.randn(E, generator=gen) * 0.1)
        logits = adversarial_logits(kind, 70, E, dtype, gen)
        keep = make_keep(2, E, k, n % 2 == 1, gen)
        group = torch.randint(-1, 2, (70,), generator=gen)
        check_emulated(run, logits, k, keep, group, 2, n % 2 == 0, f"chunk {kind} E={E} {dtype}", variant="chunk",
                       route_variant=route_variant)
    check_forward_launcher_refuses_saved_logits(run.library)
    # rows of a stride that is not a multiple of 16 bytes, or at an odd offset: the kernel's element loads
    wide = adversarial_logits("normal", 50, 300, torch.bfloat16, gen)
    sigmoid = dict(scoring="sigmoid", n_group=4, topk_group=2)
    check_emulated(run, wide[:, :256], 8, None, None, 1, True, "chunk, row stride 300", variant="chunk",
                   route_variant=sigmoid)
    check_emulated(run, wide[:, 1:257], 8, None, None, 1, False, "chunk, misaligned rows", variant="chunk",
                   route_variant=sigmoid)
    check_emulated(run, wide.t().contiguous().t()[:, :160], 8, None, None, 1, False, "chunk, column-major logits",
                   variant="chunk", route_variant=dict(scoring="sigmoid"))
    # a bias of -inf: experts of a kept group at -inf, tied with the other groups' (the rows' fallback, exactly)
    bias = torch.randn(256, generator=gen) * 0.1
    bias[torch.randperm(256, generator=gen)[:200]] = -math.inf
    logits = adversarial_logits("normal", 40, 256, torch.float32, gen)
    for n_group, topk_group in ((8, 4), (8, 1), (1, 1)):
        check_emulated(run, logits, 8, None, None, 1, False, f"chunk, bias -inf, groups {n_group}/{topk_group}",
                       variant="chunk", route_variant=dict(scoring="sigmoid", bias=bias, n_group=n_group,
                                                           topk_group=topk_group))


# the chunk kernel's softmax routers (E, top_k): one column, lists of 8 and of 16 (top_k over 8), GLM-4.5's width,
# Qwen3-Next's 512 top-10, top-16 of 512
CHUNK_SOFTMAX_SHAPES = [(32, 1), (32, 16), (64, 8), (96, 9), (160, 8), (256, 8), (288, 3), (384, 16), (512, 10),
                        (512, 16)]


def emulated_chunk_softmax_checks(run, gen: torch.Generator) -> None:
    """The chunk kernel's softmax routers (16-bit logits) against the reference, ids exact, and against the split
    kernel (the same keys, so the same ids): every shape of CHUNK_SOFTMAX_SHAPES in both 16-bit dtypes, with and
    without renormalisation, a scale, softmax over the chosen experts, keep masks (tight ones: rows with fewer
    allowed experts than top_k), out-of-range group ids and partial warps; then the adversarial values (ties, signed
    zeros, -inf, wide ranges), and strided, misaligned and column-major rows."""
    dtypes = (torch.float16, torch.bfloat16)
    for n, ((E, k), dtype) in enumerate(itertools.product(CHUNK_SOFTMAX_SHAPES, dtypes)):
        assert cuda_route.chunk_takes(E, k, dtype=dtype), (E, k, dtype)
        T = (45, 200, 1, 9)[n % 4]
        route_variant = (dict(scale=2.5), {}, dict(scoring="softmax_chosen"))[n % 3]
        renormalize = n % 2 == 0
        logits = adversarial_logits(("normal", "ties", "wide")[n % 3], T, E, dtype, gen)
        keep = make_keep(3, E, k, n % 2 == 0, gen)
        group = torch.randint(-1, 4, (T,), generator=gen)
        if n % 4 == 1:
            group = group.to(torch.int32)
        where = f"chunk softmax E={E} k={k} T={T} {dtype} {route_variant}"
        for keep_g, group_g, G in ((keep, group, 3), (None, None, 1)):
            check_emulated(run, logits, k, keep_g, group_g, G, renormalize, where, variant="chunk",
                           route_variant=route_variant)
            weights, ids = run(logits, k, keep_g, group_g, None, renormalize, variant="chunk",
                               route_variant=route_variant)
            split_w, split_ids = run(logits, k, keep_g, group_g, None, renormalize, variant="split",
                                     route_variant=route_variant)
            assert torch.equal(ids, split_ids), f"{where}: chunk and split kernels chose differently"
            torch.testing.assert_close(weights, split_w, equal_nan=True, msg=lambda m: f"{where}\n{m}")
    for n, kind in enumerate(KINDS):
        E, k = CHUNK_SOFTMAX_SHAPES[n % len(CHUNK_SOFTMAX_SHAPES)]
        dtype = (torch.float16, torch.bfloat16)[n % 2]
        logits = adversarial_logits(kind, 70, E, dtype, gen)
        keep = make_keep(2, E, k, n % 2 == 1, gen)
        group = torch.randint(-1, 2, (70,), generator=gen)
        check_emulated(run, logits, k, keep, group, 2, n % 2 == 0, f"chunk softmax {kind} E={E} {dtype}",
                       variant="chunk")
    # more groups than the shared histogram holds (20 x 512 counters): counts through global atomics
    logits = adversarial_logits("normal", 90, 512, torch.bfloat16, gen)
    keep = make_keep(20, 512, 10, False, gen)
    group = torch.randint(-1, 21, (90,), generator=gen)
    check_emulated(run, logits, 10, keep, group, 20, True, "chunk softmax, counts in global memory", variant="chunk")
    # rows of a stride that is not a multiple of 16 bytes, or at an odd offset: the kernel's element loads
    wide = adversarial_logits("normal", 50, 544, torch.bfloat16, gen)
    check_emulated(run, wide[:, :512], 10, None, None, 1, True, "chunk softmax, row stride 544", variant="chunk")
    check_emulated(run, wide[:, 1:257], 8, None, None, 1, False, "chunk softmax, misaligned rows", variant="chunk")
    check_emulated(run, wide.t().contiguous().t()[:, :160], 12, None, None, 1, False,
                   "chunk softmax, column-major logits", variant="chunk")


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
@pytest.mark.prebuild.with_args(start_forward_emulation_build)
def test_forward_kernel_source_emulated_on_the_host(tmp_path):
    """Both forward kernels of csrc/route_cuda.cu, compiled for the host with the device emulated by threads, against
    the reference (emulated_forward_checks), under AddressSanitizer where g++ has it: every load and store within
    its tensor or the block's shared memory. Runs in a fresh process (a sanitizer report, or threads that disagree
    on a barrier, end it)."""
    code = "import test_route_cuda as t\nt.emulated_forward_checks({library!r})\n"
    cuda_emulation.run_emulated_checks(build_forward_emulation, code, tmp_path, SESSION_SEED,
                                       "emulated forward checks passed")
