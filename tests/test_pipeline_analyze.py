"""End to end: ``moe-fastmask analyze`` on the tiny demo model (CPU, float32, a few short batches)."""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from artifact_checks import assert_same

from conftest import load_benchmark
from moe_fastmask.pipeline import analyze, artifacts, stats
from moe_fastmask.pipeline.analyze import AnalysisConfig, AnalysisError, run_analysis
from moe_fastmask.pipeline.artifacts import ConfigMismatchError
from moe_fastmask.pipeline.demo import build_demo

SMALL = dict(batch_size=8, max_new_tokens=6, progress=False, verbose=False)
BATCH_KEYS = {"batch_idx", "batch_outputs", "safe_indices", "unsafe_indices", "safe_routings", "unsafe_routings",
              "safe_tokens", "unsafe_tokens", "pairs", "pair_passed", "kept_indices", "group_counts", "group_tokens",
              "sample_counts", "sample_tokens", "token_experts"}  # fmt: skip


def _parser():
    parser = argparse.ArgumentParser(prog="moe-fastmask")
    analyze.add_cli_arguments(parser.add_subparsers(dest="command", required=True))
    return parser


def _cli(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``moe-fastmask analyze --demo`` through the CLI entry point, small settings."""
    out = tmp_path_factory.mktemp("demo_run")
    argv = ["analyze", "--demo", "--out", str(out), "--batch-size", "8", "--num-batches", "3",
            "--max-new-tokens", "6", "--no-progress"]  # fmt: skip
    assert _cli(argv) == 0
    return out


@pytest.fixture(scope="module")
def reference_run(demo_inputs, tmp_path_factory):
    """An uninterrupted API run on the shared demo inputs (3 batches)."""
    model, data = demo_inputs
    out = tmp_path_factory.mktemp("reference_run")
    config = AnalysisConfig(model=str(model), data=str(data), out=str(out), num_batches=3, **SMALL)
    return run_analysis(config)


def _read(out: Path, stem: str, suffix: str = ".pkl"):
    (path,) = out.glob(f"{stem}_*{suffix}")
    return path


# ------------------------------------------------------------------------------------------------------------
# artifacts of the demo
# ------------------------------------------------------------------------------------------------------------


def test_demo_writes_every_artifact(demo_run):
    slug = "demo--model"
    assert (demo_run / "demo" / "model" / "config.json").exists() and (demo_run / "demo" / "data.json").exists()
    for name in (f"batch_outputs_{slug}.pkl", f"risk_diff_{slug}.pkl", f"risk_diff_{slug}.csv",
                 f"sft_dataset_{slug}.pkl", f"split_{slug}.json", f"analysis_config_{slug}.json",
                 f"risk_diff_heatmap_{slug}.png", f"top_experts_{slug}.png"):  # fmt: skip
        assert (demo_run / name).stat().st_size > 0, name
    for png in demo_run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(demo_run.glob(".*.tmp"))


def test_batch_outputs_structure(demo_run):
    outputs = pd.read_pickle(_read(demo_run, "batch_outputs"))
    assert set(outputs) == {"batch_data_list", "config"}
    config = outputs["config"]
    assert config["batch_size"] == 8 and config["max_new_tokens"] == 6 and config["count_tokens"] == "generated"
    assert len(outputs["batch_data_list"]) == 3
    for b, batch in enumerate(outputs["batch_data_list"]):
        assert BATCH_KEYS <= set(batch)
        assert batch["batch_idx"] == b
        assert batch["safe_indices"] == [0, 1, 2, 3] and batch["unsafe_indices"] == [4, 5, 6, 7]
        assert len(batch["batch_outputs"]) == 8
        for position, item in enumerate(batch["batch_outputs"]):
            assert {"prompt", "generated_text", "id", "kind"} <= set(item)
            assert item["position"] == position
            assert item["kind"] == ("safe" if position < 4 else "unsafe")
            assert isinstance(item["generated_text"], str) and "<|assistant|>" in item["prompt"]
        for s, u in batch["pairs"]:  # paired: same record in both halves
            assert batch["batch_outputs"][s]["id"] == batch["batch_outputs"][u]["id"]
        assert batch["safe_routings"].shape == batch["unsafe_routings"].shape == (2, 8)  # [layers, experts]
        assert batch["safe_routings"].dtype == np.int64
        token_experts = batch["token_experts"]
        assert token_experts["prefill"].dtype == np.uint8 and token_experts["prefill"].shape[2:] == (2, 2)
        assert token_experts["decode"].dtype == np.uint8 and token_experts["decode_counted"].dtype == bool


def test_risk_diff_and_sft_structure(demo_run):
    table = pd.read_pickle(_read(demo_run, "risk_diff"))
    assert list(table.columns) == stats.AGGREGATE_COLUMNS
    assert len(table) == 2 * 8
    assert table["risk_diff"].is_monotonic_decreasing
    assert table["Layer_Expert"].str.fullmatch(r"L\d\d_E\d\d").all()
    np.testing.assert_allclose(table["risk_diff_abs"], table["risk_diff"].abs())
    csv = pd.read_csv(_read(demo_run, "risk_diff", ".csv"))
    pd.testing.assert_frame_equal(csv, table, check_dtype=False)

    sft = pd.read_pickle(_read(demo_run, "sft_dataset"))
    assert list(sft.columns) == ["batch_idx", "position", "kind", "id", "messages", "response"]
    assert len(sft) == 3 * 8 and set(sft["kind"]) == {"safe", "unsafe"}
    outputs = pd.read_pickle(_read(demo_run, "batch_outputs"))["batch_data_list"]
    for row in sft.itertuples():
        item = outputs[row.batch_idx]["batch_outputs"][row.position]
        assert row.messages == item["messages"] and row.id == item["id"]
        assert all(set(m) == {"role", "content"} for m in row.messages)
        if row.kind == "safe":
            assert row.response == item["generated_text"]
        else:
            paired = outputs[row.batch_idx]["batch_outputs"][row.position - 4]
            usable = paired["refused"] and paired["generated_text"].strip()
            assert row.response == (paired["generated_text"] if usable else analyze.DEFAULT_REFUSAL_TEXT)

    split = json.loads(_read(demo_run, "split", ".json").read_text())
    assert set(split) == {"seed", "test_fraction", "train_ids", "test_ids", "data_path", "data_sha256", "fingerprints"}
    assert split["data_sha256"] == artifacts.file_sha256(split["data_path"])
    assert len(split["fingerprints"]) == 40  # every record of the file, train and test
    assert set(split["train_ids"]).isdisjoint(split["test_ids"]) and len(split["test_ids"]) == 8  # 40 * 0.2
    used = {item["id"] for batch in outputs for item in batch["batch_outputs"]}
    assert used <= set(split["train_ids"])


def test_per_batch_risk_diff_equals_independent_computation(demo_run):
    outputs = pd.read_pickle(_read(demo_run, "batch_outputs"))["batch_data_list"]
    per_batch = analyze.risk_diff_per_batch(outputs)
    n_experts = 8
    for batch in outputs:
        te = batch["token_experts"]
        # brute force over each generated token's recorded experts (count_tokens="generated")
        counts = np.zeros((2, 2, n_experts), np.int64)  # [group, layer, expert]
        tokens = np.zeros(2, np.int64)
        for b in range(te["decode"].shape[0]):
            group = 0 if b in batch["safe_indices"] else 1
            n_counted = 0
            for t in range(te["decode"].shape[1]):
                if te["decode_counted"][b, t]:
                    n_counted += 1
                    tokens[group] += 1
                    for layer in range(2):
                        for expert in te["decode"][b, t, layer]:
                            counts[group, layer, expert] += 1
            # generated tokens are counted when fed back, up to (excluding) the first EOS
            assert n_counted == min(batch["batch_outputs"][b]["num_generated_tokens"], 6 - 1)
            assert te["prefill_counted"][b].sum() == batch["batch_outputs"][b]["num_prompt_tokens"]
        np.testing.assert_array_equal(counts[0], batch["safe_routings"])
        np.testing.assert_array_equal(counts[1], batch["unsafe_routings"])
        np.testing.assert_array_equal(counts.transpose(1, 0, 2), batch["group_counts"]["decode"])
        np.testing.assert_array_equal(tokens, batch["group_tokens"]["decode"])
        assert (batch["safe_tokens"], batch["unsafe_tokens"]) == tuple(tokens)
        rows = per_batch[per_batch["batch_idx"] == batch["batch_idx"]]
        for row in rows.itertuples():
            a_s, a_u = counts[0, row.layer, row.expert], counts[1, row.layer, row.expert]
            assert (row.a_safe, row.a_unsafe, row.d_safe, row.d_unsafe) == (a_s, a_u, tokens[0] - a_s, tokens[1] - a_u)
            assert row.risk_diff == pytest.approx(a_u / tokens[1] - a_s / tokens[0], abs=1e-12)
    table = pd.read_pickle(_read(demo_run, "risk_diff"))
    pd.testing.assert_frame_equal(stats.aggregate_risk_diffs(per_batch), table)


# ------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------


def test_resume_after_crash_gives_identical_artifacts(demo_inputs, reference_run, tmp_path, monkeypatch):
    model, data = demo_inputs
    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=3, **SMALL)
    real_generate = analyze.generate_batch
    calls = []

    def crash_on_batch_2(model, tokenizer, batch, *args, **kwargs):
        calls.append(batch.batch_idx)
        if batch.batch_idx == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_generate(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(analyze, "generate_batch", crash_on_batch_2)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(config)
    batch_files = sorted(p.name for p in (tmp_path / "batches_demo--model").iterdir())
    assert batch_files == ["batch_00000.pkl", "batch_00001.pkl"]
    assert not (tmp_path / "risk_diff_demo--model.pkl").exists()

    calls.clear()
    def counting(model, tokenizer, batch, *args, **kwargs):
        calls.append(batch.batch_idx)
        return real_generate(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(analyze, "generate_batch", counting)
    resumed = run_analysis(config)
    assert calls == [2]  # only the missing batch ran again

    ref_out = Path(reference_run.config.out)
    for stem, suffix in (("batch_outputs", ".pkl"), ("risk_diff", ".pkl"), ("sft_dataset", ".pkl")):
        assert_same(pd.read_pickle(_read(ref_out, stem, suffix)), pd.read_pickle(_read(tmp_path, stem, suffix)), stem)
    for stem, suffix in (("risk_diff", ".csv"), ("split", ".json"), ("analysis_config", ".json")):
        assert _read(ref_out, stem, suffix).read_bytes() == _read(tmp_path, stem, suffix).read_bytes(), stem
    pd.testing.assert_frame_equal(resumed.risk_diff, reference_run.risk_diff)


def test_other_config_is_refused_unless_overwrite(demo_inputs, reference_run, tmp_path):
    model, data = demo_inputs
    out = Path(reference_run.config.out)
    before = _read(out, "risk_diff").read_bytes()
    inputs = dict(model=str(model), data=str(data))
    changed = AnalysisConfig(**inputs, out=str(out), num_batches=3, **{**SMALL, "max_new_tokens": 5})
    with pytest.raises(ConfigMismatchError, match=r"max_new_tokens: 6 -> 5.*--overwrite"):
        run_analysis(changed)
    assert _read(out, "risk_diff").read_bytes() == before  # nothing touched
    assert _cli(["analyze", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "8",
                 "--num-batches", "3", "--max-new-tokens", "5", "--quiet", "--no-progress"]) == 2  # fmt: skip

    # a copy of the data with one byte changed is another config too (data fingerprint)
    other = tmp_path / "data.json"
    other.write_text(Path(data).read_text().replace("case 0)", "case 0!)"))
    moved = AnalysisConfig(model=str(model), data=str(other), out=str(out), num_batches=3, **SMALL)
    with pytest.raises(ConfigMismatchError, match="data"):
        run_analysis(moved)

    fresh = tmp_path / "fresh"
    first = AnalysisConfig(**inputs, out=str(fresh), num_batches=1, **{**SMALL, "max_new_tokens": 3})
    run_analysis(first)
    second = AnalysisConfig(model=str(model), data=str(data), out=str(fresh), num_batches=1, overwrite=True,
                            count_tokens="all", **{**SMALL, "max_new_tokens": 3})  # fmt: skip
    result = run_analysis(second)
    batch = result.batch_data_list[0]
    both = batch["group_counts"]["prefill"][:, 0] + batch["group_counts"]["decode"][:, 0]
    np.testing.assert_array_equal(batch["safe_routings"], both)
    assert batch["unsafe_tokens"] == batch["group_tokens"]["prefill"][1] + batch["group_tokens"]["decode"][1]
    assert json.loads(_read(fresh, "analysis_config", ".json").read_text())["config"]["count_tokens"] == "all"


# ------------------------------------------------------------------------------------------------------------
# pair filter
# ------------------------------------------------------------------------------------------------------------


def test_pair_filter_recomputes_counts_from_kept_pairs(demo_inputs, reference_run, tmp_path, capsys):
    model, data = demo_inputs
    unfiltered = reference_run.batch_data_list
    # a judge that refuses exactly the plain-goal answers of batch 1 and of every other record of batch 2
    refusals = {o["generated_text"] for o in unfiltered[1]["batch_outputs"][:4]}
    refusals |= {o["generated_text"] for o in unfiltered[2]["batch_outputs"][:4:2]}
    assert not refusals & {o["generated_text"] for b in unfiltered for o in b["batch_outputs"][4:]}

    def judge(text):
        return text in refusals

    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=3, filter_pairs=True,
                            judge=judge, **{**SMALL, "verbose": True})  # fmt: skip
    result = run_analysis(config)
    printed = capsys.readouterr()
    assert "batch 0: 0/4 pairs pass the pair filter -> no pair left" in printed.out
    assert "batch 1: 4/4 pairs pass" in printed.out and "batch 2: 2/4 pairs pass" in printed.out
    batches = result.batch_data_list
    assert [b["kept_indices"] for b in batches] == [[], list(range(8)), [0, 2, 4, 6]]
    assert batches[0]["safe_tokens"] == 0 and batches[0]["safe_routings"].sum() == 0
    # counts of a filtered batch = per-sample counts of its kept pairs (generated tokens)
    b2 = batches[2]
    np.testing.assert_array_equal(b2["safe_routings"], b2["sample_counts"]["decode"][[0, 2]].sum(0))
    np.testing.assert_array_equal(b2["unsafe_routings"], b2["sample_counts"]["decode"][[4, 6]].sum(0))
    # batch 1 keeps everything: the same counts as the unfiltered run
    np.testing.assert_array_equal(batches[1]["safe_routings"], unfiltered[1]["safe_routings"])
    assert sorted(result.per_batch["batch_idx"].unique()) == [1, 2]
    assert result.risk_diff["n_batches"].eq(2).all()
    # SFT rows only for kept prompts; a kept jailbreak's target is the refused plain answer
    assert len(result.sft_dataset) == 8 + 4
    for row in result.sft_dataset[result.sft_dataset["kind"] == "unsafe"].itertuples():
        paired = batches[row.batch_idx]["batch_outputs"][row.position - 4]["generated_text"]
        assert row.response == (paired if paired.strip() else analyze.DEFAULT_REFUSAL_TEXT)
    # a different judge is a different config
    with pytest.raises(ConfigMismatchError, match="judge"):
        run_analysis(AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=3,
                                    filter_pairs=True, judge=lambda t: False, **SMALL))  # fmt: skip


def test_no_pair_anywhere_is_a_clear_error(demo_inputs, tmp_path):
    model, data = demo_inputs
    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=1, filter_pairs=True,
                            judge=lambda text: False, **SMALL)  # fmt: skip
    with pytest.raises(AnalysisError, match=r"no batch kept counted tokens.*try without --filter-pairs, with another --out or with --overwrite"):
        run_analysis(config)
    saved = pd.read_pickle(_read(tmp_path, "batch_outputs"))  # the generations are not lost
    assert saved["batch_data_list"][0]["pair_passed"] == [False] * 4


# ------------------------------------------------------------------------------------------------------------
# CLI and options
# ------------------------------------------------------------------------------------------------------------


def test_cli_defaults_and_errors(tmp_path, capsys, demo_inputs):
    args = _parser().parse_args(["analyze", "--model", "m", "--data", "d.json", "--out", str(tmp_path)])
    config = analyze.config_from_args(args)
    assert (config.batch_size, config.safe_ratio, config.num_batches, config.seed) == (16, 0.5, None, 0)
    assert (config.max_new_tokens, config.count_tokens, config.test_fraction) == (64, "generated", 0.2)
    assert (config.temperature, config.top_p, config.filter_pairs, config.only_successful) == (0.0, 1.0, False, False)
    assert config.dtype == "auto" and config.keep_token_experts and config.progress
    args = _parser().parse_args(["analyze", "--demo", "--out", "x", "--count-tokens", "prompt", "--only-successful",
                                 "--filter-pairs", "--dtype", "bfloat16", "--device", "cuda"])  # fmt: skip
    config = analyze.config_from_args(args)
    assert config.demo and config.count_tokens == "prompt" and config.only_successful and config.filter_pairs
    assert (config.dtype, config.device) == ("bfloat16", "cuda")
    with pytest.raises(SystemExit):
        _parser().parse_args(["analyze", "--out", "x", "--count-tokens", "logits"])

    model, data = demo_inputs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "goal": "", "all_prompt": [], "judge_success_gpt4": 0}]))
    cases = [
        (["--model", str(model), "--data", str(bad)], "record 0 (id 1): field 'goal'"),
        (["--model", str(model), "--data", str(data), "--num-batches", "99"], "99 batches requested but the 32"),
        (["--model", str(model), "--data", str(data), "--safe-ratio", "1.0"], "strictly between 0 and 1"),
        (["--demo", "--model", str(model)], "--demo builds its own model"),
        (["--data", str(data)], "give --model and --data"),
        (["--model", str(model), "--data", str(tmp_path / "nope.json")], "does not exist"),
        (["--model", str(model), "--data", str(data), "--max-new-tokens", "1"], "max_new_tokens must be >= 2"),
    ]
    for extra, message in cases:
        assert _cli(["analyze", "--out", str(tmp_path / "o"), "--quiet", "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err, message


def test_only_successful_and_prompt_counting(demo_inputs, tmp_path):
    model, data = demo_inputs
    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), only_successful=True, **SMALL)
    train, split, batches = analyze.prepare_batches(config)
    assert train and all(r.judge_success_gpt4 == 1 for r in train)
    assert all(item.record.judge_success_gpt4 == 1 for b in batches for item in b.items)
    assert split == analyze.prepare_batches(AnalysisConfig(model="m", data=str(data)))[1]  # split ignores the filter

    result = run_analysis(AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=1,
                                         count_tokens="prompt", keep_token_experts=False, **SMALL))  # fmt: skip
    batch = result.batch_data_list[0]
    assert "token_experts" not in batch and "sample_counts" not in batch
    np.testing.assert_array_equal(batch["safe_routings"], batch["group_counts"]["prefill"][:, 0])
    assert batch["safe_tokens"] == sum(o["num_prompt_tokens"] for o in batch["batch_outputs"][:4])


def test_sampling_is_seeded_per_batch(demo_inputs, tmp_path):
    model, data = demo_inputs
    kwargs = dict(model=str(model), data=str(data), num_batches=1, temperature=0.8, top_p=0.9, **SMALL)
    a = run_analysis(AnalysisConfig(out=str(tmp_path / "a"), **kwargs))
    b = run_analysis(AnalysisConfig(out=str(tmp_path / "b"), **kwargs))
    texts = lambda r: [o["generated_text"] for o in r.batch_data_list[0]["batch_outputs"]]  # noqa: E731
    assert texts(a) == texts(b)


# ------------------------------------------------------------------------------------------------------------
# benchmark smoke test: analyze and the router-logit dump give the same per-batch counts
# ------------------------------------------------------------------------------------------------------------


def test_bench_analyze_tiny_counts_match(tmp_path, capsys):
    bench = load_benchmark("bench_analyze")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_analyze.json").read_text())
    assert report["counts_match"] is True and report["count_entries_differing"] == 0
    assert report["analyze_prompts_per_s"] > 0 and report["reference_prompts_per_s"] > 0
    assert "speedup (a)/(b)" in capsys.readouterr().out


def test_filter_off_says_nothing_about_pairs_and_counts_read_naturally(demo_inputs, tmp_path, capsys):
    batch = {"batch_idx": 2, "pair_passed": [False] * 3 + [True], "pairs": [(i, i + 4) for i in range(4)]}
    assert analyze.pair_message(batch, AnalysisConfig()) is None
    assert analyze.pair_message(batch, AnalysisConfig(filter_pairs=True)) == (
        "batch 2: 1/4 pairs pass the pair filter"
    )
    assert [analyze.plural(n, "batch") for n in (0, 1, 2)] == ["0 batches", "1 batch", "2 batches"]
    model, data = demo_inputs
    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=1,
                            **{**SMALL, "verbose": True})  # fmt: skip
    run_analysis(config)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "pair filter" not in text and "pairs pass" not in text
    assert "-> 1 batch of 8" in text and "(mean over 1 batch)" in text and "1 batches" not in text


# ------------------------------------------------------------------------------------------------------------
# what a resumed run is tied to: the model's files, readable batch files; --overwrite only once the model loads
# ------------------------------------------------------------------------------------------------------------


def _copy_model(model: Path, parent: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model, parent / Path(model).parent.name / Path(model).name))


def test_resume_refuses_a_model_whose_files_changed(demo_inputs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, data = demo_inputs
    copy = _copy_model(model, tmp_path / "models")
    config = AnalysisConfig(model=str(copy), data=str(data), out=str(tmp_path / "out"), num_batches=1, **SMALL)
    run_analysis(config)
    recorded = json.loads(_read(tmp_path / "out", "analysis_config", ".json").read_text())["model_files"]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(recorded)
    run_analysis(config)  # the same files: the finished run is taken as it is

    weights = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        weights.model.layers[0].mlp.gate.weight.mul_(-1.0)  # other routing, same shapes and file names
    weights.save_pretrained(copy)
    before = _read(tmp_path / "out", "risk_diff").read_bytes()
    with pytest.raises(ConfigMismatchError, match=r"other model files .*model\.safetensors changed.*--overwrite"):
        run_analysis(config)
    assert _read(tmp_path / "out", "risk_diff").read_bytes() == before
    rerun = run_analysis(dataclasses.replace(config, overwrite=True))  # a fresh start binds the new files
    assert rerun.risk_diff is not None
    run_analysis(config)


def test_overwrite_keeps_the_earlier_run_when_the_model_does_not_load(demo_inputs, reference_run, tmp_path):
    import shutil

    from moe_fastmask.pipeline.preflight import UsageError

    model, data = demo_inputs
    out = Path(shutil.copytree(reference_run.config.out, tmp_path / "out"))
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    broken = _copy_model(model, tmp_path / "broken")  # the same slug as the finished run, without its weights
    (broken / "model.safetensors").unlink()
    config = AnalysisConfig(model=str(broken), data=str(data), out=str(out), num_batches=3, overwrite=True, **SMALL)
    with pytest.raises((UsageError, OSError, ValueError)):
        run_analysis(config)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files  # nothing deleted, nothing added


def test_an_unreadable_batch_file_is_generated_again(demo_inputs, reference_run, tmp_path):
    import shutil

    model, data = demo_inputs
    out = Path(shutil.copytree(reference_run.config.out, tmp_path / "out"))
    batch_file = out / "batches_demo--model" / "batch_00001.pkl"
    batch_file.write_bytes(batch_file.read_bytes()[:100])  # cut short, as by an interrupted copy
    config = AnalysisConfig(model=str(model), data=str(data), out=str(out), num_batches=3, **SMALL)
    with pytest.warns(UserWarning, match=r"batch_00001\.pkl cannot be read .*generating batch 1 again"):
        resumed = run_analysis(config)
    ref_out = Path(reference_run.config.out)
    for stem in ("batch_outputs", "risk_diff", "sft_dataset"):
        assert_same(pd.read_pickle(_read(ref_out, stem)), pd.read_pickle(_read(out, stem)), stem)
    assert pd.read_pickle(batch_file)["batch_idx"] == 1
    pd.testing.assert_frame_equal(resumed.risk_diff, reference_run.risk_diff)


def test_the_run_says_how_many_records_are_left_over(demo_inputs, tmp_path, capsys):
    model, data = demo_inputs
    records = len(json.loads(Path(data).read_text()))
    config = AnalysisConfig(model=str(model), data=str(data), out=str(tmp_path), num_batches=1,
                            **{**SMALL, "verbose": True, "max_new_tokens": 2})  # fmt: skip
    run_analysis(config)
    train_records = len(json.loads(_read(tmp_path, "split", ".json").read_text())["train_ids"])
    assert train_records < records
    said = capsys.readouterr()
    assert f"{train_records - 4} records left over unused" in said.out + said.err
