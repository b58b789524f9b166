"""route's router variants (scoring, selection bias, group-limited top-k, scale) on every backend: the reference
against an independent oracle and against transformers' own routers, every backend against the reference on random
and adversarial input (ids, weights, counts, gradients), large expert counts, tight masks, the registered ops, and
argument errors."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from conftest import SESSION_SEED, load_benchmark
from route_cases import (
    ADVERSARIAL_KINDS,
    VARIANTS,
    adversarial_case,
    make_case,
    matching_rows,
    naive_variant_route,
    recount,
    selection_of,
    tolerance,
    variant_kwargs,
)

from moe_fastmask import route
from moe_fastmask.ops import reference, resolve_backend

pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning"
)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cpp", "triton", "cuda"]  # (cuda: on a GPU only)
VARIANT_NAMES = list(VARIANTS)


def _device(backend: str) -> str:
    return "cpu" if backend == "cpp" else TRITON_DEVICE


def _require(backend: str) -> None:
    try:
        resolve_backend(backend, torch.device(_device(backend)))
    except ValueError as exc:
        pytest.skip(str(exc))


def _run(backend, logits, top_k, keep, group, num_groups, *, grad_seed=None, **kwargs):
    """route on ``backend`` with counts; returns CPU (weights, ids, counts, grad of a random weighted sum or None)."""
    device = _device(backend)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    x = logits.detach().to(device)
    if grad_seed is not None:
        x.requires_grad_()
    counts = torch.full((num_groups, logits.shape[1]), 0, dtype=torch.int64, device=device)
    kwargs = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    renormalize = kwargs.pop("renormalize", False)
    weights, ids = route(x, top_k, move(keep), move(group), counts, renormalize, backend, **kwargs)
    grad = None
    if grad_seed is not None:
        probe = torch.randn(weights.shape, generator=torch.Generator().manual_seed(grad_seed)).to(device)
        (weights.float() * probe).sum().backward()
        grad = x.grad.cpu()
    return weights.detach().cpu(), ids.cpu(), counts.cpu(), grad


def _allowed(num_tokens, keep, group, num_experts):
    allowed = reference.allowed_experts(num_tokens, keep, group)
    return torch.ones(num_tokens, num_experts, dtype=torch.bool) if allowed is None else allowed


def _check_against_reference(backend, logits, top_k, keep, group, num_groups, kwargs, *, with_grad):
    T, E = logits.shape
    weights, ids, counts, grad = _run(
        backend, logits, top_k, keep, group, num_groups, grad_seed=SESSION_SEED if with_grad else None, **kwargs
    )
    ref_w, ref_ids, ref_counts, ref_grad = _run(
        "torch", logits, top_k, keep, group, num_groups, grad_seed=SESSION_SEED if with_grad else None, **kwargs
    )
    allowed = _allowed(T, keep, group, E)
    assert ids.dtype == torch.int64 and weights.dtype == logits.dtype
    assert bool(allowed.gather(1, ids).all()), "a masked expert was chosen"
    assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert was chosen twice"
    assert torch.equal(counts, recount(ids, group, num_groups, E))
    exact = kwargs.get("scoring", "softmax") != "sigmoid"
    same = matching_rows(ids, ref_ids, logits, allowed, kwargs, exact)
    atol, rtol = tolerance(logits.dtype)
    torch.testing.assert_close(weights[same], ref_w[same], atol=atol, rtol=rtol, equal_nan=True)
    if with_grad:
        scale = abs(kwargs.get("scale", 1.0))
        torch.testing.assert_close(grad[same], ref_grad[same], atol=2 * atol * scale, rtol=rtol)
    return ids, weights


# --------------------------------------------------------------------------------------------------------------
# 1. The reference: against an independent oracle and against transformers' routers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_reference_matches_oracle(variant):
    rng = random.Random(SESSION_SEED + hash(variant) % 1000)
    for i in range(4):
        E = rng.choice([8, 16, 60, 64])
        top_k = rng.choice([1, 2, 4])
        case = make_case(
            rng.choice([1, 9, 33]), E, top_k, torch.float32, seed=rng.randrange(1 << 30),
            mask=rng.choice(["none", "per_group"]), groups=rng.choice(["none", "with_unassigned"]), num_groups=3,
        )
        kwargs = variant_kwargs(variant, E, torch.Generator().manual_seed(i), top_k)
        weights, ids = reference.route_reference(case.logits, top_k, case.keep, case.group, **kwargs)
        allowed = _allowed(case.logits.shape[0], case.keep, case.group, E)
        oracle_w, oracle_ids = naive_variant_route(case.logits, top_k, allowed, **kwargs)
        same = matching_rows(ids, oracle_ids, case.logits, allowed, kwargs, exact=False)
        assert bool(same.float().mean() >= 0.9)
        torch.testing.assert_close(weights[same].double(), oracle_w[same], atol=1e-6, rtol=1e-5)


def _family_routers():
    """(name, router module, route kwargs, ids sorted by HF?) of each family in the installed transformers."""
    import transformers

    hidden = 16
    specs = [
        ("Qwen2MoeConfig", "qwen2_moe", "Qwen2MoeTopKRouter",
         dict(num_experts=60, num_experts_per_tok=4, norm_topk_prob=False),
         lambda c: dict(scoring="softmax", renormalize=c.norm_topk_prob)),
        ("Qwen3MoeConfig", "qwen3_moe", "Qwen3MoeTopKRouter",
         dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
         lambda c: dict(scoring="softmax", renormalize=c.norm_topk_prob)),
        ("MixtralConfig", "mixtral", "MixtralTopKRouter", dict(num_local_experts=8, num_experts_per_tok=2),
         lambda c: dict(scoring="softmax", renormalize=True)),
        ("GptOssConfig", "gpt_oss", "GptOssTopKRouter", dict(num_local_experts=32, num_experts_per_tok=4),
         lambda c: dict(scoring="softmax_chosen")),
        ("DeepseekV3Config", "deepseek_v3", "DeepseekV3TopkRouter",
         dict(n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True),
         lambda c: dict(scoring="sigmoid", n_group=c.n_group, topk_group=c.topk_group,
                        renormalize=c.norm_topk_prob, scale=c.routed_scaling_factor)),
        ("Glm4MoeConfig", "glm4_moe", "Glm4MoeTopkRouter",
         dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True),
         lambda c: dict(scoring="sigmoid", n_group=c.n_group, topk_group=c.topk_group,
                        renormalize=c.norm_topk_prob, scale=c.routed_scaling_factor)),
    ]
    routers = []
    for config_name, module_name, router_name, config_kwargs, route_kwargs in specs:
        config_cls = getattr(transformers, config_name, None)
        module = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[router_name])
        router_cls = getattr(module, router_name, None)
        if config_cls is None or router_cls is None:
            continue
        config = config_cls(hidden_size=hidden, **config_kwargs)
        routers.append((module_name, router_cls(config), route_kwargs(config)))
    return routers


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_transformers_routers(backend):
    """Each family's router in the installed transformers, with random weights: route on its logits chooses the same
    experts with the same weights."""
    _require(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    routers = _family_routers()
    assert len(routers) >= 5
    for name, router, kwargs in routers:
        with torch.no_grad():
            for param in router.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
                kwargs = dict(kwargs, bias=bias)
            hidden = torch.randn(23, router.weight.shape[1], generator=gen)
            logits, hf_weights, hf_ids = router(hidden)
        top_k = hf_ids.shape[1]
        weights, ids, _, _ = _run(backend, logits, top_k, None, None, 1, **kwargs)
        # DeepSeek-style routers return their top-k unsorted: compare per expert
        order, hf_order = ids.argsort(dim=1), hf_ids.argsort(dim=1)
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        hf_ids, hf_weights = hf_ids.gather(1, hf_order), hf_weights.gather(1, hf_order)
        # sigmoid selection values are computed with each backend's exp: rows may differ on rounding-level ties
        every = torch.ones_like(logits, dtype=torch.bool)
        same = matching_rows(ids, hf_ids, logits, every, kwargs, exact=kwargs["scoring"] != "sigmoid", where=name)
        assert bool(same.float().mean() >= 0.9), name
        torch.testing.assert_close(weights[same].to(hf_weights.dtype), hf_weights[same], msg=name)


# --------------------------------------------------------------------------------------------------------------
# 2. Every backend against the reference
# --------------------------------------------------------------------------------------------------------------


def test_matching_rows_takes_either_group_of_a_near_tie_and_no_other():
    """The comparison the sigmoid checks rest on: where two groups' scores lie within rounding of each other, a
    backend (its own exp) may keep either, and its row then differs from the reference's in whole groups; a row that
    keeps a group clearly below the kept ones still fails."""
    # 4 groups of 2 experts, 2 kept: group 0 clearly; groups 1 and 2 within rounding (exactly equal, or 1e-6 apart in
    # the logit); group 3 clearly below
    for second in (1.0, 1.0 + 1e-6):
        logits = torch.tensor([[3.0, 3.0, 1.0, 0.5, 0.5, second, 0.0, -1.0]], dtype=torch.float64)
        kwargs = dict(scoring="sigmoid", n_group=4, topk_group=2)
        every = torch.ones_like(logits, dtype=torch.bool)
        _, ref_ids = reference.route_reference(logits, 4, None, None, **kwargs)
        kept_groups = set((ref_ids[0] // 2).tolist())
        assert kept_groups in ({0, 1}, {0, 2}), ref_ids
        other = 2 if 1 in kept_groups else 1
        near_tie = torch.tensor([[0, 1, 2 * other, 2 * other + 1]])
        same = matching_rows(near_tie, ref_ids, logits, every, kwargs, exact=False)
        assert not bool(same[0])  # (a differing row: its weights are not compared)
        with pytest.raises(AssertionError, match="row 0 chose"):
            matching_rows(torch.tensor([[0, 1, 6, 7]]), ref_ids, logits, every, kwargs, exact=False)
        with pytest.raises(AssertionError, match="row 0 chose"):  # (the near-tied group, but not its best experts)
            matching_rows(torch.tensor([[0, 1, 2 * other, 6]]), ref_ids, logits, every, kwargs, exact=False)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_random_cases(backend, variant):
    _require(backend)
    rng = random.Random(SESSION_SEED + 17 * VARIANT_NAMES.index(variant))
    small = backend == "triton"  # (the interpreter on CPU)
    for i in range(3 if small else 8):
        E = rng.choice([8, 16, 60, 64, 128])
        top_k = rng.choice([k for k in (1, 2, 4, 8) if k <= E])
        case = make_case(
            rng.choice([1, 7, 33] if small else [1, 7, 33, 300]), E, top_k,
            rng.choice([torch.float32, torch.float16, torch.bfloat16]), seed=rng.randrange(1 << 30),
            mask=rng.choice(["none", "random", "per_group"]), groups=rng.choice(["none", "random", "with_unassigned"]),
            num_groups=rng.choice([1, 2, 3]), contiguous=rng.random() < 0.75,
        )
        kwargs = variant_kwargs(variant, E, torch.Generator().manual_seed(rng.randrange(1 << 30)), top_k)
        _check_against_reference(
            backend, case.logits, top_k, case.keep, case.group, case.num_groups, kwargs,
            with_grad=backend in ("triton", "cuda") and case.logits.dtype == torch.float32,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_adversarial_cases(backend, variant):
    """Ties, signed zeros, -inf, wide values and tight masks: masked experts never chosen, exact counts, the
    reference's ids (the tie rule on the selection value) and weights."""
    _require(backend)
    for i, kind in enumerate(ADVERSARIAL_KINDS):
        seed = SESSION_SEED + 31 * i + VARIANT_NAMES.index(variant)
        case = adversarial_case(kind, seed, exact_mask=i % 2 == 0)
        E = case.logits.shape[1]
        kwargs = variant_kwargs(variant, E, torch.Generator().manual_seed(seed), case.top_k)
        if kind in ("half_integers", "zeros") and "bias" in kwargs:
            kwargs["bias"] = torch.randint(-2, 3, (E,), generator=torch.Generator().manual_seed(seed)) / 8.0
        ids, weights = _check_against_reference(backend, case.logits, case.top_k, case.keep, case.group,
                                                case.num_groups, kwargs, with_grad=False)
        if backend == "torch" and kwargs.get("scoring") == "sigmoid" and kind in ("half_integers", "zeros"):
            # exact ties of selection values: equal values go to the lower expert index
            allowed = _allowed(case.logits.shape[0], case.keep, case.group, E)
            values = selection_of(case.logits, allowed, kwargs).float()
            for t in range(ids.shape[0]):
                row = ids[t].tolist()
                for a, b in zip(row, row[1:]):
                    va, vb = float(values[t, a]), float(values[t, b])
                    assert va > vb or (va == vb and a < b) or not bool(allowed[t, b]), (t, row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_expert_counts_and_top_k(backend):
    """E up to 512 (DeepSeek-V3 256, Kimi-K2 384, Qwen3-Next 512) with top-16, every variant; a keep row of exactly
    16 experts gets exactly those."""
    _require(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    for E, variant in [(512, "softmax"), (384, "softmax_chosen"), (512, "sigmoid_groups"), (256, "sigmoid_groups"),
                       (512, "sigmoid_bias_renorm"), (384, "softmax_renorm_scaled")]:
        kwargs = variant_kwargs(variant, E, gen)
        if kwargs.get("n_group", 1) > 1:
            kwargs.update(n_group=8, topk_group=4)
        logits = torch.randn(5, E, generator=gen).to(torch.bfloat16)
        keep = torch.ones(2, E, dtype=torch.bool)
        keep[1] = False
        tight = torch.randperm(E, generator=gen)[:16]
        keep[1, tight] = True
        group = torch.tensor([0, 1, 1, -1, 0])
        ids, _ = _check_against_reference(backend, logits, 16, keep, group, 2, kwargs, with_grad=False)
        for t in (1, 2):
            assert sorted(ids[t].tolist()) == sorted(tight.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limit_with_masks(backend):
    """A keep row whose allowed experts sit in groups the limit drops: the allowed experts of kept groups come first,
    then the other allowed experts (by index, at -inf), never a masked one; group scores ignore masked experts."""
    _require(backend)
    E, n_group = 16, 4  # groups of 4 experts
    logits = torch.zeros(3, E)
    logits[:, 0:4] = 5.0  # group 0 is the best group by far
    logits[:, 4:8] = torch.tensor([4.0, -3.0, -3.0, -3.0])  # group 1: one strong expert only
    logits[:, 8:12] = 1.0
    keep = torch.ones(3, E, dtype=torch.bool)
    keep[1, 0:4] = False  # token 1: group 0 fully masked
    keep[2] = False
    keep[2, [1, 13, 14]] = True  # token 2: three experts, in groups 0 and 3
    group = torch.tensor([0, 1, 2])
    kwargs = dict(scoring="sigmoid", n_group=n_group, topk_group=1)
    ids, _ = _check_against_reference(backend, logits, 3, keep, group, 3, kwargs, with_grad=False)
    assert ids[0].tolist() == [0, 1, 2]
    # token 1: group 0 scores -inf; group 1 scores sigmoid(4) + sigmoid(-3) = 1.03 < group 2's 2 * sigmoid(1) = 1.46
    assert ids[1].tolist() == [8, 9, 10]
    # token 2: group 0 scores -inf (one allowed expert), group 3 (two allowed, logit 0) is kept
    assert ids[2].tolist() == [13, 14, 1]


# --------------------------------------------------------------------------------------------------------------
# 3. Gradients, registered ops, torch.compile
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_gradcheck_float64(variant):
    """The closed-form backward of every variant equals finite differences (float64, through route's autograd)."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    E = 16
    kwargs = variant_kwargs(variant, E, gen)
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    renormalize = kwargs.pop("renormalize", False)
    logits = torch.randn(5, E, generator=gen, dtype=torch.float64) * 2
    keep = torch.ones(2, E, dtype=torch.bool)
    keep[1, ::3] = False
    group = torch.tensor([0, 1, -1, 1, 0])
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: route(z, 4, keep, group, None, renormalize, "torch", **kwargs)[0], (x,)
    )
    # the same gradient as autograd through the reference's forward
    weights, _ = route(x, 4, keep, group, None, renormalize, "torch", **kwargs)
    probe = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    (closed,) = torch.autograd.grad((weights * probe).sum(), x)
    y = logits.clone().requires_grad_()
    ref_w, _ = reference.route_reference(y, 4, keep, group, renormalize=renormalize, **kwargs)
    (auto,) = torch.autograd.grad((ref_w * probe).sum(), y)
    torch.testing.assert_close(closed, auto)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    _require(backend)
    device = _device(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(6, 16, generator=gen).to(device).requires_grad_()
    keep = torch.ones(2, 16, dtype=torch.bool, device=device)
    keep[1, :5] = False
    group = torch.tensor([0, 1, -1, 1, 0, 1], device=device)
    bias = (torch.randn(16, generator=gen) * 0.1).to(device)
    counts = torch.zeros(2, 16, dtype=torch.int64, device=device)
    for scoring, b, n_group, topk_group, renormalize, scale in [
        ("softmax_chosen", None, 1, 1, False, 1.0),
        ("sigmoid", bias, 4, 2, True, 2.5),
        ("softmax", None, 1, 1, True, 0.5),
    ]:
        args = (logits, 3, keep, group, counts, renormalize, backend, scoring, b, n_group, topk_group, scale)
        torch.library.opcheck(torch.ops.moe_fastmask.route.default, args)

    def step(x, counts):
        weights, ids = route(x, 3, keep, group, counts, True, backend, scoring="sigmoid", bias=bias, n_group=4,
                             topk_group=2, scale=2.5)
        return (weights.float() ** 2).sum(), ids

    x_eager, x_comp = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    counts_eager, counts_comp = torch.zeros_like(counts), torch.zeros_like(counts)
    loss_eager, ids_eager = step(x_eager, counts_eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_comp, ids_comp = torch.compile(step, fullgraph=True, backend="aot_eager")(x_comp, counts_comp)
    loss_eager.backward()
    loss_comp.backward()
    assert torch.equal(ids_comp, ids_eager) and torch.equal(counts_comp, counts_eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


def test_cpp_op_opcheck_with_variants():
    _require("cpp")
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(9, 16, generator=gen)
    weights, ids = torch.empty(9, 3), torch.empty(9, 3, dtype=torch.int64)
    counts = torch.zeros(1, 16, dtype=torch.int64)
    bias = torch.randn(16, generator=gen)
    op = torch.ops.moe_fastmask_C.route_cpu.default
    torch.library.opcheck(op, (weights, ids, counts, logits, None, None, True, 2, bias, 4, 2, 2.5))
    torch.library.opcheck(op, (weights, ids, counts, logits, None, None, False, 1, None, 1, 1, 1.0))
    with pytest.raises(RuntimeError, match="scoring"):
        op(weights, ids, counts, logits, None, None, False, 3, None, 1, 1, 1.0)
    with pytest.raises(RuntimeError, match="n_group"):
        op(weights, ids, counts, logits, None, None, False, 2, None, 3, 1, 1.0)


# --------------------------------------------------------------------------------------------------------------
# 4. Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scoring="softmax2"), ValueError, "scoring"),
        (dict(scoring="softmax_chosen", renormalize=True), ValueError, "renormalize"),
        (dict(bias=torch.zeros(16)), ValueError, "bias.*sigmoid"),
        (dict(scoring="sigmoid", bias=torch.zeros(15)), ValueError, r"bias must have shape \[E\]"),
        (dict(scoring="sigmoid", bias=torch.zeros(16, dtype=torch.int64)), TypeError, "bias"),
        (dict(scoring="sigmoid", bias=torch.zeros(16, requires_grad=True)), ValueError, "bias must not require grad"),
        (dict(n_group=4), ValueError, "n_group.*sigmoid"),
        (dict(scoring="sigmoid", n_group=3), ValueError, "n_group must divide"),
        (dict(scoring="sigmoid", n_group=16), ValueError, "n_group must divide"),
        (dict(scoring="sigmoid", n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(scoring="sigmoid", n_group=8, topk_group=1), ValueError, "fewer than top_k"),
        (dict(scoring="sigmoid", topk_group=2), ValueError, "topk_group=2 needs n_group"),
        (dict(scale=math.inf), TypeError, "scale"),
        (dict(scale="2"), TypeError, "scale"),
        (dict(scoring="sigmoid", n_group=2.0), TypeError, "n_group must be an int"),
    ],
)
def test_argument_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    renormalize = kwargs.pop("renormalize", False)
    with pytest.raises(error, match=match):
        route(torch.randn(4, 16), 3, None, None, None, renormalize, "torch", **kwargs)


def test_benchmark_smoke_path(capsys):
    """benchmarks/bench_route.py imports, and its CPU smoke path finds route equal to every family's eager chain."""
    module = load_benchmark("bench_route")
    assert module.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(module.FAMILIES) and all(line.endswith(" ok") for line in lines)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_groups_act_as_unassigned(backend):
    """With validate=False, group ids outside [-1, G) route like -1 (no mask, not counted) in every variant."""
    _require(backend)
    device = _device(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(9, 16, generator=gen)
    logits[:, :6] += 3.0  # the masked experts are the strongest
    logits = logits.to(device)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, :6] = False
    keep = keep.to(device)
    wild = torch.tensor([0, 1, 2, -2, 7, -1, 1, 0, 1 << 20]).to(device)
    tame = torch.where((wild >= 0) & (wild < 2), wild, -1)
    for name in ("softmax_chosen", "sigmoid_groups", "softmax_renorm_scaled"):
        kwargs = variant_kwargs(name, 16, gen, 3)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        renormalize = kwargs.pop("renormalize", False)
        results = []
        for group in (wild, tame):
            counts = torch.zeros(2, 16, dtype=torch.int64, device=device)
            weights, ids = route(logits, 3, keep, group, counts, renormalize, backend, validate=False, **kwargs)
            results.append((weights.cpu(), ids.cpu(), counts.cpu()))
        (w1, i1, c1), (w2, i2, c2) = results
        assert torch.equal(i1, i2) and torch.equal(c1, c2) and torch.equal(w1, w2)
        assert bool((i1[[2, 3, 4, 8]] < 6).any())  # unmasked rows do use the experts the groups mask
