"""User mistakes on the command line (paths, types, ranges, incompatible flags, devices, missing packages): a one-line
error naming the flag, exit status 2, nothing written; internal errors keep their traceback; the model-source and
output-directory checks behind them."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from moe_fastmask.cli import main
from moe_fastmask.pipeline import analyze
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.preflight import (
    UsageError,
    check_model_source,
    check_output_dir,
    check_paths,
    is_hub_id,
    one_line,
)
from moe_fastmask.pipeline.selection import ExpertSelection

L, E, K = 2, 8, 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = build_tiny_olmoe(root / "model", seed=0, num_layers=L, num_experts=E, top_k=K)
    records = [{"id": i, "goal": f"Explain thing {i}.", "judge_success_gpt4": 1,
                "all_prompt": [{"role": "user", "content": f"TASK {i}"}]} for i in range(10)]  # fmt: skip
    data = root / "data.json"
    data.write_text(json.dumps(records))
    rows = []
    for i in range(4):
        rows.append({"batch_idx": 0, "position": i, "kind": "safe", "id": i, "response": "Sure.",
                     "messages": [{"role": "user", "content": f"Explain thing {i}."}]})  # fmt: skip
        rows.append({"batch_idx": 0, "position": 4 + i, "kind": "unsafe", "id": i, "response": "I'm sorry.",
                     "messages": [{"role": "user", "content": f"TASK {i}"}]})  # fmt: skip
    sft = root / "analysis"
    sft.mkdir()
    pd.DataFrame(rows).to_pickle(sft / "sft_dataset_tiny.pkl")
    a_file = root / "a_file.txt"
    a_file.write_text("not a directory\n")
    latin1 = root / "latin1.json"
    latin1.write_bytes(json.dumps(records).replace("thing 1.", "th\u00f6ng 1.").encode("latin-1"))
    (root / "not_a_selection.json").write_text(json.dumps({"arguments": {}, "num_selected": 3}))
    (root / "a_list.json").write_text("[]")
    ExpertSelection(num_layers=L, num_experts=64, top_k=K, experts=[(0, 1), (0, 2), (1, 1), (1, 2)],
                    masked_layers=[0, 1]).save(root / "selection_64.json")  # fmt: skip
    ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1), (0, 2), (1, 1), (1, 2)],
                    masked_layers=[0, 1]).save(root / "selection.json")  # fmt: skip
    return {"root": root, "model": model, "data": data, "sft": sft, "file": a_file}


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


def cases(inputs, out):
    model, data, sft, a_file = str(inputs["model"]), str(inputs["data"]), str(inputs["sft"]), str(inputs["file"])
    missing = str(inputs["root"] / "no_such_model")
    bare = inputs["root"] / "not_a_model"
    bare.mkdir(exist_ok=True)
    return [
        (["analyze", "--model", missing, "--data", data, "--out", out],
         f"--model {missing!r}: no such local model directory, and not a hub id (owner/name)"),
        (["analyze", "--model", "runs/x/final_model", "--data", data, "--out", out],
         "no such local model directory, and not a hub id"),
        (["analyze", "--model", str(bare), "--data", data, "--out", out], "the directory has no config.json"),
        (["analyze", "--model", a_file, "--data", data, "--out", out], "is a file; give a model directory"),
        (["analyze", "--model", model, "--data", data, "--out", a_file],
         f"--out {a_file!r} is an existing file; give a directory"),
        (["analyze", "--model", model, "--data", data, "--out", str(Path(a_file) / "sub")],
         "is a file, so the directory cannot be made"),
        (["analyze", "--demo", "--out", a_file], "is an existing file"),
        (["analyze", "--model", model, "--data", data, "--out", out, "--batch-size", "15"],
         "use --batch-size 14 or 16"),
        (["analyze", "--demo", "--out", out, "--batch-size", "15"], "use --batch-size 14 or 16"),
        (["train", "--model", missing, "--sft", sft, "--out", out], "no such local model directory, and not a hub id"),
        (["train", "--model", model, "--sft", sft, "--out", a_file], "is an existing file"),
        (["evaluate", "--model", missing, "--data", data, "--split", "all", "--out", out],
         "no such local model directory, and not a hub id"),
        (["evaluate", "--base-model", missing, "--model", model, "--data", data, "--split", "all", "--out", out],
         f"--base-model {missing!r}: no such local model directory"),
        (["evaluate", "--model", model, "--data", data, "--split", "all", "--out", a_file], "is an existing file"),
    ]  # fmt: skip


def more_cases(inputs, out):
    """Types, ranges, incompatible flags, missing files and optional packages, for every subcommand."""
    model, data, sft, a_file = str(inputs["model"]), str(inputs["data"]), str(inputs["sft"]), str(inputs["file"])
    missing = str(inputs["root"] / "missing.json")
    analyze_base = ["analyze", "--model", model, "--data", data, "--out", out]
    train_base = ["train", "--model", model, "--sft", sft, "--out", out, "--device", "cpu"]
    evaluate_base = ["evaluate", "--model", model, "--data", data, "--split", "all", "--out", out, "--device", "cpu"]
    return [
        # analyze
        (["analyze", "--demo"], "the following arguments are required: --out"),
        (["analyze", "--out", out], "give --model and --data, or --demo"),
        (["analyze", "--demo", "--model", model, "--out", out], "--demo builds its own model and data"),
        ([*analyze_base, "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
        ([*analyze_base, "--count-tokens", "logits"], "argument --count-tokens: invalid choice: 'logits'"),
        ([*analyze_base, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        ([*analyze_base, "--safe-ratio", "1.5"], "safe_ratio must be strictly between 0 and 1"),
        ([*analyze_base, "--batch-size", "1"], "batch_size must be an integer >= 2"),
        ([*analyze_base, "--test-fraction", "1"], "test_fraction must be in [0, 1)"),
        ([*analyze_base, "--temperature", "-1"], "need a finite temperature >= 0"),
        ([*analyze_base, "--temperature", "nan"], "need a finite temperature >= 0"),
        ([*analyze_base, "--temperature", "inf"], "need a finite temperature >= 0"),
        ([*analyze_base, "--batch-size", "4", "--gpu-batch-size", "2"], "must be at least batch_size (--batch-size, 4), got 2"),
        ([*analyze_base, "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        ([*analyze_base, "--min-new-tokens", "99"], "min_new_tokens must be in [0, max_new_tokens]"),
        ([*analyze_base, "--num-batches", "0"], "num_batches must be >= 1"),
        ([*analyze_base, "--num-batches", "50"], "50 batches requested but the 8 records fill only 1"),
        ([*analyze_base, "--filter-pairs", "--no-token-experts"], "needs keep_token_experts"),
        (["analyze", "--model", model, "--data", missing, "--out", out], f"data file {missing!r} does not exist"),
        (["analyze", "--model", model, "--data", a_file, "--out", out], "not valid JSON"),
        # train
        ([*train_base, "--batch-size", "15"], "use --batch-size 14 or 16"),
        ([*train_base, "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        ([*train_base, "--safe-ratio", "2"], "safe_ratio must be in [0, 1]"),
        ([*train_base, "--top-n", "3", "--threshold", "0.1"], "give at most one of --top-n, --per-layer, --threshold"),
        ([*train_base, "--checkpoint-layers", "-1"], "checkpoint_layers must be >= 0"),
        ([*train_base, "--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
        (["train", "--model", model, "--out", out], "the following arguments are required: --sft"),
        (["train", "--model", model, "--sft", missing, "--out", out], f"SFT file {missing} does not exist"),
        (["train", "--model", model, "--sft", str(inputs["root"]), "--out", out], "no sft_dataset_<slug>.pkl in"),
        ([*train_base, "--resume"], "--resume: no checkpoint in"),
        ([*train_base, "--resume", str(inputs["root"] / "nope")], "no such checkpoint directory"),
        ([*train_base, "--selection", missing], "does not exist"),
        ([*train_base, "--report-to", "surely_not_installed"], "--report-to"),
        ([*train_base, "--learning-rate", "-1"], "learning_rate must be >= 0.0 (--learning-rate), got -1.0"),
        # (NaN and inf pass the range checks and train to NaN weights)
        ([*train_base, "--learning-rate", "inf"], "learning_rate must be a finite number (--learning-rate), got inf"),
        ([*train_base, "--weight-decay", "nan"], "weight_decay must be a finite number (--weight-decay), got nan"),
        ([*train_base, "--max-grad-norm=-inf"], "max_grad_norm must be a finite number (--max-grad-norm)"),
        ([*train_base, "--num-epochs", "nan", "--max-steps", "1"], "num_epochs must be a finite number"),
        ([*train_base, "--gradient-accumulation-steps", "0"], "gradient_accumulation_steps must be >= 1"),
        ([*train_base, "--num-epochs", "0"], "num_epochs must be > 0 (or give --max-steps)"),
        ([*train_base, "--checkpoint-layers", "2"], "--checkpoint-layers needs --gradient-checkpointing"),
        ([*train_base, "--lr-scheduler-type", "foo"], "foo is not a valid SchedulerType"),
        # devices (the machine running the tests may have no GPU: a device that cannot exist here)
        ([*analyze_base, "--device", "tpu"], "--device 'tpu': not a device; use cpu, cuda or cuda:N"),
        ([*train_base[:-2], "--device", "cuda:99"], "--device 'cuda:99': "),
        ([*evaluate_base[:-2], "--device", "cuda:99"], "--device 'cuda:99': "),
        (["analyze", "--demo", "--out", out, "--device", "cuda:99"], "--device 'cuda:99': "),
        # evaluate
        (["evaluate", "--data", data, "--out", out], "give --model (after) and/or --base-model (before)"),
        (["evaluate", "--model", model, "--out", out], "the following arguments are required: --data"),
        (["evaluate", "--model", model, "--data", missing, "--out", out], "does not exist"),
        ([*evaluate_base[:-2], "--split", "dev"], "argument --split: invalid choice: 'dev'"),
        ([*evaluate_base, "--batch-size", "0"], "batch_size must be >= 1"),
        ([*evaluate_base, "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        ([*evaluate_base, "--limit", "0"], "limit must be >= 1"),
        ([*evaluate_base, "--judge", "no_colon"], "--judge must look like 'module:function'"),
        ([*evaluate_base, "--judge", "surely_not_a_module:judge"], "--judge 'surely_not_a_module:judge': cannot import"),
        ([*evaluate_base, "--judge", "json:no_such_function"], "has no 'no_such_function'"),
        ([*evaluate_base, "--selection", missing], "does not exist"),
        (["evaluate", "--model", model, "--data", data, "--split", "test", "--out", out], "--split test needs"),
    ]  # fmt: skip


def file_cases(inputs, out):
    """Input files of the wrong kind: a directory, text that is not UTF-8, JSON that is not a selection, a file that
    is not a pickle, a judge that is not a function, a selection for another model or besides selection flags."""
    root = inputs["root"]
    model, data, sft, a_file = str(inputs["model"]), str(inputs["data"]), str(inputs["sft"]), str(inputs["file"])
    train_base = ["train", "--model", model, "--sft", sft, "--out", out, "--device", "cpu"]
    evaluate_base = ["evaluate", "--model", model, "--data", data, "--split", "all", "--out", out, "--device", "cpu"]
    return [
        (["analyze", "--model", model, "--data", str(root), "--out", out], f"data file {str(root)!r} is a directory"),
        (["evaluate", "--model", model, "--data", str(root), "--out", out], "is a directory"),
        (["analyze", "--model", model, "--data", str(root / "latin1.json"), "--out", out], "is not UTF-8 text"),
        ([*train_base, "--risk-table", a_file], f"risk table {a_file!r} is not a pickled table"),
        (["train", "--model", model, "--sft", str(inputs["data"]), "--out", out], "is not a pickled table"),
        ([*train_base, "--selection", str(root / "not_a_selection.json")], "is not an expert selection"),
        ([*evaluate_base, "--selection", str(root / "a_list.json")], "is not an expert selection"),
        ([*evaluate_base, "--selection", str(root / "latin1.json")], "cannot be read as JSON"),
        ([*evaluate_base, "--judge", "json:__name__"], "'__name__' is not a function"),
        ([*evaluate_base, "--judge", ":always"], "--judge must look like 'module:function'"),
        ([*train_base, "--selection", str(root / "selection_64.json")], "the selection is for 2 layers x 64 experts"),
        ([*train_base, "--selection", str(root / "selection.json"), "--top-n", "3"],
         "--selection takes its experts from the file; --top-n choose them"),
        ([*train_base, "--batch-order", "analysis", "--batch-size", "4", "--selection", str(root / "selection.json")],
         "--batch-order shuffle"),
    ]  # fmt: skip


def test_each_mistake_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, message in cases(inputs, str(out)) + more_cases(inputs, str(out)) + file_cases(inputs, str(out)):
        before = sorted(p.name for p in inputs["root"].iterdir())
        code, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err, err
        last = err.splitlines()[-1]  # argparse's errors come after its usage lines
        assert last.startswith(f"moe-fastmask {argv[0]}: error"), (argv, err)
        assert message in last, (argv, err)
        assert not out.exists(), argv  # not even the directory
        assert sorted(p.name for p in inputs["root"].iterdir()) == before
        assert inputs["file"].read_text() == "not a directory\n"


def test_train_refuses_a_selection_that_masks_no_layer(inputs, tmp_path, capsys):
    unmasked = ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1), (1, 2)], masked_layers=[])
    selection = unmasked.save(tmp_path / "selection.json")
    out = tmp_path / "train"
    code, err = run(["train", "--model", str(inputs["model"]), "--sft", str(inputs["sft"]), "--out", str(out),
                     "--selection", str(selection), "--device", "cpu", "--max-steps", "1"], capsys)  # fmt: skip
    assert code == 2
    assert err.splitlines()[-1] == (
        f"moe-fastmask train: error: no layer is masked for unsafe samples: a masked layer needs top_k={K} selected "
        f"experts, selected per layer: layer 0 1, layer 1 1. Select more experts per layer (e.g. --per-layer {K}) or "
        f"--fill, or pass --allow-unmasked to train the selected experts without the mask"
    )
    assert not (out / "expert_selection.json").exists() and not (out / "training_config.json").exists()


# ------------------------------------------------------------------------------------------------------------
# the checks themselves
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["allenai/OLMoE-1B-7B-0125-Instruct", "a/b", "org_1/model.v2"])
def test_hub_ids(text):
    assert is_hub_id(text)


@pytest.mark.parametrize("text", ["model", "a/b/c", "./a/b", "~/a", "/abs/path", "a--b/c", "a/b..c", "a/-b", "a/ b",
                                  "a/" + "b" * 95, "a/b/"])  # fmt: skip
def test_not_hub_ids(text):
    assert not is_hub_id(text)


def test_model_source(inputs, tmp_path):
    assert check_model_source(inputs["model"]) == "local"
    assert check_model_source("allenai/OLMoE-1B-7B-0125-Instruct") == "hub"
    with pytest.raises(UsageError, match=r"^--base-model 'nope': no such local model directory, and not a hub id"):
        check_model_source("nope", "--base-model")
    with pytest.raises(UsageError, match="is empty"):
        check_model_source("  ")
    (tmp_path / "owner").mkdir()
    with pytest.raises(UsageError, match="no config.json"):  # an existing local path wins over the hub reading
        check_model_source(tmp_path / "owner")


def test_output_dir(inputs, tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(UsageError, match="is an existing file"):
        check_output_dir(inputs["file"])
    with pytest.raises(UsageError, match="--out .*: .*a_file.txt is a file"):
        check_output_dir(inputs["file"] / "x" / "y")
    check_paths(tmp_path, model=inputs["model"], base_model=None)
    with pytest.raises(UsageError, match="^--base-model"):
        check_paths(None, model=inputs["model"], base_model=str(tmp_path / "missing"))


def test_loading_errors_become_one_line(monkeypatch):
    import transformers

    def fail(*args, **kwargs):
        raise OSError("owner/name is not a local folder and is not a valid model identifier\nIf this is a private "
                      "repository, make sure to pass a token")  # fmt: skip

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(UsageError) as info:
        analyze.load_model_and_tokenizer("owner/name", "cpu", "float32")
    assert str(info.value) == (
        "cannot load model 'owner/name': owner/name is not a local folder and is not a valid model identifier"
    )
    assert one_line(ValueError("\n\n  first  \nsecond")) == "first" and one_line(OSError()) == "OSError"


def test_hub_id_that_does_not_load_writes_nothing(inputs, tmp_path, capsys, monkeypatch):
    import transformers

    def not_on_hub(*args, **kwargs):
        raise OSError("owner/no-such-model is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'\nIf this is a private repository, ...")  # fmt: skip

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_on_hub)
    out = tmp_path / "out"
    code, err = run(["analyze", "--model", "owner/no-such-model", "--data", str(inputs["data"]), "--out", str(out)],
                    capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert err == ("moe-fastmask analyze: error: --model 'owner/no-such-model': cannot load it from the hub: "
                   "owner/no-such-model is not a local folder and is not a valid model identifier listed on "
                   "'https://huggingface.co/models'")  # fmt: skip
    assert not out.exists()


def test_model_that_fails_after_the_config_resolved_is_cleaned_up(inputs, tmp_path, capsys, monkeypatch):
    import transformers

    def no_tokenizer(*args, **kwargs):
        raise OSError("owner/model does not appear to have a file named tokenizer.json")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    kept = tmp_path / "existing"  # an --out that existed keeps what it held; the run's own files go
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", kept):
        code, err = run(["analyze", "--model", "owner/model", "--data", str(inputs["data"]), "--out", str(out),
                         "--no-progress", "--quiet"], capsys)  # fmt: skip
        assert code == 2 and err.endswith("cannot load model 'owner/model': owner/model does not appear to have a "
                                          "file named tokenizer.json"), err
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_missing_package_is_one_line_and_internal_errors_keep_the_traceback(monkeypatch, capsys, inputs, tmp_path):
    from moe_fastmask.pipeline import evaluate

    def needs_vllm(args):
        raise ModuleNotFoundError("No module named 'vllm'", name="vllm")

    monkeypatch.setattr(evaluate, "run_cli", needs_vllm)
    argv = ["evaluate", "--model", str(inputs["model"]), "--data", str(inputs["data"]), "--out", str(tmp_path)]
    code, err = run(argv, capsys)
    assert (code, err) == (2, "moe-fastmask evaluate: error: the package 'vllm' is not installed (pip install vllm)")

    def bug(args):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(evaluate, "run_cli", bug)
    with pytest.raises(RuntimeError, match="an internal error"):  # not turned into a usage message
        main(argv)

    def broken_import(args):
        raise ModuleNotFoundError("No module named 'moe_fastmask.nothing'", name="moe_fastmask.nothing")

    monkeypatch.setattr(evaluate, "run_cli", broken_import)
    with pytest.raises(ModuleNotFoundError):  # the package's own modules: a bug, with its traceback
        main(argv)


def test_train_shows_a_step_bar_and_explains_its_routing_metrics_once(inputs, tmp_path, capsys):
    from moe_fastmask.pipeline.train.run import ROUTING_METRICS

    masking = ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1), (0, 2), (1, 1), (1, 2)],
                              masked_layers=[0, 1])  # fmt: skip
    selection = masking.save(tmp_path / "selection.json")
    argv = ["train", "--model", str(inputs["model"]), "--sft", str(inputs["sft"]), "--out", str(tmp_path / "train"),
            "--selection", str(selection), "--device", "cpu", "--max-steps", "2", "--batch-size", "4",
            "--logging-steps", "1", "--save-steps", "100"]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    assert err.count(ROUTING_METRICS) == 1 and captured.out.count(ROUTING_METRICS) == 0
    assert "routing/unsafe_on_selected" in captured.out  # the logged shares it explains
    assert re.search(r"\b2/2 \[", err)  # the Trainer's tqdm bar over the 2 steps
    code = main([*argv[:5], "--out", str(tmp_path / "quiet"), *argv[7:], "--no-progress"])
    assert code == 0 and not re.search(r"\b2/2 \[", capsys.readouterr().err)


def test_a_model_without_moe_layers_is_one_line_and_leaves_nothing(inputs, tmp_path, capsys):
    """analyze loads the model after writing its run config and split: a model it cannot use (here a Llama, no MoE
    layers) removes them again, so the same --out takes another model's run afterwards."""
    import shutil

    import transformers

    dense = tmp_path / "llama"
    config = transformers.AutoConfig.from_pretrained(inputs["model"])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    llama.save_pretrained(dense)
    for name in Path(inputs["model"]).iterdir():
        if "token" in name.name or name.suffix == ".jinja":
            shutil.copy(name, dense / name.name)
    out = tmp_path / "out"
    code, err = run(["analyze", "--model", str(dense), "--data", str(inputs["data"]), "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("moe-fastmask analyze: error: moe_fastmask has no adapter for model_type 'llama'")
    assert not out.exists()


def test_resume_refuses_selection_flags_the_saved_run_did_not_use(tmp_path):
    from moe_fastmask.pipeline.train.arguments import MaskedFinetuneArguments
    from moe_fastmask.pipeline.train.run import _check_resumed_selection

    saved = {"arguments": {"top_n": None, "per_layer": 2, "threshold": None, "fill": False, "score_column": "risk_diff"}}
    (tmp_path / "training_config.json").write_text(json.dumps(saved))
    args = dict(model="m", sft="s", out=str(tmp_path), resume="latest")
    _check_resumed_selection(MaskedFinetuneArguments(**args, per_layer=2), tmp_path)  # the same choice: resumes
    with pytest.raises(UsageError, match=r"--top-n 3 \(the run's: None\).*--per-layer None \(the run's: 2\)"):
        _check_resumed_selection(MaskedFinetuneArguments(**args, top_n=3), tmp_path)
    with pytest.raises(UsageError, match="--fill True"):
        _check_resumed_selection(MaskedFinetuneArguments(**args, per_layer=2, fill=True), tmp_path)


def test_written_files_follow_the_umask(tmp_path):
    import os

    from moe_fastmask.pipeline import artifacts

    previous = os.umask(0o022)
    try:
        for write in (lambda p: artifacts.atomic_write_text(p, "x"), lambda p: artifacts.atomic_pickle(p, [1])):
            path = write(tmp_path / f"f{len(list(tmp_path.iterdir()))}")
            assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_vllm_refuses_head_sizes_its_cpu_attention_lacks(inputs):
    pytest.importorskip("vllm")
    from moe_fastmask.pipeline.generation.vllm import _check_cpu_head_size

    with pytest.raises(UsageError, match="vLLM's CPU attention takes head sizes .* has 16; use --engine hf"):
        _check_cpu_head_size(inputs["model"])  # the tiny model's heads: 16 wide
