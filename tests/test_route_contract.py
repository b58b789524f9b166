"""route's contract on adversarial input, for every backend: masked experts never chosen, one tie rule, no writes
outside ``counts``, fresh value checks, a differentiable registered op, float64, and entry points that load what they
need."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from torch.utils._python_dispatch import TorchDispatchMode
from route_cases import (
    ADVERSARIAL_KINDS,
    RouteCase,
    adversarial_case,
    recount,
    tie_rule_order,
    tolerance,
)

from moe_fastmask import route
from moe_fastmask.ops import cpp_route, reference, resolve_backend, route_prechecked, triton_route

# padding rows of a Triton tile compute (-inf) - (-inf) and 1 / 0 in the interpreter; their results are never stored
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

INF = math.inf
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cpp", "triton"]


def _device(backend: str) -> str:
    return "cpu" if backend == "cpp" else TRITON_DEVICE


def _require(backend: str) -> None:
    try:
        resolve_backend(backend, torch.device(_device(backend)))
    except ValueError as exc:
        pytest.skip(str(exc))


def _route(backend, logits, top_k, keep=None, group=None, counts=None, renormalize=False, **kwargs):
    """route on the backend's device; results (and counts) back on the CPU."""
    device = _device(backend)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    counts_dev = move(counts)
    weights, ids = route(move(logits), top_k, move(keep), move(group), counts_dev, renormalize, backend, **kwargs)
    if counts is not None:
        counts.copy_(counts_dev.cpu())
    return weights.cpu(), ids.cpu()


