"""Packed-key router forward (``route_fast``) against a float64 oracle of its ranking contract.

Contract: rank by the masked logit; masked experts below every allowed expert (also allowed ``-inf`` ones); -0.0
equals +0.0; ties to the lower index; group ids outside ``[0, G)`` use every expert and are not counted.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from route_cases import POISON_ID, tolerance

from moe_fastmask.ops import route_fast_launch, triton_route

pytestmark = [
    pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning"),
]
needs_interpreter = pytest.mark.skipif(not triton_route.is_available("cpu"), reason="needs Triton's interpreter")
HAS_CUDA = torch.cuda.is_available() and triton_route.is_available("cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHODS = ["bitonic", "iterative"] + ["tl_topk"] * route_fast_launch.tl_topk_available()


def oracle(logits, top_k, keep, group, num_groups, renormalize):
    """(weights float64 [T, k], ids [T, k], counts [G, E]) by a per-token loop over the contract."""
    T, E = logits.shape
    x = logits.double()
    weights = torch.zeros(T, top_k, dtype=torch.float64)
    ids = torch.zeros(T, top_k, dtype=torch.int64)
    counts = torch.zeros(num_groups, E, dtype=torch.int64)
    for t in range(T):
        g = 0 if group is None else int(group[t])
        in_range = 0 <= g < num_groups
        allowed = [True] * E
        if keep is not None and in_range:
            allowed = [bool(v) for v in keep[g]]
        # (masked last, larger logit first, lower index first); -0.0 == 0.0 in Python comparisons
        order = sorted(range(E), key=lambda e: (not allowed[e], -float(x[t, e]) if allowed[e] else 0.0, e))
        chosen = order[:top_k]
        row = [float(x[t, e]) if allowed[e] else -math.inf for e in range(E)]
        peak = max(row)
        if peak == -math.inf:
            probs = [math.nan] * E
        else:
            exps = [math.exp(v - peak) for v in row]
            total = sum(exps)
            probs = [v / total for v in exps]
        w = [probs[e] for e in chosen]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        weights[t] = torch.tensor(w, dtype=torch.float64)
        ids[t] = torch.tensor(chosen)
        if in_range:
            for e in chosen:
                counts[g, e] += 1
    return weights, ids, counts


def draw_logits(kind, T, E, dtype, gen):
    if kind == "random":
        x = torch.randn(T, E, generator=gen)
    elif kind == "wide":
        x = torch.randn(T, E, generator=gen) * 30
    elif kind == "zeros":  # exact ties, half of them -0.0
        x = torch.zeros(T, E)
        x[torch.rand(T, E, generator=gen) < 0.5] = -0.0
    elif kind == "half_integers":
        x = torch.randint(-3, 4, (T, E), generator=gen).float() / 2
        x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    elif kind == "bf16_quantised":
        x = (torch.randn(T, E, generator=gen) * 0.05).to(torch.bfloat16).float()
    elif kind == "neg_inf":
        x = torch.randint(-2, 3, (T, E), generator=gen).float()
        x[torch.rand(T, E, generator=gen) < 0.5] = -math.inf
        x[: max(1, T // 4)] = -math.inf  # rows whose every logit is -inf
    else:
        raise ValueError(kind)
    return x.to(dtype)


def draw_keep(mode, G, E, top_k, gen):
    if mode == "none":
        return None
    keep = torch.zeros(G, E, dtype=torch.bool)
    for g in range(G):
        n = top_k if mode == "exact_k" else int(torch.randint(top_k, E + 1, (1,), generator=gen))
        keep[g, torch.randperm(E, generator=gen)[:n]] = True
    return keep


def draw_group(mode, T, G, gen, dtype):
    if mode == "none":
        return None
    if mode == "valid":
        return torch.randint(0, G, (T,), generator=gen).to(dtype)
    # -1 (unassigned) and out-of-range ids on both sides
    choices = torch.tensor([-1, 0, G - 1, G, G + 1, 1000, -2, -(1 << 20)])
    return choices[torch.randint(0, len(choices), (T,), generator=gen)].to(dtype)


def run_case(logits, top_k, keep, group, G, renormalize, method, lanes_per_row=1, block_t=None, device="cpu"):
    """Forward with poisoned outputs and counts as a view of a larger poisoned buffer; checks against the oracle."""
    T, E = logits.shape
    weights = torch.full((T, top_k), float("nan"), dtype=logits.dtype, device=device)
    ids = torch.full((T, top_k), POISON_ID, dtype=torch.int64, device=device)
    buffer = torch.full((G + 2, E + 3), 12345, dtype=torch.int64, device=device).view(-1)
    start = E + 3  # counts sit between poisoned guard elements on both sides
    counts = buffer[start : start + G * E].view(G, E)
    counts.zero_()
    before = buffer.clone()
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    route_fast_launch.route_fast_forward(
        move(logits), top_k, move(keep), move(group), counts, renormalize, out=(weights, ids), select=method,
        lanes_per_row=lanes_per_row, block_t=block_t,
    )
    weights, ids, counts, buffer, before = (t.cpu() for t in (weights, ids, counts, buffer, before))
    ref_w, ref_ids, ref_counts = oracle(logits, top_k, keep, group, G, renormalize)
    what = (f"T={T} E={E} k={top_k} {logits.dtype} keep={keep is not None} group={group is not None} G={G} "
            f"renorm={renormalize} method={method} lanes_per_row={lanes_per_row}")
    assert torch.equal(ids, ref_ids), what
    assert torch.equal(counts, ref_counts), what
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[start : start + G * E] = False
    assert torch.equal(buffer[outside], before[outside]), f"write outside counts: {what}"
    atol, rtol = tolerance(logits.dtype)
    torch.testing.assert_close(weights.double(), ref_w, atol=atol, rtol=rtol, equal_nan=True, msg=what)
    return ids, counts


CASES = []
_rng = random.Random(SESSION_SEED)
for E in (8, 60, 64, 128, 256, 512):
    for k in (1, 2, 4, 8, 16):
        if k > E:
            continue
        CASES.append(dict(E=E, k=k, dtype=_rng.choice(DTYPES), seed=_rng.randrange(1 << 30)))


@needs_interpreter
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", CASES, ids=[f"E{c['E']}-k{c['k']}" for c in CASES])
def test_shapes_random(spec, method):
    gen = torch.Generator().manual_seed(spec["seed"])
    T = 37 if spec["E"] <= 128 else 9
    logits = draw_logits("random", T, spec["E"], spec["dtype"], gen)
    G = 3
    keep = draw_keep("random", G, spec["E"], spec["k"], gen)
    group = draw_group("valid", T, G, gen, torch.int64)
    run_case(logits, spec["k"], keep, group, G, bool(spec["seed"] & 1), method)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["wide", "zeros", "half_integers", "bf16_quantised", "neg_inf"])
@pytest.mark.parametrize("keep_mode", ["none", "random", "exact_k"])
def test_adversarial(kind, keep_mode, dtype):
    gen = torch.Generator().manual_seed(SESSION_SEED + zlib.crc32(f"{kind}{keep_mode}{dtype}".encode()))
    for E, k in ((64, 8), (60, 4), (8, 2)):
        G = 2
        logits = draw_logits(kind, 33, E, dtype, gen)
        keep = draw_keep(keep_mode, G, E, k, gen)
        group = draw_group("out_of_range", 33, G, gen, torch.int32)
        run_case(logits, k, keep, group, G, False, "bitonic")
        run_case(logits, k, keep, group, G, True, "iterative", lanes_per_row=0)
        run_case(logits, k, keep, group, G, True, "bitonic", lanes_per_row=4)


@needs_interpreter
def test_masked_expert_ranks_below_allowed_neg_inf():
    logits = torch.tensor([[0.3, -0.2, 1.0, -math.inf]])
    keep = torch.tensor([[False, False, True, True]])
    for method in METHODS:
        ids, counts = run_case(logits, 2, keep, None, 1, False, method)
        assert ids.tolist() == [[2, 3]] and counts.tolist() == [[0, 0, 1, 1]]


@needs_interpreter
def test_underflowing_allowed_expert_beats_masked():
    for dtype in DTYPES:
        logits = torch.tensor([[5.0, 0.0, -200.0, 1.0]], dtype=dtype)
        keep = torch.tensor([[False, True, True, False]])
        ids, _ = run_case(logits, 2, keep, None, 1, False, "bitonic")
        assert ids.tolist() == [[1, 2]]


@needs_interpreter
def test_signed_zeros_tie_to_lower_index():
    for dtype in DTYPES:
        for method in METHODS:
            ids, _ = run_case(torch.tensor([[-0.0, 0.0, -1.0]], dtype=dtype), 1, None, None, 1, False, method)
            assert ids.tolist() == [[0]]
            ids, _ = run_case(torch.tensor([[0.0, -0.0, 0.0, -0.0]], dtype=dtype), 4, None, None, 1, False, method)
            assert ids.tolist() == [[0, 1, 2, 3]]


@needs_interpreter
def test_logit_order_not_weight_order():
    # 0.0 and 1e-8 give the same float32 weight; the larger logit ranks first
    ids, _ = run_case(torch.tensor([[0.0, 1e-8, -5.0]]), 1, None, None, 1, False, "bitonic")
    assert ids.tolist() == [[1]]


@needs_interpreter
def test_out_of_range_groups_not_counted_nor_written():
    E = 64
    logits = torch.randn(6, E)
    keep = torch.ones(2, E, dtype=torch.bool)
    keep[:, :8] = False
    group = torch.tensor([3, 1000, -2, -1, 0, 1], dtype=torch.int64)
    ids, counts = run_case(logits, 8, keep, group, 2, False, "bitonic")
    assert int(counts.sum()) == 16
    assert (ids[4:] >= 8).all()


@needs_interpreter
@pytest.mark.parametrize("block_t", [1, 4, 16, 64])
def test_tile_sizes(block_t):
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = draw_logits("half_integers", 70, 64, torch.bfloat16, gen)
    keep = draw_keep("random", 3, 64, 8, gen)
    group = draw_group("out_of_range", 70, 3, gen, torch.int64)
    run_case(logits, 8, keep, group, 3, True, "bitonic", block_t=block_t)


@needs_interpreter
def test_strided_logits_and_no_counts():
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = draw_logits("wide", 40, 60, torch.float16, gen).t().contiguous().t()
    weights, ids = route_fast_launch.route_fast_forward(logits, 4, None, None, None, False)
    _, ref_ids, _ = oracle(logits, 4, None, None, 1, False)
    assert torch.equal(ids, ref_ids)


@needs_interpreter
def test_bad_arguments():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="select"):
        route_fast_launch.route_fast_forward(logits, 2, None, None, None, False, select="heap")
    with pytest.raises(ValueError, match="top_k"):
        route_fast_launch.route_fast_forward(logits, 9, None, None, None, False)
    with pytest.raises(ValueError, match="block_t"):
        route_fast_launch.route_fast_forward(logits, 2, None, None, None, False, block_t=3)
    with pytest.raises(TypeError, match="logits"):
        route_fast_launch.route_fast_forward(logits.double(), 2, None, None, None, False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("lanes_per_row", [0, 1, 2, 4])
@pytest.mark.parametrize("method", ["bitonic", "iterative"])
def test_gpu_against_oracle(method, lanes_per_row):
    gen = torch.Generator().manual_seed(SESSION_SEED)
    for E, k in ((64, 8), (60, 4), (128, 16), (8, 8)):
        for kind in ("random", "wide", "zeros", "half_integers", "neg_inf"):
            for dtype in DTYPES:
                logits = draw_logits(kind, 64, E, dtype, gen)
                keep = draw_keep("exact_k" if kind == "neg_inf" else "random", 3, E, k, gen)
                group = draw_group("out_of_range", 64, 3, gen, torch.int64)
                run_case(logits, k, keep, group, 3, kind == "wide", method, lanes_per_row=lanes_per_row,
                         device="cuda")


@pytest.mark.skipif(
    bool(os.environ.get("MOE_FASTMASK_SOURCE_VIEW")),
    reason="the package runs from a copy of the sources (benchmarks/gpu_env.sh), not installed: the repository root "
    "then holds no moe_fastmask.kernels to import",
)
def test_kernel_module_loads_only_inside_the_package():
    code = (
        "import importlib\n"
        "try:\n"
        "    importlib.import_module('kernels.route_fast')\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
        "import moe_fastmask.kernels.route_fast as r\n"
        "print(r.__name__)\n"
    )
    repo = Path(__file__).resolve().parents[1]  # the repository root on sys.path, where kernels/ lives
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # (it keeps the root off sys.path)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "refused: moe_fastmask's Triton kernels are importable only" in result.stdout
    assert "moe_fastmask.kernels.route_fast" in result.stdout
