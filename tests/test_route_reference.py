"""The reference path of ``route`` (backend="torch"): semantics, autograd, custom-op registration, argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import SESSION_SEED
from route_cases import (assert_compiled_matches_eager, extreme_grads_case, make_case, naive_route, random_grid,
                         tolerance)

import moe_fastmask
from moe_fastmask import route
from moe_fastmask.ops import route_reference


def run(case, backend="torch", counts=None):
    counts = case.new_counts() if counts is None else counts
    weights, ids = route(case.logits, case.top_k, case.keep, case.group, counts, case.renormalize, backend)
    return weights, ids, counts


@pytest.mark.parametrize("spec", random_grid(40, SESSION_SEED), ids=lambda s: f"T{s['num_tokens']}-E{s['num_experts']}-k{s['top_k']}")
def test_reference_matches_naive_loop(spec):
    case = make_case(**spec)
    weights, ids, counts = run(case)
    exp_w, exp_ids, exp_counts = naive_route(case)
    assert weights.dtype == case.logits.dtype and ids.dtype == torch.int64
    assert torch.equal(ids, exp_ids), case.describe()
    atol, rtol = tolerance(case.logits.dtype)
    torch.testing.assert_close(weights.double(), exp_w, atol=atol, rtol=rtol, msg=case.describe)
    assert torch.equal(counts, exp_counts), case.describe()


def test_equals_hugging_face_olmoe_router_without_mask():
    """keep=None must be the transformers OLMoE router, bit for bit, for both norm_topk_prob settings."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    from moe_fastmask.pipeline.demo import tiny_olmoe_config

    for norm in (False, True):
        config = tiny_olmoe_config(64, num_experts=60, top_k=8, norm_topk_prob=norm, hidden_size=32)
        router = OlmoeTopKRouter(config)
        torch.nn.init.normal_(router.weight)
        for dtype in (torch.float32, torch.bfloat16):
            router = router.to(dtype)
            hidden = torch.randn(50, 32, dtype=dtype)
            logits, hf_weights, hf_ids = router(hidden)
            weights, ids = route(logits, 8, renormalize=norm, backend="torch")
            assert torch.equal(weights, hf_weights)
            if dtype == torch.float32:
                assert torch.equal(ids, hf_ids)
            else:  # bf16 logits tie exactly; torch.topk orders ties arbitrarily, we take the lower index
                probs = torch.softmax(logits.float(), dim=-1)
                assert torch.equal(probs.gather(1, ids), probs.gather(1, hf_ids))


def test_counts_accumulate_and_unused_experts_stay_zero():
    case = make_case(64, 16, 2, torch.float32, seed=SESSION_SEED, groups="with_unassigned", num_groups=3)
    counts = torch.full((3, 16), 5, dtype=torch.int64)
    _, ids, counts = run(case, counts=counts)
    _, _, expected = naive_route(case)
    assert torch.equal(counts, expected + 5)
    used = torch.zeros(16, dtype=torch.bool)
    used[ids[case.group >= 0].unique()] = True
    assert torch.equal(counts.sum(0) > 15, used)


def test_single_token_and_single_expert():
    w, i, c = run(make_case(1, 1, 1, torch.float32, seed=1))
    assert torch.equal(i, torch.zeros(1, 1, dtype=torch.int64)) and float(w) == 1.0 and int(c.sum()) == 1


def test_empty_batch():
    logits = torch.randn(0, 8)
    counts = torch.zeros(1, 8, dtype=torch.int64)
    w, i = route(logits, 2, counts=counts, backend="torch")
    assert w.shape == (0, 2) and i.shape == (0, 2) and int(counts.sum()) == 0


def test_ties_go_to_lower_index():
    logits = torch.zeros(3, 8, dtype=torch.bfloat16)
    logits[1, [2, 5, 6]] = 1.0
    logits[2, :] = torch.tensor([0.5, 1, 1, 0.5, 1, 1, 0.25, 1], dtype=torch.bfloat16)
    _, ids = route(logits, 3, backend="torch")
    assert ids.tolist() == [[0, 1, 2], [2, 5, 6], [1, 2, 4]]


