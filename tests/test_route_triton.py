"""Triton backend of ``route`` against the reference and the naive oracle (CPU interpreter in CI, CUDA when present)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import SESSION_SEED
from route_cases import (POISON_ID, assert_compiled_matches_eager, extreme_grads_case, make_case, naive_route,
                         random_grid, tolerance)

from moe_fastmask import route
from moe_fastmask.ops import reference, triton_route

# padding rows of a tile compute (-inf) - (-inf) and 1 / 0 in the interpreter; their results are never stored
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

# CPU through the interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), CUDA when present
DEVICES = ["cpu"] * triton_route.is_available("cpu") + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRID = random_grid(80, SESSION_SEED)
POISON_WEIGHT = float("nan")


def _run_triton(case, counts=None):
    """Launcher with poisoned outputs, so any element the kernel leaves unwritten shows."""
    T = case.logits.shape[0]
    weights = torch.full((T, case.top_k), POISON_WEIGHT, dtype=case.logits.dtype, device=case.logits.device)
    ids = torch.full((T, case.top_k), POISON_ID, dtype=torch.int64, device=case.logits.device)
    out = triton_route.route_forward(
        case.logits, case.top_k, case.keep, case.group, counts, case.renormalize, out=(weights, ids)
    )
    assert out[0] is weights and out[1] is ids
    return weights, ids


def _prefilled_counts(case, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (case.num_groups, case.logits.shape[1]), generator=gen).to(case.logits.device)


def _check_case(case, seed):
    counts = _prefilled_counts(case, seed)
    before = counts.clone()
    weights, ids = _run_triton(case, counts)

    ref_counts = before.clone()
    ref_w, ref_ids = reference.route_reference(case.logits, case.top_k, case.keep, case.group, ref_counts,
                                               case.renormalize)
    naive_w, naive_ids, naive_counts = naive_route(case)
    atol, rtol = tolerance(case.logits.dtype)

    assert weights.dtype == case.logits.dtype and ids.dtype == torch.int64
    assert torch.isfinite(weights).all(), case.describe()
    assert torch.equal(ids, ref_ids), case.describe()
    assert torch.equal(ids.cpu(), naive_ids), case.describe()
    torch.testing.assert_close(weights, ref_w, atol=atol, rtol=rtol, msg=case.describe)
    torch.testing.assert_close(weights.cpu().double(), naive_w, atol=atol, rtol=rtol, msg=case.describe)
    assert torch.equal(counts, ref_counts), case.describe()
    assert torch.equal((counts - before).cpu(), naive_counts), case.describe()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", GRID, ids=[f"grid{i}" for i in range(len(GRID))])
def test_random_grid(spec, device):
    _check_case(make_case(**spec).to(device), spec["seed"])


def _explicit_specs():
    """Every E with every valid k, cycling dtype, mask, groups, T, contiguity and renormalisation."""
    specs = []
    masks = ["none", "random", "per_group"]
    groups = ["none", "with_unassigned", "random"]
    sizes = [1, 5, 64, 130, 300]
    i = 0
    for E in (8, 60, 64, 128, 256):
        for k in (1, 2, 8, 16):
            if k > E:
                continue
            specs.append(dict(
                num_tokens=sizes[i % len(sizes)], num_experts=E, top_k=k, dtype=DTYPES[i % 3], seed=1000 + i,
                mask=masks[i % 3], groups=groups[(i // 3) % 3], num_groups=1 + (i * 5) % 8,
                renormalize=bool(i % 2), contiguous=(i % 4 != 3),
            ))
            i += 1
    return specs


EXPLICIT = _explicit_specs()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec", EXPLICIT, ids=[f"E{s['num_experts']}-k{s['top_k']}-{str(s['dtype'])[6:]}" for s in EXPLICIT]
)
def test_explicit_shapes(spec, device):
    _check_case(make_case(**spec).to(device), spec["seed"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_many_groups(dtype, device):
    # column-major logits, a sliced view with row stride > E, and more groups than a tile usually holds
    case = make_case(200, 60, 8, dtype, seed=SESSION_SEED, mask="per_group", groups="with_unassigned",
                     num_groups=40, renormalize=True, contiguous=False).to(device)
    _check_case(case, SESSION_SEED)
    wide = torch.cat([case.logits, case.logits[:, :7]], dim=1)[:, :60]
    assert wide.stride() != (60, 1)
    case.logits = wide
    _check_case(case, SESSION_SEED + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    logits = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    counts = torch.full((2, 64), 5, dtype=torch.int64, device=device)
    keep = torch.ones(2, 64, dtype=torch.bool, device=device)
    group = torch.empty(0, dtype=torch.int64, device=device)
    weights, ids = route(logits, 8, keep, group, counts, backend="triton")
    assert weights.shape == (0, 8) and ids.shape == (0, 8) and ids.dtype == torch.int64
    assert (counts == 5).all()
    grad = triton_route.route_backward(weights, logits, keep, group, ids, False)
    assert grad.shape == (0, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_counts_unused_experts_stay_zero(device):
    gen = torch.Generator().manual_seed(SESSION_SEED)
    E, T, G = 60, 150, 3
    logits = torch.randn(T, E, generator=gen).to(device)
    keep = torch.zeros(G, E, dtype=torch.bool)
    keep[0, :10] = True
    keep[1, 20:30] = True
    keep[2, 50:] = True
    group = torch.randint(0, G, (T,), generator=gen)
    counts = torch.zeros(G, E, dtype=torch.int64, device=device)
    _, ids = route(logits, 4, keep.to(device), group.to(device), counts, backend="triton")
    expected = torch.zeros(G, E, dtype=torch.int64)
    for g in range(G):
        expected[g] = torch.bincount(ids.cpu()[group == g].flatten(), minlength=E)
    assert torch.equal(counts.cpu(), expected)
    assert (counts.cpu()[~keep] == 0).all()
    assert counts.sum().item() == T * 4


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_exact_ties_go_to_lower_index(device):
    gen = torch.Generator().manual_seed(SESSION_SEED)
    levels = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    logits = levels[torch.randint(0, 4, (90, 64), generator=gen)].to(torch.bfloat16)
    logits[0] = 1.0  # a row of one value: ids 0..k-1
    logits = logits.to(device)
    counts = torch.zeros(1, 64, dtype=torch.int64, device=device)
    weights, ids = route(logits, 8, counts=counts, backend="triton")
    ref_w, ref_ids = reference.route_reference(logits, 8)
    assert torch.equal(ids, ref_ids)
    assert ids[0].tolist() == list(range(8))
    # within a run of equal weights the ids ascend
    same = weights[:, 1:] == weights[:, :-1]
    assert (ids[:, 1:] > ids[:, :-1])[same].all()
    torch.testing.assert_close(weights, ref_w, atol=8e-3, rtol=1.6e-2)
    assert torch.equal(counts.cpu().flatten(), torch.bincount(ids.cpu().flatten(), minlength=64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_rows(dtype, device):
    gen = torch.Generator().manual_seed(SESSION_SEED)
    E, k = 60, 8
    logits = torch.randn(12, E, generator=gen).to(dtype)
    logits[1, 3] = float("nan")
    logits[2, 35] = float("inf")
    logits[3, :] = float("-inf")
    logits[4, 40] = -float("nan")
    logits[5, :] = float("nan")
    keep = torch.ones(2, E, dtype=torch.bool)
    keep[1, :30] = False
    group = torch.tensor([0, 0, 1, 0, 1, 0, -1, 1, 0, 0, 1, -1])
    logits[7, 30:] = float("-inf")  # every allowed expert of a group-1 row is -inf
    counts = torch.zeros(2, E, dtype=torch.int64, device=device)
    weights, ids = route(logits.to(device), k, keep.to(device), group.to(device), counts, True,
                         backend="triton", validate=False)
    weights, ids = weights.cpu(), ids.cpu()
    bad = [1, 2, 3, 4, 5, 7]
    good = [r for r in range(12) if r not in bad]
    assert torch.isnan(weights[bad]).all()
    assert torch.isfinite(weights[good]).all()
    assert ((ids >= 0) & (ids < E)).all()
    for row in ids:  # no expert twice in a row
        assert len(set(row.tolist())) == k
    expected = torch.zeros(2, E, dtype=torch.int64)
    for t in range(12):
        if group[t] >= 0:
            expected[group[t]] += torch.bincount(ids[t], minlength=E)
    assert torch.equal(counts.cpu(), expected)
    ref_w, ref_ids = reference.route_reference(logits, k, keep, group, None, True)
    assert torch.equal(ids[good], ref_ids[good])
    torch.testing.assert_close(weights[good], ref_w[good], atol=8e-3, rtol=1.6e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_skewed_load(device):
    # about 90% of the tokens choose expert 3 first, and most choose 5 second: hot counters, exact counts
    gen = torch.Generator().manual_seed(SESSION_SEED)
    T, E, k = 3000, 64, 8
    logits = torch.randn(T, E, generator=gen)
    hot = torch.rand(T, generator=gen) < 0.9
    logits[hot, 3] += 8.0
    logits[hot, 5] += 6.0
    logits = logits.to(torch.bfloat16).to(device)
    group = torch.randint(-1, 2, (T,), generator=gen).to(device)
    counts = torch.full((2, E), 7, dtype=torch.int64, device=device)
    ref_counts = counts.clone()
    weights, ids = route(logits, k, None, group, counts, backend="triton")
    ref_w, ref_ids = reference.route_reference(logits, k, None, group, ref_counts)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, ref_counts)
    assert counts[:, 3].sum().item() - 14 > 0.85 * (group >= 0).sum().item()


@pytest.mark.parametrize("device", DEVICES)
def test_group_none_counts_into_row_zero(device):
    case = make_case(100, 64, 8, torch.bfloat16, seed=SESSION_SEED, mask="random").to(device)
    counts = torch.zeros(3, 64, dtype=torch.int64, device=device)
    _, ids = route(case.logits, 8, case.keep[:1].expand(3, 64).contiguous(), None, counts, backend="triton")
    assert torch.equal(counts[0].cpu(), torch.bincount(ids.cpu().flatten(), minlength=64))
    assert (counts[1:] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    dict(mask="none", groups="none", renormalize=False),
    dict(mask="none", groups="none", renormalize=True),
    dict(mask="per_group", groups="with_unassigned", renormalize=False),
    dict(mask="per_group", groups="with_unassigned", renormalize=True),
    dict(mask="random", groups="none", renormalize=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flags", BACKWARD_CASES, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_backward_matches_autograd(flags, dtype, device):
    case = make_case(70, 60, 8, dtype, seed=SESSION_SEED, num_groups=3, contiguous=False, **flags).to(device)
    logits = case.logits.detach().clone().requires_grad_()
    weights, ids = route(logits, case.top_k, case.keep, case.group, None, case.renormalize, backend="triton")
    gen = torch.Generator().manual_seed(SESSION_SEED + 7)
    grad_out = torch.randn(weights.shape, generator=gen).to(dtype).to(device)
    weights.backward(grad_out)

    exact = case.logits.detach().cpu().double().requires_grad_()
    keep = None if case.keep is None else case.keep.cpu()
    group = None if case.group is None else case.group.cpu()
    ref_w, ref_ids = reference.route_reference(exact, case.top_k, keep, group, None, case.renormalize)
    assert torch.equal(ids.cpu(), ref_ids)
    ref_w.backward(grad_out.cpu().double())

    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(logits.grad.cpu().double(), exact.grad, atol=atol, rtol=rtol)
    if case.keep is not None:  # masked experts get no gradient
        allowed = reference.allowed_experts(logits.shape[0], keep, group)
        assert (logits.grad.cpu()[~allowed] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_launcher_writes_every_element(renormalize, device):
    case = make_case(33, 64, 2, torch.float16, seed=SESSION_SEED, mask="per_group", groups="random",
                     renormalize=renormalize).to(device)
    _, ids = triton_route.route_forward(case.logits, 2, case.keep, case.group, None, renormalize)
    grad_w = torch.randn(33, 2, device=device).to(torch.float16)
    out = torch.full_like(case.logits, float("nan"))
    got = triton_route.route_backward(grad_w, case.logits, case.keep, case.group, ids, renormalize, out=out)
    assert got is out
    expected = reference.route_backward_reference(grad_w, case.logits, case.keep, case.group, ids, renormalize)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_of_grads_near_the_largest_value_stays_finite(renormalize, device):
    """bf16 grads near the largest value with opposite signs (g - dot beyond float32's range, every gradient within
    it): the kernel takes w g - w dot, as the reference does, and matches the float64 computation."""
    logits, ids, grad = extreme_grads_case(torch.Generator().manual_seed(SESSION_SEED + 5), renormalize,
                                           triton_route.route_forward, device)
    got = triton_route.route_backward(grad, logits, None, None, ids, renormalize)
    exact = reference.route_backward_reference(grad.double(), logits.double(), None, None, ids, renormalize)
    assert torch.isfinite(exact).all()
    torch.testing.assert_close(got.double(), exact, atol=8e-3, rtol=1.6e-2)


# --------------------------------------------------------------------------------------------------------------
# The op end to end, the launcher API and backend choice
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_route_end_to_end_mutates_counts(device):
    case = make_case(90, 64, 8, torch.bfloat16, seed=SESSION_SEED, mask="per_group", groups="with_unassigned",
                     num_groups=4, renormalize=True).to(device)
    counts = torch.ones(4, 64, dtype=torch.int64, device=device)
    ptr = counts.data_ptr()
    weights, ids = route(case.logits, 8, case.keep, case.group, counts, True, backend="triton")
    assert counts.data_ptr() == ptr
    _, naive_ids, naive_counts = naive_route(case)
    assert torch.equal(ids.cpu(), naive_ids)
    assert torch.equal(counts.cpu() - 1, naive_counts)
    # a second call with the same tensors accumulates
    route(case.logits, 8, case.keep, case.group, counts, True, backend="triton")
    assert torch.equal(counts.cpu() - 1, 2 * naive_counts)
    # the registered op itself
    weights, ids = torch.ops.moe_fastmask.route(case.logits, 8, case.keep, case.group, counts, True, "triton")
    assert torch.equal(ids.cpu(), naive_ids)
    assert torch.equal(counts.cpu() - 1, 3 * naive_counts)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    case = make_case(20, 60, 4, torch.float32, seed=SESSION_SEED, mask="per_group", groups="with_unassigned",
                     num_groups=2).to(device)
    torch.library.opcheck(
        torch.ops.moe_fastmask.route.default,
        (case.logits, 4, case.keep, case.group, case.new_counts(), False, "triton"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_out_arguments_are_checked(device):
    logits = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="out weights"):
        triton_route.route_forward(logits, 2, None, None, None, False,
                                   out=(torch.empty(4, 3, device=device), torch.empty(4, 2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="out ids"):
        triton_route.route_forward(logits, 2, None, None, None, False,
                                   out=(torch.empty(4, 2, device=device), torch.empty(4, 2, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_tile_overrides_agree(device):
    case = make_case(100, 60, 8, torch.bfloat16, seed=SESSION_SEED, mask="per_group", groups="with_unassigned",
                     num_groups=3).to(device)
    counts = [case.new_counts() for _ in range(3)]
    results = [
        triton_route.route_forward(case.logits, 8, case.keep, case.group, c, False, block_t=bt, num_warps=nw)
        for c, (bt, nw) in zip(counts, [(None, None), (1, 1), (32, 2)])
    ]
    for (w, i), c in zip(results[1:], counts[1:]):
        assert torch.equal(i, results[0][1]) and torch.equal(w, results[0][0]) and torch.equal(c, counts[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_capture():
    case = make_case(512, 64, 8, torch.bfloat16, seed=SESSION_SEED, mask="per_group", groups="random",
                     num_groups=2).to("cuda")
    counts = case.new_counts()
    args = (case.logits, 8, case.keep, case.group, counts, False)
    route(*args, backend="triton", validate=False)  # compile outside the capture
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(*args, backend="triton", validate=False)
    counts.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    ref_counts = case.new_counts()
    _, ref_ids = reference.route_reference(*args[:4], ref_counts, False)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, 2 * ref_counts)


def test_is_available_logic(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_route.is_available(torch.device("cpu")) == triton_route._triton_importable()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_route.is_available(torch.device("cpu"))
    assert not triton_route.is_available("meta")
    monkeypatch.setattr(triton_route, "_triton_importable", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_route.is_available("cpu")
    assert not triton_route.is_available("cuda")


def test_availability_probe_runs_outside_compiled_code(monkeypatch):
    """torch.compile(fullgraph=True) runs the Triton probe eagerly: some torch versions refuse to trace its
    ``importlib.util.find_spec``. Here the probe graph-breaks, which fails fullgraph compilation if it is traced."""
    calls = []

    def untraceable_probe() -> bool:
        calls.append(1)
        torch._dynamo.graph_break()
        return True

    monkeypatch.setattr(triton_route, "_probe_triton", untraceable_probe)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def plus_one_if_available(x):
        return x + 1 if triton_route.is_available(x.device) else x - 1

    torch._dynamo.reset()
    out = torch.compile(plus_one_if_available, fullgraph=True, backend="eager")(torch.zeros(3))
    torch._dynamo.reset()
    assert torch.equal(out, torch.ones(3))
    assert calls == [1]


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
        route(torch.randn(3, 8), 2, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device, session_seed):
    case = make_case(24, 60, 4, torch.float32, seed=session_seed, mask="per_group", groups="with_unassigned",
                     num_groups=3, renormalize=True).to(device)
    assert_compiled_matches_eager(case, "triton")


# --------------------------------------------------------------------------------------------------------------
# Direct launch of compiled kernels
# --------------------------------------------------------------------------------------------------------------


def _triton_specializer():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    return lambda arg: tuple(native_specialize_impl(BaseBackend, arg, False, True, True))


def test_specialization_traits_refine_tritons_own(session_seed):
    """Arguments with equal traits must get the same specialisation from Triton, or a direct launch could run a
    kernel compiled for assumptions the arguments break (a pointer alignment, an int fixed to 1)."""
    specialize = _triton_specializer()
    if specialize is None:
        pytest.skip("this Triton has no native specialisation entry point to compare with")
    gen = random.Random(session_seed)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, (1 << 31) - 16, (1 << 31) - 1, 1 << 31, (1 << 63) - 1, 1 << 63]
    ints += [gen.randrange(-(1 << 40), 1 << 40) for _ in range(200)] + [16 * gen.randrange(1 << 20) for _ in range(50)]
    base = torch.zeros(64, dtype=torch.uint8)
    tensors = [base[offset:].view(dtype) for offset in range(0, 33, 1) for dtype in (torch.uint8,)]
    tensors += [base[offset:offset + 16].view(dtype) for offset in (0, 2, 4, 8, 16, 18) for dtype in (torch.bfloat16, torch.float16)]
    tensors += [base[offset:offset + 32].view(torch.int64) for offset in (0, 8, 16, 24)]
    tensors += [torch.zeros(3, dtype=dtype)[i:] for dtype in (torch.float32, torch.int32, torch.bool) for i in range(3)]
    seen: dict[tuple, tuple] = {}
    for arg in ints + tensors + [True, False]:
        traits = triton_route.specialization_traits(arg)
        assert seen.setdefault(traits, specialize(arg)) == specialize(arg), f"{arg!r}: {traits}"
    # and the traits do tell apart what Triton tells apart
    assert triton_route.specialization_traits(base[:16]) != triton_route.specialization_traits(base[2:18])
    assert len({triton_route.specialization_traits(v) for v in (1, 16, 17)}) == 3


def _skip_unless_direct_launch_verified():
    import triton

    if not triton_route.direct_launch_verified(triton.__version__):
        pytest.skip(f"direct launch is not verified on Triton {triton.__version__}")


def _misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose data pointer is not 16-byte aligned."""
    flat = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    out = flat[1:].view(tensor.shape)
    out.copy_(tensor)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_launch_matches_jit_launch(dtype, monkeypatch):
    """Repeated launches (the direct path after the first) give what Triton's JIT entry point gives, bit for bit,
    across sizes, aligned and misaligned pointers, strides, masks and groups; and the direct path is taken."""
    _skip_unless_direct_launch_verified()
    cases = []
    for i, T in enumerate((1, 16, 16, 1, 37, 512, 16)):
        case = make_case(T, 64, 8, dtype, seed=SESSION_SEED + i, mask="per_group", groups="with_unassigned",
                         num_groups=2, renormalize=i % 2 == 1).to("cuda")
        cases.append(case)
        if T > 1:
            cases.append(dataclasses.replace(case, logits=_misaligned(case.logits)))
            cases.append(dataclasses.replace(case, logits=torch.cat([case.logits] * 2, dim=1)[:, 64:]))

    def run_all():
        results = []
        for case in cases:
            counts = case.new_counts()
            weights, ids = triton_route.route_forward(case.logits, 8, case.keep, case.group, counts, case.renormalize)
            grad = triton_route.route_backward(torch.ones_like(weights), case.logits, case.keep, case.group, ids,
                                               case.renormalize)
            results.append((weights, ids, counts, grad))
        return results

    monkeypatch.setattr(triton_route, "FAST_LAUNCH", False)
    expected = run_all()
    monkeypatch.setattr(triton_route, "FAST_LAUNCH", True)
    before = triton_route._FORWARD.direct_launches, triton_route._BACKWARD.direct_launches
    for _ in range(2):
        for got, want, case in zip(run_all(), expected, cases):
            for a, b in zip(got, want):
                assert torch.equal(a, b), case.describe()
    assert triton_route._FORWARD.direct_launches - before[0] >= len(cases)
    assert triton_route._BACKWARD.direct_launches - before[1] >= len(cases)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_direct_launch_runs_profiler_hooks():
    import triton

    _skip_unless_direct_launch_verified()
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    logits = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    triton_route.route_forward(logits, 8, None, None, None, False)  # compiled, then direct
    before = triton_route._FORWARD.direct_launches
    runtime = triton.knobs.runtime
    chained = hasattr(runtime.launch_enter_hook, "add")  # a hook chain in newer Triton, a plain slot before
    previous = runtime.launch_enter_hook
    if chained:
        runtime.launch_enter_hook.add(hook)
    else:
        runtime.launch_enter_hook = hook
    try:
        triton_route.route_forward(logits, 8, None, None, None, False)
    finally:
        if chained:
            runtime.launch_enter_hook.remove(hook)
        else:
            runtime.launch_enter_hook = previous
    assert len(seen) == 1 and triton_route._FORWARD.direct_launches == before + 1


