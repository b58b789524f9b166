"""The measuring helpers of the generation benchmark (``benchmarks/bench_olmoe_generate.py``), on CPU."""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteriaList

from conftest import load_benchmark
from moe_fastmask.pipeline.demo import build_tiny_olmoe


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_olmoe_generate")


def test_ratio_summary_is_the_median_of_per_round_ratios(bench, session_seed):
    rng = np.random.default_rng(session_seed)
    baseline = rng.uniform(1.0, 2.0, size=31)
    ratios = rng.normal(1.02, 0.05, size=31)
    times = {"a": baseline.tolist(), "b": (baseline * ratios).tolist()}
    summary = bench.ratio_summary(times, "b", "a", resamples=2000, seed=session_seed)
    assert summary["median"] == pytest.approx(float(np.median(ratios)), rel=1e-12)
    assert summary["ci95_low"] <= summary["median"] <= summary["ci95_high"]
    assert summary["q1"] <= summary["median"] <= summary["q3"]
    assert summary["rounds"] == 31
    # the interval of a median of 31 noisy ratios is neither empty nor wider than the data
    assert 0 < summary["ci95_high"] - summary["ci95_low"] < ratios.max() - ratios.min()
    # a constant ratio leaves no uncertainty
    constant = bench.ratio_summary({"a": baseline.tolist(), "b": (baseline * 1.5).tolist()}, "b", "a", resamples=200)
    assert constant["ci95_low"] == pytest.approx(1.5) and constant["ci95_high"] == pytest.approx(1.5)


def test_time_interleaved_rotates_times_every_round_and_restores_gc(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    order, after, collector_on, current = [], [], [], []

    def variant(name):
        @contextlib.contextmanager
        def enter():
            current.append(name)
            yield
            current.pop()

        return enter

    def fn():
        order.append(current[-1])
        collector_on.append(gc.isenabled())

    names = ["x", "y", "z"]
    assert gc.isenabled()
    times = bench.time_interleaved(fn, {n: variant(n) for n in names}, rounds=4, after_each=after.append)
    assert gc.isenabled()
    assert order[:3] == names  # warm-ups
    assert order[3:] == ["x", "y", "z", "y", "z", "x", "z", "x", "y", "x", "y", "z"]
    assert after == order
    assert not any(collector_on[3:])  # no collection inside a timed call
    for kind in ("wall", "cpu"):
        assert set(times[kind]) == set(names)
        assert all(len(values) == 4 and min(values) >= 0 for values in times[kind].values())


def test_step_clock_times_every_decode_step_without_changing_generation(bench, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_olmoe(tmp_path, num_layers=2, seed=5)).eval()
    input_ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    clock = bench.StepClock()
    with torch.no_grad():
        plain = model.generate(input_ids, **kwargs)
        clocked = model.generate(input_ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    assert torch.equal(plain, clocked)
    steps = clock.take_step_times()
    assert len(steps) == 5 and min(steps) > 0  # one stamp per new token: 6 tokens, 5 decode steps between them
    assert clock.take_step_times() == []


def test_timeline_steps_of_the_route_kernels_stamps(session_seed):
    """bench_route_lane.timeline_steps reads the lane kernel's per-warp stamps (csrc/route_cuda.cu, kTimeline): rows of
    warps that did not run are skipped, the SM clock comes from cycles per global-timer ns, and each step's per-warp
    times are the differences of the right stamps, in us."""
    lane = load_benchmark("bench_route_lane")
    gen = torch.Generator().manual_seed(session_seed)
    ghz, warps = 1.5, 40
    timeline = torch.zeros(warps + 7, 32, dtype=torch.int64)  # (7 rows of warps that never ran)
    wait = torch.randint(100, 5000, (warps,), generator=gen)  # cycles
    compute = torch.randint(1000, 3000, (warps, 3), generator=gen)
    store = torch.randint(200, 600, (warps, 3), generator=gen)
    gap = torch.randint(0, 300, (warps, 3), generator=gen)
    tiles = torch.randint(1, 4, (warps,), generator=gen)
    for w in range(warps):
        start_ns, start = 10_000 + 7 * w, 1_000_000 + 13 * w
        cycle = start + int(wait[w])
        for i in range(int(tiles[w])):
            if i > 0:
                cycle += int(gap[w, i])
            timeline[w, 8 + 3 * i] = cycle
            timeline[w, 9 + 3 * i] = cycle = cycle + int(compute[w, i])
            timeline[w, 10 + 3 * i] = cycle = cycle + int(store[w, i])
        end = cycle + 50
        end_ns = start_ns + round((end - start) / ghz)
        timeline[w, :7] = torch.tensor([w % 5, start_ns, start, end_ns, end, int(tiles[w]), end + 80])
    facts, steps = lane.timeline_steps(timeline)
    assert facts["warps"] == warps
    assert facts["tiles"] == {n: int((tiles == n).sum()) for n in tiles.unique().tolist()}
    assert facts["ghz"] == pytest.approx(ghz, rel=1e-3)
    us = 1e-3 / facts["ghz"]
    torch.testing.assert_close(steps["wait for the first tile"], wait.double() * us)
    torch.testing.assert_close(steps["tile 0: top-k and softmax"], compute[:, 0].double() * us)
    torch.testing.assert_close(steps["tile 1: stores and counts"], store[tiles > 1, 1].double() * us)
    torch.testing.assert_close(steps["tile 2: wait after the previous tile"], gap[tiles > 2, 2].double() * us)
    torch.testing.assert_close(steps["end of the kernel's histogram flush"], torch.full((warps,), 80 * us,
                                                                                        dtype=torch.float64))
    assert "tile 3: top-k and softmax" not in steps
    lines = lane.timeline_summary(timeline)
    assert lines[0].startswith(f"warps {warps}, tiles per warp") and len(lines) == 1 + len(steps)
    assert lane.timeline_summary(torch.zeros(3, 32, dtype=torch.int64)) == ["no warp stamped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name, argv, fragment", [
    ("bench_analyze", ["--out", "o"], "no CUDA device here (--tiny runs a CPU check"),
    ("bench_analyze_engine", ["--out", "o"], "needs a CUDA device (--smoke runs a CPU check"),
    ("bench_olmoe_generate", ["--out", "o"], "needs a CUDA device"),
    ("bench_train", ["--out", "o"], "needs a CUDA device (--tiny runs a CPU check"),
    ("bench_analyze_multi_gpu", ["--out", "o"], "needs CUDA devices (--tiny runs a CPU check"),
    ("bench_route_parts", [], "needs a CUDA device"),
    ("bench_route_parts", ["--profile"], "needs a CUDA device"),
    ("bench_route_parts", ["--cases", "64,8"], "--cases '64,8': expected E,top_k,T"),
])  # fmt: skip
def test_gpu_benchmarks_refuse_a_cpu_machine_in_one_line(name, argv, fragment, monkeypatch, capsys, tmp_path):
    """Without CUDA (and without their CPU smoke options) the GPU benchmarks stop at their arguments, before
    building or loading a full-size model on the CPU."""
    monkeypatch.chdir(tmp_path)
    module = load_benchmark(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as info:
        module.main(argv) if "argv" in module.main.__code__.co_varnames else module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_diagnosis_script_help_runs_nothing(capsys):
    module = load_benchmark("diag_cpp_errors")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "Why an argument error of the C++ CPU routing op" in capsys.readouterr().out