# --------------------------------------------------------------------------------------------------------------
# 1. A masked expert is never chosen or counted
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_allowed_expert_with_logit_minus_inf_beats_masked_experts(backend):
    _require(backend)
    counts = torch.zeros(1, 4, dtype=torch.int64)
    keep = torch.tensor([[False, False, True, True]])
    weights, ids = _route(backend, torch.tensor([[0.3, -0.2, 1.0, -INF]]), 2, keep, counts=counts)
    assert ids.tolist() == [[2, 3]]
    assert counts.tolist() == [[0, 0, 1, 1]]
    assert weights.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_allowed_experts_whose_probability_underflows_beat_masked_experts(backend, dtype):
    _require(backend)
    keep = torch.tensor([[False, True, True, False]])
    for row in ([5.0, 0.0, -200.0, 1.0], [1e4, 0.0, -1e4, 9984.0]):
        counts = torch.zeros(1, 4, dtype=torch.int64)
        weights, ids = _route(backend, torch.tensor([row], dtype=dtype), 2, keep, counts=counts)
        assert ids.tolist() == [[1, 2]], row
        assert counts.tolist() == [[0, 1, 1, 0]], row
        assert weights[0, 0] == 1 and weights[0, 1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_all_allowed_logits_minus_inf(backend):
    """NaN weights; ids are the allowed experts in ascending index order (they tie at -inf), counted."""
    _require(backend)
    logits = torch.tensor([[3.0, -INF, 2.0, -INF, 1.0, -INF]])
    keep = torch.tensor([[False, True, False, True, False, True]])
    counts = torch.zeros(1, 6, dtype=torch.int64)
    weights, ids = _route(backend, logits, 3, keep, counts=counts)
    assert ids.tolist() == [[1, 3, 5]]
    assert bool(weights.isnan().all())
    assert counts.tolist() == [[0, 1, 0, 1, 0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_negative_nan_counts_as_nan(backend, dtype):
    """The NaN policy holds for a NaN of either sign: softmax, a NaN among the allowed logits makes every weight NaN;
    softmax over the chosen, a chosen NaN does (a negative NaN ranks as -inf, so with enough other experts it is not
    chosen, and the weights stay finite); sigmoid, a chosen NaN makes its own weight NaN (renormalised, every one).
    Ids are allowed experts, distinct."""
    _require(backend)
    logits = torch.tensor([[1.0, 2.0, math.nan, 0.5]], dtype=dtype)
    bits = logits.view({4: torch.int32, 2: torch.int16}[logits.element_size()])
    bits[0, 2] |= torch.iinfo(bits.dtype).min  # (the sign bit: -NaN)
    assert bool(torch.signbit(logits[0, 2]))
    for scoring, renormalize, top_k, expect_nan in (
        ("softmax", False, 2, [True, True]),
        ("softmax", False, 4, [True] * 4),
        ("softmax_chosen", False, 4, [True] * 4),
        ("softmax_chosen", False, 2, [False, False]),
        ("sigmoid", True, 4, [True] * 4),
    ):
        where = f"{backend} {dtype} {scoring} top_k={top_k}"
        weights, ids = _route(backend, logits, top_k, renormalize=renormalize, scoring=scoring)
        assert sorted(ids[0].tolist()) == sorted(set(ids[0].tolist())) and ids.max() < 4, where
        assert weights[0].isnan().tolist() == expect_nan, (where, weights)
        if scoring == "softmax_chosen" and top_k == 2:
            assert ids.tolist() == [[1, 0]], where
    weights, ids = _route(backend, logits, 4, scoring="sigmoid")
    nan_at = ids[0].tolist().index(2)
    assert weights[0].isnan().tolist() == [j == nan_at for j in range(4)], (backend, dtype, weights, ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_equal_logits_and_biases_tie_to_the_lower_index(backend):
    """With scoring="sigmoid", equal logits (and equal biases) tie exactly wherever they sit in the row, so the
    lower index comes first: two equal leading logits at any pair of positions, including those a vectorised loop
    would leave to its scalar tail."""
    _require(backend)
    for E in (7, 60, 64, 100):
        positions = sorted({0, 1, E // 2, E - 5, E - 3, E - 1})
        for n, (a, b) in enumerate((a, b) for a in positions for b in positions if a < b):
            logits = torch.full((3, E), -3.0)
            logits[:, a] = logits[:, b] = 1.0625
            bias = torch.zeros(E) if n % 2 else None
            counts = torch.zeros(1, E, dtype=torch.int64)
            weights, ids = _route(backend, logits, 2, counts=counts, scoring="sigmoid", bias=bias)
            assert ids.tolist() == [[a, b]] * 3, (backend, E, a, b, ids)
            assert counts[0, a] == 3 and counts[0, b] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_mask_with_too_few_experts_takes_masked_ones_last(backend):
    """validate=False and a keep row allowing fewer than top_k: the allowed ones first, then masked ones by the tie
    rule, with weight 0."""
    _require(backend)
    logits = torch.tensor([[4.0, 3.0, -50.0, 2.0, 1.0]])
    keep = torch.tensor([[False, False, True, False, False]])
    weights, ids = _route(backend, logits, 3, keep, validate=False)
    assert ids.tolist() == [[2, 0, 1]]
    assert weights.tolist() == [[1.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------------------------
# 2, 3. One tie rule: order by the masked logit, -0.0 == +0.0, ties to the lower index
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros_are_an_exact_tie(backend):
    _require(backend)
    assert _route(backend, torch.tensor([[-0.0, 0.0, -1.0]]), 1)[1].tolist() == [[0]]
    assert _route(backend, torch.tensor([[0.0, -0.0, -1.0]]), 1)[1].tolist() == [[0]]
    # a zeroed router: every logit +-0.0
    gen = torch.Generator().manual_seed(SESSION_SEED)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.where(torch.rand(64, 16, generator=gen) < 0.5, -0.0, 0.0).to(dtype)
        counts = torch.zeros(1, 16, dtype=torch.int64)
        _, ids = _route(backend, logits, 4, counts=counts)
        assert (ids == torch.arange(4)).all(), dtype
        assert counts[0, :4].tolist() == [64] * 4 and int(counts[0, 4:].sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_logits_with_equal_float32_weights_order_by_logit(backend):
    """0.0 and 1e-8 give the same float32 weight; the larger logit comes first on every backend."""
    _require(backend)
    assert _route(backend, torch.tensor([[0.0, 1e-8, -5.0]]), 1)[1].tolist() == [[1]]
    assert _route(backend, torch.tensor([[1e-8, 0.0, -5.0]]), 2)[1].tolist() == [[0, 1]]


# --------------------------------------------------------------------------------------------------------------
# 4. No writes outside the buffers, whatever the group ids (validate=False)
# --------------------------------------------------------------------------------------------------------------

POISON = 0x5A5A5A5A


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_dtype", [torch.int64, torch.int32], ids=str)
def test_out_of_range_groups_are_dropped_and_nothing_is_written_outside_counts(backend, group_dtype):
    """counts is a view into a larger poisoned buffer; ids outside [-1, G) act as -1: routed without a mask, not
    counted, and the buffer outside the view stays poisoned. Forward and backward."""
    _require(backend)
    G, E, k = 2, 16, 4
    bad = [3, 1000, -2, 2**31 - 1, -(2**31)] + ([2**32 + 1, -(2**40)] if group_dtype == torch.int64 else [])
    good = [0, 1, -1, 1, 0]
    group = torch.tensor(good + bad, dtype=group_dtype)
    T = group.numel()
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(T, E, generator=gen)
    keep = torch.zeros(G, E, dtype=torch.bool)
    keep[0, :6] = True
    keep[1, 8:] = True
    device = _device(backend)
    buffer = torch.full((G + 2, E), POISON, dtype=torch.int64, device=device)
    counts = buffer[1 : G + 1]
    counts.zero_()
    x = logits.clone().to(device).requires_grad_()
    weights, ids = route(x, k, keep.to(device), group.to(device), counts, True, backend, validate=False)
    grad_out = torch.randn(T, k, generator=gen).to(device)
    (weights * grad_out).sum().backward()
    buffer, ids = buffer.cpu(), ids.cpu()

    assert (buffer[0] == POISON).all() and (buffer[G + 1] == POISON).all()
    assert torch.equal(buffer[1 : G + 1], recount(ids, group, G, E))
    # tokens of out-of-range groups are routed as group -1: no mask
    unmasked = reference.route_reference(logits, k, None, None, None, True)[1]
    as_minus_one = torch.where((group >= 0) & (group < G), group, -1).long()
    masked = reference.route_reference(logits, k, keep, as_minus_one, None, True)[1]
    assert torch.equal(ids[len(good) :], unmasked[len(good) :])
    assert torch.equal(ids, masked)
    expected = logits.double().requires_grad_()
    ref_w, _ = reference.route_reference(expected, k, keep, as_minus_one, None, True)
    (ref_w * grad_out.cpu().double()).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), expected.grad, atol=1e-6, rtol=1e-5)


def test_validated_route_still_rejects_out_of_range_groups():
    with pytest.raises(ValueError, match=r"group ids must be in \[-1, 2\)"):
        route(torch.randn(3, 8), 2, group=torch.tensor([0, 2, 1]), counts=torch.zeros(2, 8, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------------------
# 5. Value checks read the current data (no stale cache)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["data", "numpy"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_keep_edited_without_a_version_bump_is_still_checked(backend, edit):
    _require(backend)
    keep = torch.ones(2, 8, dtype=torch.bool)
    logits = torch.randn(4, 8)
    route(logits, 4, keep, backend=backend)  # validated once
    if edit == "data":
        keep.data[1, 2:] = False
    else:
        keep.numpy()[1, 2:] = False
    with pytest.raises(ValueError, match=r"keep rows \[1\] allow fewer than top_k=4"):
        route(logits, 4, keep, backend=backend)


# --------------------------------------------------------------------------------------------------------------
# 6. The registered op is differentiable by itself
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_requires_grad(backend):
    _require(backend)
    device = _device(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(6, 8, generator=gen).to(device).requires_grad_()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False
    group = torch.tensor([0, 1, -1, 1, 0, 1]).to(device)
    counts = torch.zeros(2, 8, dtype=torch.int64, device=device)
    for renormalize in (False, True):
        torch.library.opcheck(
            torch.ops.moe_fastmask.route.default,
            (logits, 3, keep.to(device), group, counts, renormalize, backend),
        )
    torch.library.opcheck(torch.ops.moe_fastmask.route.default, (logits, 2, None, None, None, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_gradient_equals_routes(backend):
    _require(backend)
    device = _device(backend)
    logits = torch.randn(7, 8, generator=torch.Generator().manual_seed(SESSION_SEED)).to(device)
    grads = []
    for fn in (route, torch.ops.moe_fastmask.route):
        x = logits.clone().requires_grad_()
        weights, _ = fn(x, 3, None, None, None, True, backend)
        (weights * torch.arange(21.0, device=device).view(7, 3)).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_eager_backward_allocates_no_gradient_for_the_ids():
    """route's eager backward gets no zero-filled int64 [T, k] gradient for the ids (autograd would materialise one,
    a memset as long as a fifth of the CUDA backward at T = 262,144): no tensor of the ids' shape and dtype is
    created while the gradient is computed, and the gradient is route_backward's."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(33, 16, generator=gen).requires_grad_()
    grad = torch.randn(33, 4, generator=gen)
    weights, ids = route(logits, 4, None, None, None, False, "torch")
    created = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.shape == ids.shape:
                    created.append(func)
            return out

    with Allocations():
        (got,) = torch.autograd.grad(weights, logits, grad)
    assert created == [], created
    expected = reference.route_backward_reference(grad, logits.detach(), None, None, ids, False)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_reads_strided_keep_group_and_bias(backend):
    """The registered op takes ``keep``, ``group`` and ``bias`` as views with any strides (route makes them
    contiguous; so must the op, whose kernels read them as dense rows): the same result as contiguous copies."""
    _require(backend)
    device = _device(backend)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(6, 8, generator=gen).to(device)
    keep_t = torch.ones(8, 2, dtype=torch.bool)
    keep_t[4:, 0] = False  # group 0 may use experts 0-3 only
    keep = keep_t.to(device).t()
    group = torch.tensor([[0, 9], [1, 9], [0, 9], [-1, 9], [0, 9], [1, 9]]).to(device)[:, 0]
    bias = (torch.randn(8, 2, generator=gen) * 4).to(device)[:, 1]
    assert not (keep.is_contiguous() or group.is_contiguous() or bias.is_contiguous())
    for scoring, b in (("softmax", None), ("sigmoid", bias)):
        counts_view, counts_dense = (torch.zeros(2, 8, dtype=torch.int64, device=device) for _ in range(2))
        got = torch.ops.moe_fastmask.route(logits, 2, keep, group, counts_view, False, backend, scoring, b)
        want = torch.ops.moe_fastmask.route(
            logits, 2, keep.contiguous(), group.contiguous(), counts_dense, False, backend, scoring,
            None if b is None else b.contiguous(),
        )
        assert torch.equal(got[1], want[1]) and torch.equal(counts_view, counts_dense)
        torch.testing.assert_close(got[0], want[0])
        assert (got[1][group == 0] < 4).all()


def test_registered_op_resolves_auto_and_refuses_unknown_backends():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(SESSION_SEED))
    weights, ids = torch.ops.moe_fastmask.route(logits, 2, None, None, None, False, "auto")
    ref_weights, ref_ids = reference.route_reference(logits, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    with pytest.raises(ValueError, match="backend must be one of .* got 'Torch'"):
        torch.ops.moe_fastmask.route(logits, 2, None, None, None, False, "Torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_with_no_group_rows_are_refused(backend):
    """An empty ``[0, E]`` counts tensor has no row for group 0 (what group=None counts into): a ValueError naming
    ``counts``, from route and from the registered op alike, before any kernel could write outside it."""
    _require(backend)
    device = _device(backend)
    logits = torch.randn(4, 8, device=device)
    counts = torch.zeros(0, 8, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"counts must have shape \[G, E\] .* G >= 1, got \(0, 8\)"):
        route(logits, 2, counts=counts, backend=backend)
    with pytest.raises(ValueError, match="counts must have shape"):
        torch.ops.moe_fastmask.route(logits, 2, None, None, counts, False, backend)


class _ScaledRouter(torch.nn.Module):
    """A router holding its weight scale as a float attribute, as DeepSeek's ``routed_scaling_factor``."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, logits):
        return route(logits, 2, renormalize=True, scoring="sigmoid", scale=self.scale)


@pytest.mark.parametrize("scale", [None, 1.0, 2.5])
def test_compile_with_dynamic_shapes_takes_float_scales(scale):
    """torch.compile(fullgraph=True, dynamic=True) treats a float argument (the default scale, a module's attribute)
    as a symbolic float: route's checks must take it. Compiled results equal eager ones, for two token counts."""
    fn = (lambda x: route(x, 2)) if scale is None else _ScaledRouter(scale)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(SESSION_SEED)
    for tokens in (5, 9):
        logits = torch.randn(tokens, 8, generator=gen)
        got, want = compiled(logits), fn(logits)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])


def test_non_finite_scale_is_refused():
    for scale in (math.inf, -math.inf, math.nan):
        with pytest.raises(TypeError, match="scale must be a finite float"):
            route(torch.randn(3, 8), 2, scale=scale)


# --------------------------------------------------------------------------------------------------------------
# 7. float64
# --------------------------------------------------------------------------------------------------------------


def test_triton_refuses_float64():
    logits = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        route(logits, 2, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        triton_route.route_forward(logits, 2, None, None, None, False)
    if triton_route.is_available("cpu"):
        with pytest.raises(TypeError, match="float64"):
            torch.ops.moe_fastmask.route(logits, 2, None, None, None, False, "triton")
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"


def test_auto_backend_gradcheck_float64():
    gen = torch.Generator().manual_seed(SESSION_SEED)
    logits = torch.randn(5, 8, generator=gen, dtype=torch.float64).requires_grad_()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, ::2] = False
    group = torch.tensor([0, 1, 1, -1, 0])
    for renormalize in (False, True):
        fn = lambda x: route(x, 3, keep, group, None, renormalize)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,))


# --------------------------------------------------------------------------------------------------------------
# 8. Every entry point loads what it needs (fresh processes)
# --------------------------------------------------------------------------------------------------------------

ENTRY_POINTS = {
    "registered op": "torch.ops.moe_fastmask.route(x, 2, None, None, None, False, backend)",
    "route_prechecked": "moe_fastmask.ops.route_prechecked(x, 2, None, None, None, False, backend)",
    "route_prechecked with grad": (
        "moe_fastmask.ops.route_prechecked(x.clone().requires_grad_(), 2, None, None, None, False, backend)"
    ),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_points_work_in_a_fresh_process(entry):
    if cpp_route.disabled():
        pytest.skip(f"{cpp_route.DISABLE_ENV} is set")
    backends = ["cpp", "torch"] + ["triton"] * triton_route.is_available("cpu")
    code = (
        "import torch, moe_fastmask\n"
        "x = torch.randn(5, 8)\n"
        "expected = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :2]\n"
        f"for backend in {backends!r}:\n"
        f"    weights, ids = {ENTRY_POINTS[entry]}\n"
        "    assert torch.equal(ids, expected), (backend, ids, expected)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------
# Property tests: adversarial logits and masks, every backend, identical ids and counts
# --------------------------------------------------------------------------------------------------------------

PROPERTY_CASES = [
    (kind, exact, SESSION_SEED + 101 * i + 7 * j)
    for i, kind in enumerate(ADVERSARIAL_KINDS)
    for j, exact in enumerate((True, False, True, False))
]


def _allowed(case: RouteCase) -> torch.Tensor:
    return reference.allowed_experts(case.logits.shape[0], case.keep, case.group)


@pytest.mark.parametrize(
    "kind, exact_mask, seed",
    PROPERTY_CASES,
    ids=[f"{kind}-{'exact' if exact else 'random'}-{n}" for n, (kind, exact, _) in enumerate(PROPERTY_CASES)],
)
def test_adversarial_properties_on_every_backend(kind, exact_mask, seed):
    case = adversarial_case(kind, seed, exact_mask=exact_mask)
    T, E = case.logits.shape
    where = f"{kind} seed={seed} {case.describe()}"
    allowed = _allowed(case)
    values = case.logits.double()
    expected_ids = torch.tensor(
        [tie_rule_order(values[t].tolist(), allowed[t].tolist())[: case.top_k] for t in range(T)], dtype=torch.int64
    )
    all_minus_inf = torch.where(allowed, values, -INF).amax(dim=1) == -INF
    start = torch.randint(0, 100, (case.num_groups, E), generator=torch.Generator().manual_seed(seed))
    results = {}
    for backend in BACKENDS:
        try:
            resolve_backend(backend, torch.device(_device(backend)))
        except ValueError:
            continue
        counts = start.clone()
        weights, ids = _route(backend, case.logits, case.top_k, case.keep, case.group, counts, case.renormalize)
        assert bool(allowed.gather(1, ids).all()), f"{backend}: a masked expert was chosen; {where}"
        assert torch.equal(ids, expected_ids), f"{backend}: tie rule; {where}\n{ids}\n{expected_ids}"
        assert torch.equal(counts - start, recount(ids, case.group, case.num_groups, E)), f"{backend}; {where}"
        assert bool(weights[all_minus_inf].isnan().all()), f"{backend}; {where}"
        assert not bool(weights[~all_minus_inf].isnan().any()), f"{backend}; {where}"
        results[backend] = (weights, ids, counts)
    ref_weights = results["torch"][0]
    atol, rtol = tolerance(case.logits.dtype)
    for backend, (weights, ids, counts) in results.items():
        assert torch.equal(ids, results["torch"][1]) and torch.equal(counts, results["torch"][2]), backend
        torch.testing.assert_close(weights[~all_minus_inf], ref_weights[~all_minus_inf], atol=atol, rtol=rtol)
    assert len(results) == 2 + triton_route.is_available(TRITON_DEVICE)


# --------------------------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------------------------


def test_triton_route_does_not_import_the_route_module():
    """ops.route imports ops.triton_route; the reverse would be an import cycle."""
    source = Path(triton_route.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "moe_fastmask.ops.route" not in imported, imported