def test_direct_launch_only_on_verified_triton_versions(monkeypatch):
    """Versions other than the verified ones take the public JIT launch, with one notice."""
    import triton

    assert triton_route.direct_launch_verified("3.6.0") and triton_route.direct_launch_verified("3.6.1+git1234")
    for version in ("3.5.1", "3.60.0", "3.9.0", "4.0.0"):
        assert not triton_route.direct_launch_verified(version), version
    monkeypatch.setattr(triton, "__version__", "99.1.0")
    triton_route._direct_launch_supported.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="JIT entry point") as caught:
            assert not triton_route._direct_launch_supported()
            assert not triton_route._direct_launch_supported()
        assert len(caught) == 1
    finally:
        triton_route._direct_launch_supported.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_unverified_triton_version_falls_back_to_jit_launch_with_identical_results(monkeypatch):
    import triton

    cases = [make_case(T, 64, 8, torch.bfloat16, seed=SESSION_SEED + T, mask="per_group", groups="with_unassigned",
                       num_groups=2, renormalize=True).to("cuda") for T in (1, 16, 300)]

    def run_all():
        results = []
        for _ in range(2):  # the second round is the one a cached direct launch would take
            for case in cases:
                counts = case.new_counts()
                weights, ids = triton_route.route_forward(case.logits, 8, case.keep, case.group, counts, True)
                grad = triton_route.route_backward(torch.ones_like(weights), case.logits, case.keep, case.group, ids,
                                                   True)
                results.append((weights, ids, counts, grad))
        return results

    triton_route._direct_launch_supported.cache_clear()
    expected = run_all()
    monkeypatch.setattr(triton, "__version__", "99.1.0")
    triton_route._direct_launch_supported.cache_clear()
    before = triton_route._FORWARD.direct_launches, triton_route._BACKWARD.direct_launches
    try:
        with pytest.warns(RuntimeWarning, match="JIT entry point"):
            got = run_all()
    finally:
        triton_route._direct_launch_supported.cache_clear()
    assert (triton_route._FORWARD.direct_launches, triton_route._BACKWARD.direct_launches) == before
    for a, b in zip(got, expected):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
