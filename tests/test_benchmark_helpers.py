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
