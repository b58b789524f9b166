"""``analyze`` with several method batches per generation request (``--gpu-batch-size``): per-batch counts, risk
differences and every artifact equal those of one batch per request, with either engine; resume works packed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moe_fastmask.pipeline import analysis_requests, analyze
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
from moe_fastmask.pipeline.demo import build_demo

sys.path.insert(0, str(Path(__file__).parent))
from compare_artifacts import compare  # noqa: E402

SMALL = dict(batch_size=8, max_new_tokens=6, num_batches=4, progress=False, verbose=False)


def patch_generate_packed(monkeypatch, replacement) -> None:
    """Replace generate_packed for every request: analyze calls it for packed requests, and generate_batch (in
    analysis_requests) for single ones."""
    monkeypatch.setattr(analyze, "generate_packed", replacement)
    monkeypatch.setattr(analysis_requests, "generate_packed", replacement)


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("inputs"))


def config_of(demo_inputs, out, **changes) -> AnalysisConfig:
    model, data = demo_inputs
    return AnalysisConfig(model=str(model), data=str(data), out=str(out), **{**SMALL, **changes})


def assert_same_runs(a, b, dir_a, dir_b, *, bytes_equal=True):
    problems = compare(dir_a, dir_b)  # every artifact file, per-batch files included
    if not bytes_equal:  # a resumed run's pickles hold loaded objects: the same content, pickled apart
        problems = [line for line in problems if not line.endswith("loaded content equal")]
    assert problems == []
    assert [x["batch_idx"] for x in a.batch_data_list] == [x["batch_idx"] for x in b.batch_data_list]
    for x, y in zip(a.batch_data_list, b.batch_data_list):
        for key in ("safe_routings", "unsafe_routings"):
            assert np.array_equal(x[key], y[key]), key
        assert (x["safe_tokens"], x["unsafe_tokens"]) == (y["safe_tokens"], y["unsafe_tokens"])
    assert a.per_batch.equals(b.per_batch) and a.risk_diff.equals(b.risk_diff)


@pytest.mark.parametrize(
    "engine, temperature", [("hf", 0.0), ("graph", 0.0), ("graph", 1.3)], ids=["hf", "graph", "graph-sampled"]
)
def test_packed_analysis_equals_one_batch_at_a_time(demo_inputs, tmp_path, monkeypatch, engine, temperature):
    requests = []
    real_packed = analyze.generate_packed

    def spying(backend, tokenizer, batches, *args, **kwargs):
        requests.append([batch.batch_idx for batch in batches])
        return real_packed(backend, tokenizer, batches, *args, **kwargs)

    patch_generate_packed(monkeypatch, spying)
    alone = run_analysis(config_of(demo_inputs, tmp_path / "alone", engine=engine, temperature=temperature))
    assert requests == [[0], [1], [2], [3]]  # one method batch per request: the unpacked run
    requests.clear()
    # 24 sequences per request: three method batches, then the last one alone
    packed = run_analysis(
        config_of(demo_inputs, tmp_path / "packed", engine=engine, temperature=temperature, gpu_batch_size=24)
    )
    assert requests == [[0, 1, 2], [3]]
    assert int(sum(b["safe_tokens"] + b["unsafe_tokens"] for b in packed.batch_data_list)) > 0
    assert_same_runs(packed, alone, tmp_path / "packed", tmp_path / "alone")


def test_packed_run_resumes_after_a_crash(demo_inputs, tmp_path, monkeypatch):
    reference = run_analysis(config_of(demo_inputs, tmp_path / "reference"))
    real_packed = analyze.generate_packed
    calls = []

    def crash_on_second_request(backend, tokenizer, batches, *args, **kwargs):
        calls.append([batch.batch_idx for batch in batches])
        if 2 in calls[-1]:
            raise KeyboardInterrupt("simulated crash")
        return real_packed(backend, tokenizer, batches, *args, **kwargs)

    out = tmp_path / "packed"
    patch_generate_packed(monkeypatch, crash_on_second_request)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(config_of(demo_inputs, out, gpu_batch_size=16))
    assert calls == [[0, 1], [2, 3]]
    assert sorted(p.name for p in (out / "batches_demo--model").iterdir()) == ["batch_00000.pkl", "batch_00001.pkl"]

    calls.clear()
    patch_generate_packed(monkeypatch, lambda *a, **k: calls.append("packed") or real_packed(*a, **k))
    resumed = run_analysis(config_of(demo_inputs, out, gpu_batch_size=16))
    assert calls == ["packed"]  # only the two missing batches ran, in one request
    assert_same_runs(resumed, reference, out, tmp_path / "reference", bytes_equal=False)


def test_gpu_batch_size_is_checked_and_parsed(demo_inputs, tmp_path):
    with pytest.raises(ValueError, match=r"gpu_batch_size must be a positive integer \(--gpu-batch-size\), got 0"):
        config_of(demo_inputs, tmp_path, gpu_batch_size=0).validate()
    import argparse

    parser = argparse.ArgumentParser()
    analyze.add_cli_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--demo", "--out", str(tmp_path), "--gpu-batch-size", "64"])
    assert analyze.config_from_args(args).gpu_batch_size == 64
    args = parser.parse_args(["analyze", "--demo", "--out", str(tmp_path)])
    assert analyze.config_from_args(args).gpu_batch_size is None


def test_engine_compile_flag_reaches_the_engine_and_stays_eager_on_cpu(demo_inputs, tmp_path, monkeypatch):
    import argparse

    from moe_fastmask.pipeline.evaluate import EvaluationArguments
    from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

    parser = argparse.ArgumentParser()
    analyze.add_cli_arguments(parser.add_subparsers(dest="command"))
    base = ["analyze", "--demo", "--out", str(tmp_path), "--engine", "graph"]
    assert analyze.config_from_args(parser.parse_args(base)).engine_compile == "auto"
    assert analyze.config_from_args(parser.parse_args(base + ["--engine-compile", "off"])).engine_compile == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--engine-compile", "sometimes"])
    with pytest.raises(ValueError, match="--engine-compile on needs .*not --engine hf"):
        config_of(demo_inputs, tmp_path, engine="hf", engine_compile="on").validate()
    with pytest.raises(ValueError, match="--engine-compile on needs"):
        EvaluationArguments(data="d.json", model="m", engine="hf", engine_compile="on")

    seen = []
    real_init = StaticCacheEngine.__init__

    def spying_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((kwargs.get("compile"), self.compiled))

    monkeypatch.setattr(StaticCacheEngine, "__init__", spying_init)
    auto = run_analysis(config_of(demo_inputs, tmp_path / "auto", engine="graph", gpu_batch_size=16))
    off = run_analysis(config_of(demo_inputs, tmp_path / "off", engine="graph", gpu_batch_size=16,
                                 engine_compile="off"))  # fmt: skip
    assert seen == [("auto", False), (False, False)]  # auto never compiles on the CPU
    assert_same_runs(auto, off, tmp_path / "auto", tmp_path / "off")


def test_analysis_plans_its_decoding_with_the_engine(demo_inputs, tmp_path, monkeypatch):
    """analyze tells the graph engine how much it will decode (prompts x max new tokens) before generating."""
    import json

    from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

    planned, generated_before = [], []
    real_plan, real_generate = StaticCacheEngine.plan_work, StaticCacheEngine.generate

    def spy_plan(self, sequences, max_new_tokens):
        planned.append((sequences, max_new_tokens))
        generated_before.append(bool(generated))
        return real_plan(self, sequences, max_new_tokens)

    generated = []

    def spy_generate(self, request):
        generated.append(len(request.prompts))
        return real_generate(self, request)

    monkeypatch.setattr(StaticCacheEngine, "plan_work", spy_plan)
    monkeypatch.setattr(StaticCacheEngine, "generate", spy_generate)
    config = config_of(demo_inputs, tmp_path, engine="graph", gpu_batch_size=16)
    run_analysis(config)
    records = json.loads(Path(config.data).read_text())
    assert planned == [(sum(generated), config.max_new_tokens)] and generated_before == [False]
    assert sum(generated) <= 2 * len(records)