def test_nan_policy():
    logits = torch.randn(4, 8)
    logits[1, 3] = float("nan")
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 0] = False
    logits[2] = float("-inf")  # every allowed logit -inf
    counts = torch.zeros(1, 8, dtype=torch.int64)
    w, ids = route(logits, 2, keep=keep, counts=counts, backend="torch")
    assert torch.isnan(w[1]).all() and torch.isnan(w[2]).all()
    assert not torch.isnan(w[[0, 3]]).any()
    assert ((ids >= 0) & (ids < 8)).all() and int(counts.sum()) == 8


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(renormalize, masked):
    case = make_case(6, 10, 3, torch.float64, seed=SESSION_SEED + 1, mask="per_group" if masked else "none", groups="with_unassigned" if masked else "none")
    logits = case.logits.clone().requires_grad_()
    fn = lambda x: route(x, case.top_k, case.keep, case.group, None, renormalize, "torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_backward_matches_autograd_of_reference(renormalize):
    case = make_case(33, 64, 8, torch.float32, seed=SESSION_SEED + 2, mask="per_group", groups="with_unassigned", num_groups=3)
    x1 = case.logits.clone().requires_grad_()
    x2 = case.logits.clone().requires_grad_()
    w1, _ = route_reference(x1, 8, case.keep, case.group, None, renormalize)
    w2, _ = route(x2, 8, case.keep, case.group, None, renormalize, "torch")
    grad = torch.randn_like(w1)
    w1.backward(grad)
    w2.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_of_grads_near_the_largest_value_stays_finite(renormalize):
    """Grads near bfloat16's largest value with opposite signs: g - dot lies beyond float32's range while every
    gradient lies within it. The closed form takes w g - w dot, so it matches the float64 computation instead of
    giving inf."""
    from moe_fastmask.ops.reference import route_backward_reference

    logits, ids, grad = extreme_grads_case(torch.Generator().manual_seed(SESSION_SEED + 3), renormalize,
                                           route_reference)
    out = route_backward_reference(grad, logits, None, None, ids, renormalize)
    exact = route_backward_reference(grad.double(), logits.double(), None, None, ids, renormalize)
    assert torch.isfinite(exact).all()
    torch.testing.assert_close(out.double(), exact, atol=8e-3, rtol=1.6e-2)


def test_opcheck():
    case = make_case(9, 12, 3, torch.float32, seed=SESSION_SEED + 3, mask="per_group", groups="with_unassigned")
    args = (case.logits, 3, case.keep, case.group, case.new_counts(), True, "torch")
    torch.library.opcheck(torch.ops.moe_fastmask.route.default, args)
    torch.library.opcheck(torch.ops.moe_fastmask.route.default, (case.logits, 3, None, None, None, False, "torch"))
    weights, ids = route(case.logits, 3, backend="torch")
    torch.library.opcheck(
        torch.ops.moe_fastmask.route_backward.default,
        (torch.randn_like(weights), case.logits, case.keep, case.group, ids, False, "torch"),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    case = make_case(17, 16, 4, torch.float32, seed=SESSION_SEED + 4, mask="random", groups="random", renormalize=True)
    assert_compiled_matches_eager(case, "torch")


# ------------------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------------------

E = 8


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(logits=torch.randn(4)), ValueError, "logits must have shape"),
        (dict(logits=torch.randn(4, E).long()), TypeError, "logits must be float"),
        (dict(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(top_k=0), ValueError, "top_k must be in"),
        (dict(top_k=E + 1), ValueError, "top_k must be in"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(keep=torch.ones(2, E)), TypeError, "keep must be a bool"),
        (dict(keep=torch.ones(2, E + 1, dtype=torch.bool)), ValueError, "keep must have shape"),
        (dict(keep=torch.zeros(2, E, dtype=torch.bool).index_fill_(1, torch.tensor([0, 1, 2]), True).index_fill_(0, torch.tensor([1]), False)), ValueError, r"keep rows \[1\] allow fewer"),
        (dict(group=torch.zeros(3, dtype=torch.int64)), ValueError, "group must have shape"),
        (dict(group=torch.zeros(4)), TypeError, "group must be int32 or int64"),
        (dict(group=torch.tensor([0, 1, 2, 0]), counts=torch.zeros(2, E, dtype=torch.int64)), ValueError, r"group ids must be in \[-1, 2\)"),
        (dict(group=torch.tensor([0, -2, 0, 0])), ValueError, "group ids must be in"),
        (dict(counts=torch.zeros(1, E, dtype=torch.int32)), TypeError, "counts must be int64"),
        (dict(counts=torch.zeros(1, E + 1, dtype=torch.int64)), ValueError, "counts must have shape"),
        (dict(counts=torch.zeros(E, 2, dtype=torch.int64).t()), ValueError, "counts must be contiguous"),
        (dict(counts=torch.zeros(3, E, dtype=torch.int64), keep=torch.ones(2, E, dtype=torch.bool)), ValueError, "counts has 3 groups but keep has 2"),
        (dict(renormalize=1), TypeError, "renormalize must be a bool"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, error, pattern):
    args = dict(logits=torch.randn(4, E), top_k=3, keep=None, group=None, counts=None, renormalize=False, backend="torch")
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        route(**args)


def test_validate_false_skips_value_checks_only():
    group = torch.tensor([0, 5, 0, 0])
    with pytest.raises(ValueError, match="group must have shape"):
        route(torch.randn(4, E), 2, group=group[:3], backend="torch", validate=False)
    # out-of-range ids are not scanned when validate=False (hot loops validate once)
    route(torch.randn(4, E), 2, group=group, backend="torch", validate=False)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        route(torch.randn(4, E), 2, backend="triton")


def test_top_level_api():
    assert moe_fastmask.route is route
    assert callable(moe_fastmask.apply_to_olmoe) and callable(moe_fastmask.RoutingRecorder)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_route_prechecked_matches_route(backend, session_seed):
    """The unchecked entry point integrations call gives route's results, counts and gradients."""
    from moe_fastmask.ops import resolve_backend, route_prechecked

    try:
        concrete = resolve_backend(backend, torch.device("cpu"))
    except ValueError as exc:
        pytest.skip(str(exc))
    case = make_case(37, 16, 4, torch.float32, seed=session_seed, mask="per_group", groups="with_unassigned",
                     num_groups=3, renormalize=True)
    results = []
    for fn in (route, route_prechecked):
        logits = case.logits.clone().requires_grad_(True)
        counts = case.new_counts()
        weights, ids = fn(logits, case.top_k, case.keep, case.group, counts, case.renormalize, concrete)
        (weights * torch.linspace(-1, 1, weights.numel()).view_as(weights)).sum().backward()
        results.append((weights.detach(), ids, counts, logits.grad))
        with torch.no_grad():  # the inference path, without autograd
            weights_ng, ids_ng = fn(logits, case.top_k, case.keep, case.group, None, case.renormalize, concrete)
        assert torch.equal(weights_ng, weights.detach()) and torch.equal(ids_ng, ids)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][3].abs().sum() > 0
