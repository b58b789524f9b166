"""The C++ CPU kernel (``backend="cpp"``) against the PyTorch reference and the independent naive oracle.

The first run compiles the kernel (about half a minute on two cores); later runs load the cached library.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from route_cases import (
    RouteCase,
    assert_compiled_matches_eager,
    make_case,
    naive_route,
    random_grid,
    tie_free_logits,
    tolerance,
)

from moe_fastmask import route
from moe_fastmask.ops import cpp_route, reference

route_module = importlib.import_module("moe_fastmask.ops.route")  # the module; moe_fastmask.ops.route is the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(cpp_route.disabled(), reason=f"{cpp_route.DISABLE_ENV} is set")


@pytest.fixture(scope="module", autouse=True)
def cpp_kernel():
    """Build (or load the cached build of) the kernel once; a failed build fails every test with its reason."""
    if not cpp_route.is_available():
        pytest.fail(f"the C++ kernel did not build or load: {cpp_route.load_error()}")


@pytest.fixture
def num_threads():
    """Set torch's intra-op thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def run_both(case: RouteCase, counts_start: torch.Tensor):
    """(weights, ids, counts) of the cpp backend and of the reference, each accumulating into a copy of counts_start."""
    counts_cpp, counts_ref = counts_start.clone(), counts_start.clone()
    args = (case.logits, case.top_k, case.keep, case.group)
    weights, ids = route(*args, counts_cpp, case.renormalize, backend="cpp")
    weights_ref, ids_ref = route(*args, counts_ref, case.renormalize, backend="torch")
    return (weights, ids, counts_cpp), (weights_ref, ids_ref, counts_ref)


