"""``analyze``'s generation loop: prompts tokenized once, the host part of a request (judging, batch records,
per-batch files) in a background thread while the next request generates — the same records and artifacts as
without, its failures raised, resume intact — and the request plan of the graph engine."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_fastmask.pipeline import analyze
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
from moe_fastmask.pipeline.demo import build_demo
from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_analyze_packing import assert_same_runs, config_of, patch_generate_packed  # noqa: E402


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("engine, gpu_batch_size", [("graph", 16), ("hf", None)], ids=["graph-packed", "hf"])
def test_overlap_gives_the_same_records_and_artifacts(demo_inputs, tmp_path, monkeypatch, engine, gpu_batch_size):
    threads = []
    real_save = analyze.RunStore.save_batch

    def saving(store, batch_data):
        threads.append(threading.current_thread().name)
        return real_save(store, batch_data)

    monkeypatch.setattr(analyze.RunStore, "save_batch", saving)
    overlapped = run_analysis(config_of(demo_inputs, tmp_path / "on", engine=engine, gpu_batch_size=gpu_batch_size))
    assert threads == ["analyze-host-work"] * 4  # every batch file written by the background thread
    threads.clear()
    serial = run_analysis(config_of(demo_inputs, tmp_path / "off", engine=engine, gpu_batch_size=gpu_batch_size,
                                    overlap=False))  # fmt: skip
    assert threads == [threading.main_thread().name] * 4
    assert_same_runs(overlapped, serial, tmp_path / "on", tmp_path / "off")
    for result in (overlapped, serial):
        timings = result.timings
        for key in ("setup_s", "prepare_s", "generate_s", "host_s", "host_wait_s", "finalize_s", "total_s"):
            assert timings[key] >= 0, key
        assert timings["generate_s"] > 0 and timings["host_s"] > 0
        assert timings["total_s"] >= timings["setup_s"] + timings["generate_s"] + timings["finalize_s"]
        assert ("engine_decode_s" in timings) == (engine == "graph")


def test_prompts_are_tokenized_once(demo_inputs, tmp_path, monkeypatch):
    calls = []
    real = analyze.prepare_requests

    def counting(tokenizer, batches, config):
        calls.append([batch.batch_idx for batch in batches])
        return real(tokenizer, batches, config)

    monkeypatch.setattr(analyze, "prepare_requests", counting)
    run_analysis(config_of(demo_inputs, tmp_path, engine="graph", gpu_batch_size=16))
    assert calls == [[0, 1, 2, 3]]  # one call for the whole run, none per request


def test_a_failure_in_the_background_is_raised_and_the_run_resumes(demo_inputs, tmp_path, monkeypatch):
    reference = run_analysis(config_of(demo_inputs, tmp_path / "reference", engine="graph", gpu_batch_size=16))
    out = tmp_path / "run"
    real_save = analyze.RunStore.save_batch
    saved = []

    def failing_save(store, batch_data):
        if batch_data["batch_idx"] == 2:
            raise OSError("disk full (simulated)")
        saved.append(batch_data["batch_idx"])
        return real_save(store, batch_data)

    monkeypatch.setattr(analyze.RunStore, "save_batch", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run_analysis(config_of(demo_inputs, out, engine="graph", gpu_batch_size=16))
    assert saved == [0, 1]  # the batch after the failure in the same request was never handed on
    files = sorted(p.name for p in (out / "batches_demo--model").iterdir())
    assert files == ["batch_00000.pkl", "batch_00001.pkl"]
    assert not (out / "risk_diff_demo--model.pkl").exists()

    monkeypatch.setattr(analyze.RunStore, "save_batch", real_save)
    generated = []
    real_packed = analyze.generate_packed
    patch_generate_packed(monkeypatch,
                        lambda b, t, batches, *a, **k: generated.append([x.batch_idx for x in batches])
                        or real_packed(b, t, batches, *a, **k))  # fmt: skip
    resumed = run_analysis(config_of(demo_inputs, out, engine="graph", gpu_batch_size=16))
    assert generated == [[2, 3]]  # only the batches without a file
    assert_same_runs(resumed, reference, out, tmp_path / "reference", bytes_equal=False)


def test_a_failure_while_generating_still_saves_the_requests_before_it(demo_inputs, tmp_path, monkeypatch):
    model, _ = demo_inputs
    from moe_fastmask.pipeline.common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model), "cpu", "float32")
    config = config_of(demo_inputs, tmp_path, engine="graph", gpu_batch_size=8)
    _, _, batches = analyze.prepare_batches(config)
    release = threading.Event()
    handed = []

    def slow_on_batch(batch_data):
        release.wait(timeout=30)  # the first request's host part is still running when generation fails
        handed.append(batch_data["batch_idx"])

    real_packed = analyze.generate_batch

    def failing_second(backend, tokenizer, batch, *args, **kwargs):
        if batch.batch_idx == 1:
            release.set()
            raise RuntimeError("CUDA error (simulated)")
        return real_packed(backend, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(analyze, "generate_batch", failing_second)
    with pytest.raises(RuntimeError, match="simulated"):
        analyze.process_mixed_batches(model, tokenizer, batches, config, on_batch=slow_on_batch)
    assert handed == [0]


class _PlanBackend:
    """What request_plan reads of the graph engine, on a pretend CUDA device with room for 64 sequences."""

    name = "graph"
    device = SimpleNamespace(type="cuda")
    cache_multiple = 64
    max_batch_size = 8

    def batch_size_for_memory(self, prompt_len, max_new_tokens):
        return 64


def _prepared(lengths):
    sampling = SamplingSettings(max_new_tokens=6)
    return [(None, None, GenerationRequest(prompts=[[1] * n, [1] * 3], sampling=sampling, groups=[0, 1]))
            for n in lengths]  # fmt: skip


def test_request_plan_orders_by_cache_length_and_spreads_evenly():
    config = AnalysisConfig(model="m", data="d", batch_size=2, max_new_tokens=6)
    backend = _PlanBackend()
    lengths = [10, 200, 20, 150, 30, 40, 300, 50, 60, 70]  # + 6 new tokens, by 64: 64 x5, 128 x2, 192, 256, 320
    batches = [SimpleNamespace(batch_idx=i) for i in range(len(lengths))]
    plan, num_groups = analyze.request_plan(config, backend, batches, _prepared(lengths))
    # 64 sequences fit: 32 batches per request, but two requests at least, evenly filled: 5 each, by cache length
    assert plan == [[0, 2, 4, 5, 7], [8, 9, 3, 1, 6]]
    assert num_groups == 10 and backend.max_batch_size == 64
    # a size given: as many batches per request as it holds, no spreading, the same order
    given = AnalysisConfig(model="m", data="d", batch_size=2, max_new_tokens=6, gpu_batch_size=8)
    plan, num_groups = analyze.request_plan(given, _PlanBackend(), batches, _prepared(lengths))
    assert plan == [[0, 2, 4, 5], [7, 8, 9, 3], [1, 6]] and num_groups == 8
    # the hf engine: plan order, one group count per request
    hf = SimpleNamespace(name="hf")
    plan, num_groups = analyze.request_plan(given, hf, batches, _prepared(lengths))
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and num_groups is None


def test_host_work_is_held_back_while_the_prefill_launches(demo_inputs, tmp_path, monkeypatch):
    from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

    events = []
    real_phase = StaticCacheEngine._phase

    def logging_phase(engine, phase):
        assert engine.on_phase is not None  # analyze listens while it overlaps host work
        real_phase(engine, phase)
        events.append(phase)

    monkeypatch.setattr(StaticCacheEngine, "_phase", logging_phase)
    real_save = analyze.RunStore.save_batch

    def saving(store, batch_data):
        events.append(f"save {batch_data['batch_idx']}")
        return real_save(store, batch_data)

    monkeypatch.setattr(analyze.RunStore, "save_batch", saving)
    run_analysis(config_of(demo_inputs, tmp_path, engine="graph", gpu_batch_size=8))
    assert events.count("prefill") == 4 and sorted(e for e in events if e and e.startswith("save")) == [
        f"save {i}" for i in range(4)
    ]