def check_case(case: RouteCase, *, naive: bool = True, seed: int = 0) -> None:
    """ids and counts exact, weights within tolerance(dtype), against the reference and (optionally) the naive loop."""
    T, E = case.logits.shape
    gen = torch.Generator().manual_seed(seed)
    counts_start = torch.randint(0, 1000, (case.num_groups, E), generator=gen, dtype=torch.int64)
    (weights, ids, counts), (weights_ref, ids_ref, counts_ref) = run_both(case, counts_start)
    atol, rtol = tolerance(case.logits.dtype)
    where = case.describe()

    assert weights.shape == (T, case.top_k) and weights.dtype == case.logits.dtype, where
    assert ids.shape == (T, case.top_k) and ids.dtype == torch.int64, where
    assert weights.is_contiguous() and ids.is_contiguous(), where
    assert torch.equal(ids, ids_ref), where
    torch.testing.assert_close(weights, weights_ref, atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")
    assert torch.equal(counts, counts_ref), where
    if naive:
        weights_naive, ids_naive, counts_naive = naive_route(case)
        assert torch.equal(ids, ids_naive), where
        torch.testing.assert_close(weights.double(), weights_naive, atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")
        assert torch.equal(counts - counts_start, counts_naive), where


# ----------------------------------------------------------------------------------------------------------------------
# Against the oracles
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", random_grid(100, SESSION_SEED), ids=lambda s: f"T{s['num_tokens']}E{s['num_experts']}")
def test_random_grid(spec):
    check_case(make_case(**spec), seed=spec["seed"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_experts, top_k", [(e, k) for e in (8, 60, 64, 128, 256) for k in (1, 2, 8, 16) if k <= e]
)
def test_shapes(num_experts, top_k, dtype, session_seed):
    """Every valid E x top_k x dtype, each with a few masks / groups / flags / layouts drawn from the session seed."""
    settings = [
        dict(num_tokens=1, mask="none", groups="none", renormalize=False, contiguous=True),
        dict(num_tokens=37, mask="random", groups="none", renormalize=True, contiguous=False),
        dict(num_tokens=300, mask="per_group", groups="with_unassigned", num_groups=8, renormalize=False),
        dict(num_tokens=130, mask="per_group", groups="random", num_groups=3, renormalize=True, contiguous=False),
    ]
    for i, setting in enumerate(settings):
        seed = (session_seed + 7919 * i + 131 * num_experts + 17 * top_k) % (1 << 30)
        case = make_case(num_experts=num_experts, top_k=top_k, dtype=dtype, seed=seed, **setting)
        # the naive loop is slow on the biggest rows; the reference still checks them
        check_case(case, naive=case.logits.numel() <= 40 * 128, seed=seed)


def test_single_expert_and_empty_batch():
    check_case(make_case(5, 1, 1, torch.float32, seed=1))
    check_case(make_case(5, 1, 1, torch.bfloat16, seed=2, mask="random", groups="with_unassigned", num_groups=2))
    for dtype in DTYPES:
        case = make_case(0, 64, 8, dtype, seed=3, mask="per_group", groups="random", num_groups=2)
        counts = torch.arange(2 * 64, dtype=torch.int64).view(2, 64)
        weights, ids = route(case.logits, 8, case.keep, case.group, counts, backend="cpp")
        assert weights.shape == (0, 8) and weights.dtype == dtype and ids.shape == (0, 8) and ids.dtype == torch.int64
        assert torch.equal(counts, torch.arange(2 * 64, dtype=torch.int64).view(2, 64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_and_int32_groups(dtype, session_seed):
    """Logits that are row slices, every-other-row views and transposes; int32 group ids."""
    gen = torch.Generator().manual_seed(session_seed)
    wide = tie_free_logits(200, 120, dtype, gen)
    group = torch.randint(-1, 4, (100,), generator=gen, dtype=torch.int32)
    keep = torch.rand(4, 60, generator=gen) < 0.6
    keep[:, :8] = True  # at least top_k experts per group
    views = {
        "column slice": wide[:100, 20:80],
        "every other row": wide[::2, :60],
        "transposed": wide[:60, :100].t(),
        "column stride 2": wide[:100, ::2],
    }
    for name, logits in views.items():
        assert logits.shape == (100, 60), name
        case = RouteCase(logits, 8, keep, group, 4, renormalize=name == "every other row")
        check_case(case, naive=False, seed=session_seed)


def test_counts_accumulate_over_calls(session_seed):
    case = make_case(500, 64, 8, torch.bfloat16, seed=session_seed, mask="per_group", groups="with_unassigned",
                     num_groups=4)
    counts = torch.full((4, 64), 5, dtype=torch.int64)
    for _ in range(3):
        route(case.logits, 8, case.keep, case.group, counts, backend="cpp")
    expected = torch.full((4, 64), 5, dtype=torch.int64)
    for _ in range(3):
        reference.route_reference(case.logits, 8, case.keep, case.group, expected)
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == 5 * 4 * 64 + 3 * 8 * int((case.group >= 0).sum())


def test_group_none_counts_row_zero_with_keep_row_zero(session_seed):
    """group=None: every token is group 0 (keep[0], counts[0]); the other rows stay untouched."""
    gen = torch.Generator().manual_seed(session_seed)
    logits = tie_free_logits(50, 16, torch.float32, gen)
    keep = torch.rand(3, 16, generator=gen) < 0.5
    keep[:, :4] = True
    counts = torch.zeros(3, 16, dtype=torch.int64)
    weights, ids = route(logits, 4, keep, None, counts, backend="cpp")
    assert bool(keep[0][ids].all())
    assert int(counts[0].sum()) == 50 * 4 and int(counts[1:].abs().sum()) == 0
    check_case(RouteCase(logits, 4, keep, None, 3, False), seed=session_seed)


# ----------------------------------------------------------------------------------------------------------------------
# Ties, NaN, skew, threads
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_the_lower_index(dtype):
    logits = torch.zeros(4, 16, dtype=dtype)
    logits[0, [3, 9, 12]] = 2.0  # three-way tie at the top
    logits[1] = 1.0  # all equal: ids 0..k-1
    logits[2, [15, 1]] = 3.0
    logits[2, [7, 5]] = 1.5
    logits[3, [2, 4, 6, 8, 10]] = torch.tensor([0.5, 0.75, 0.5, 0.75, 0.5], dtype=dtype)
    weights, ids = route(logits, 4, backend="cpp")
    weights_ref, ids_ref = route(logits, 4, backend="torch")
    assert ids[0].tolist() == [3, 9, 12, 0]
    assert ids[1].tolist() == [0, 1, 2, 3]
    assert ids[2].tolist() == [1, 15, 5, 7]
    assert ids[3].tolist() == [4, 8, 2, 6]
    assert torch.equal(ids, ids_ref)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(weights, weights_ref, atol=atol, rtol=rtol)


def test_bf16_ties_in_random_rows(session_seed):
    """bf16 logits on a coarse grid: many exactly equal values per row, ids must still equal the reference."""
    gen = torch.Generator().manual_seed(session_seed)
    logits = (torch.randint(-8, 8, (400, 64), generator=gen).float() / 4).to(torch.bfloat16)
    keep = torch.rand(3, 64, generator=gen) < 0.5
    keep[:, :16] = True
    group = torch.randint(-1, 3, (400,), generator=gen)
    for top_k in (1, 2, 8, 16):
        counts_cpp = torch.zeros(3, 64, dtype=torch.int64)
        counts_ref = torch.zeros(3, 64, dtype=torch.int64)
        weights, ids = route(logits, top_k, keep, group, counts_cpp, renormalize=True, backend="cpp")
        weights_ref, ids_ref = route(logits, top_k, keep, group, counts_ref, renormalize=True, backend="torch")
        assert torch.equal(ids, ids_ref), top_k
        assert torch.equal(counts_cpp, counts_ref), top_k
        torch.testing.assert_close(weights, weights_ref, atol=8e-3, rtol=1.6e-2)


def test_fewer_positive_probabilities_than_top_k():
    """Allowed experts whose probability underflows to 0 (or whose logit is -inf) still rank above masked ones."""
    logits = torch.randn(4, 16)
    logits[0, 9] = float("-inf")
    logits[1, [3, 9]] = float("-inf")
    logits[2, 12] = 200.0  # every other allowed expert underflows to 0
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, [3, 7, 9, 12]] = True
    counts_cpp = torch.zeros(1, 16, dtype=torch.int64)
    counts_ref = torch.zeros(1, 16, dtype=torch.int64)
    weights, ids = route(logits, 4, keep, None, counts_cpp, backend="cpp")
    weights_ref, ids_ref = route(logits, 4, keep, None, counts_ref, backend="torch")
    assert bool(keep[0][ids].all())
    assert torch.equal(ids, ids_ref)
    assert torch.equal(counts_cpp, counts_ref)
    torch.testing.assert_close(weights, weights_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows(dtype):
    """NaN / +inf among the allowed logits, or all of them -inf: NaN weights, valid ids (those of the reference)."""
    logits = torch.randn(6, 32).to(dtype)
    keep = torch.ones(2, 32, dtype=torch.bool)
    keep[1, :16] = False
    group = torch.tensor([0, 0, 0, 1, 1, -1])
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 3] = float("nan")  # masked out for group 1: the row is fine
    logits[4, 20] = float("nan")  # allowed for group 1
    counts_cpp = torch.zeros(2, 32, dtype=torch.int64)
    counts_ref = torch.zeros(2, 32, dtype=torch.int64)
    weights, ids = route(logits, 4, keep, group, counts_cpp, backend="cpp")
    weights_ref, ids_ref = route(logits, 4, keep, group, counts_ref, backend="torch")
    bad = torch.tensor([True, True, True, False, True, False])
    assert bool(weights[bad].isnan().all())
    assert not bool(weights[~bad].isnan().any())
    assert bool(((ids >= 0) & (ids < 32)).all())
    assert torch.equal(ids, ids_ref)
    assert torch.equal(counts_cpp, counts_ref)
    assert int(counts_cpp.sum()) == 5 * 4  # the group -1 token is not counted, the NaN rows are
    torch.testing.assert_close(weights[~bad], weights_ref[~bad], atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])


def test_skewed_load(session_seed):
    """A few hot experts take most tokens; counts over many tokens (the multi-threaded path) stay exact."""
    gen = torch.Generator().manual_seed(session_seed)
    logits = torch.randn(20000, 64, generator=gen)
    logits[:, :4] += 6.0
    logits = logits.to(torch.bfloat16)
    group = torch.randint(-1, 4, (20000,), generator=gen)
    keep = torch.ones(4, 64, dtype=torch.bool)
    keep[2, :2] = False
    counts_cpp = torch.zeros(4, 64, dtype=torch.int64)
    counts_ref = torch.zeros(4, 64, dtype=torch.int64)
    weights, ids = route(logits, 8, keep, group, counts_cpp, backend="cpp")
    weights_ref, ids_ref = route(logits, 8, keep, group, counts_ref, backend="torch")
    assert torch.equal(counts_cpp, counts_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, weights_ref, atol=8e-3, rtol=1.6e-2)
    assert int(counts_cpp[0, :4].min()) > 0.9 * int((group == 0).sum())
    assert int(counts_cpp[2, :2].sum()) == 0


def test_threads_give_identical_results(num_threads, session_seed):
    case = make_case(3000, 64, 8, torch.bfloat16, seed=session_seed, mask="per_group", groups="with_unassigned",
                     num_groups=5)
    results = []
    for threads in (1, 2):
        num_threads(threads)
        counts = torch.zeros(5, 64, dtype=torch.int64)
        weights, ids = route(case.logits, 8, case.keep, case.group, counts, renormalize=True, backend="cpp")
        results.append((weights, ids, counts))
    (w1, i1, c1), (w2, i2, c2) = results
    assert torch.equal(w1.view(torch.int16), w2.view(torch.int16))  # bitwise
    assert torch.equal(i1, i2)
    assert torch.equal(c1, c2)


# ----------------------------------------------------------------------------------------------------------------------
# Autograd, backend choice, registration
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference_autograd(dtype, renormalize, session_seed):
    case = make_case(40, 60, 8, dtype, seed=session_seed, mask="per_group", groups="with_unassigned", num_groups=3)
    grad_out = torch.randn(40, 8, generator=torch.Generator().manual_seed(session_seed)).to(dtype)
    ours = case.logits.clone().requires_grad_()
    weights, _ = route(ours, 8, case.keep, case.group, None, renormalize, backend="cpp")
    weights.backward(grad_out)
    theirs = case.logits.clone().requires_grad_()
    weights_ref, _ = reference.route_reference(theirs, 8, case.keep, case.group, None, renormalize)
    weights_ref.backward(grad_out)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_torch_compile_fullgraph_forward_and_backward(backend, session_seed):
    case = make_case(33, 64, 8, torch.float32, seed=session_seed, mask="per_group", groups="with_unassigned",
                     num_groups=2, renormalize=True)
    assert_compiled_matches_eager(case, backend)


def test_auto_backend_picks_cpp_on_cpu():
    assert route_module.resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_disable_env_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(cpp_route.DISABLE_ENV, "1")
    route_module._warn_once.cache_clear()
    logits = torch.randn(10, 16)
    try:
        assert not cpp_route.is_available()
        assert cpp_route.DISABLE_ENV in cpp_route.load_error()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = route(logits, 2)
            second = route(logits, 2)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "C++" in messages[0], messages
        expected = reference.route_reference(logits, 2)
        for got in (first, second):
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
        with pytest.raises(ValueError, match="not available"):
            route(logits, 2, backend="cpp")
    finally:
        route_module._warn_once.cache_clear()
    monkeypatch.delenv(cpp_route.DISABLE_ENV)
    assert cpp_route.is_available()
    assert route_module.resolve_backend("auto", torch.device("cpu")) == "cpp"


def _op_args(dtype, with_counts, with_keep, with_group):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 24, generator=gen).to(dtype)
    keep = (torch.rand(3, 24, generator=gen) < 0.7) if with_keep else None
    if keep is not None:
        keep[:, :4] = True
    group = torch.randint(-1, 3, (33,), generator=gen) if with_group else None
    counts = torch.zeros(3, 24, dtype=torch.int64) if with_counts else None
    weights = torch.empty(33, 4, dtype=dtype)
    ids = torch.empty(33, 4, dtype=torch.int64)
    return (weights, ids, counts, logits, keep, group, True)


@pytest.mark.parametrize(
    "dtype, with_counts, with_keep, with_group",
    [(torch.float32, True, True, True), (torch.bfloat16, False, False, False), (torch.float16, True, False, True)],
)
def test_opcheck(dtype, with_counts, with_keep, with_group):
    op = torch.ops.moe_fastmask_C.route_cpu.default
    torch.library.opcheck(op, _op_args(dtype, with_counts, with_keep, with_group))


def test_op_rejects_bad_arguments():
    op = torch.ops.moe_fastmask_C.route_cpu
    weights, ids, counts, logits, keep, group, _ = _op_args(torch.float32, True, True, True)
    with pytest.raises(RuntimeError, match="topk_weights"):
        op(weights.double(), ids, counts, logits, keep, group, False)
    with pytest.raises(RuntimeError, match="top_k"):
        op(torch.empty(33, 17), torch.empty(33, 17, dtype=torch.int64), counts, logits, keep, group, False)
    with pytest.raises(RuntimeError, match="keep"):
        op(weights, ids, counts, logits, keep.int(), group, False)
    with pytest.raises(RuntimeError, match="counts"):
        op(weights, ids, counts[:2], logits, keep, group, False)
    with pytest.raises(RuntimeError, match="logits"):
        op(weights.double(), ids, counts, logits.double(), keep, group, False)


def test_cached_build_loads_in_a_new_process():
    """A second process finds the BUILT stamp and loads the library without compiling."""
    library = Path(cpp_route.build())
    assert library.is_file() and (library.parent / "BUILT").is_file()
    before = library.stat().st_mtime_ns
    code = (
        "import time; t = time.perf_counter(); from moe_fastmask.ops import cpp_route; "
        "assert cpp_route.is_available(), cpp_route.load_error(); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 10.0
    assert library.stat().st_mtime_ns == before


def _needed_libraries(library: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return [line.rsplit("[", 1)[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(cpp_route.loaded_cxx_runtime() is None or shutil.which("readelf") is None,
                    reason="needs /proc/self/maps and readelf")
def test_library_links_the_processes_cxx_runtime_even_with_a_static_libstdcxx_compiler(tmp_path):
    """A compiler that links libstdc++ statically (some toolchain wrappers find only libstdc++.a) must not give the
    library a private C++ runtime: torch's error messages formatting numbers then crash the process."""
    wrapper = tmp_path / "static-cxx"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("c++") or "g++"} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    code = (
        "import torch; from moe_fastmask.ops import cpp_route; print(cpp_route.build()); "
        "logits = torch.randn(9, 16); w = torch.empty(9, 3); ids = torch.empty(9, 3, dtype=torch.int64)\n"
        "try:\n    torch.ops.moe_fastmask_C.route_cpu(w, ids, None, logits, None, None, False, 3, None, 1, 1, 1.0)\n"
        "except RuntimeError as exc:\n    print('raised:', exc)"
    )
    env = {**os.environ, "CXX": str(wrapper), "MOE_FASTMASK_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    library = Path(out.stdout.splitlines()[0])
    assert "got 3" in out.stdout  # the numeric part of the message was formatted
    assert any(name.startswith("libstdc++.so") for name in _needed_libraries(library))
    defined = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    assert "_ZNSo" not in defined  # no std::ostream of its own
