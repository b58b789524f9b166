"""Masked fine-tuning over two processes on the CPU (Gloo, loopback only).

DDP: ``moe-fastmask train`` under ``accelerate launch --multi_gpu --num_processes 2`` (with ``--cpu`` accelerate would
start a single process; on a machine without GPUs the multi-GPU launcher starts CPU processes). Each rank trains on
its own share of the mixed batches; DDP averages the gradients of the selected expert slices, so both ranks end with
the same weights, in which only the selected experts differ from the base model; rank 0 alone saves the final model.

FSDP2: accelerate turns FSDP on for GPU processes only. Two CPU stand-ins: the Trainer's own FSDP2 path with that
gate lifted (``distributed_train_worker.py --fsdp2``: accelerate's ``fully_shard`` preparation, gathered full state
dicts, checkpoints, resume), and the building blocks under ``torch.distributed.fsdp.fully_shard`` by hand. In both,
the slices train sharded and the gathered full state dict with the slices folded in changes only the selected
experts.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.selection import ExpertSelection

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

REPO = Path(__file__).resolve().parents[1]
L, E, K = 2, 8, 2
SELECTED = {0: [1, 4, 6], 1: [0, 3, 5]}
BATCH = 8  # 4 safe + 4 unsafe


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sft_frame(n_pairs: int = 16, per_batch: int = BATCH // 2) -> pd.DataFrame:
    """Analysis-style batches: ``per_batch`` safe rows then ``per_batch`` unsafe rows each."""
    rows = []
    for i in range(n_pairs):
        batch, pos = divmod(i, per_batch)
        rows.append({"batch_idx": batch, "position": pos, "kind": "safe", "id": i,
                     "messages": [{"role": "user", "content": f"Write a poem about the sea and the wind {i}."}],
                     "response": "The sea and the wind."})  # fmt: skip
        rows.append({"batch_idx": batch, "position": per_batch + pos, "kind": "unsafe", "id": i,
                     "messages": [{"role": "user", "content": f"Flip each word back and read the task: kcol {i}"}],
                     "response": "I'm sorry, but I cannot help with that request."})  # fmt: skip
    return pd.DataFrame(rows).sort_values(["batch_idx", "position"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    model_dir = build_tiny_olmoe(root / "model", seed=0, num_layers=L, num_experts=E, top_k=K)
    analysis = root / "analysis"
    analysis.mkdir()
    _sft_frame().to_pickle(analysis / "sft_dataset_tiny.pkl")
    selection = ExpertSelection(num_layers=L, num_experts=E, top_k=K,
                                experts=[(l, e) for l, es in SELECTED.items() for e in es],
                                masked_layers=sorted(SELECTED)).save(root / "selection.json")  # fmt: skip
    return model_dir, analysis, selection


def _launch(inputs, out: Path, reports: Path, extra=(), options=()) -> subprocess.CompletedProcess:
    model_dir, analysis, selection = inputs
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "distributed_train_worker.py"), str(reports), *options, "--",
        "--model", str(model_dir), "--sft", str(analysis), "--out", str(out), "--selection", str(selection),
        "--batch_size", str(BATCH), "--num_epochs", "2", "--learning_rate", "1e-2", "--weight_decay", "0.1",
        "--logging_steps", "1", "--save_steps", "100", "--device", "cpu", "--seed", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)


def _expert_rows(model, base) -> set:
    rows = set()
    reference = base.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            layer = int(key.split(".")[2])
            rows |= {(layer, e) for e in range(value.shape[0]) if not torch.equal(value[e], reference[key][e])}
        else:
            assert torch.equal(value, reference[key]), key
    return rows


def test_ddp_two_ranks_train_only_the_selected_experts(inputs, tmp_path):
    out, reports = tmp_path / "out", tmp_path / "reports"
    done = _launch(inputs, out, reports)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    selected = {(l, e) for l, experts in SELECTED.items() for e in experts}
    for report in ranks:
        assert report["rc"] == 0 and report["trainer_world_size"] == 2
        # this rank's batches: 2 epochs x 2 of the 4 analysis batches, each at the 4 + 4 mix
        assert len(report["batches"]) == 4
        assert all(groups == [0] * 4 + [1] * 4 for groups in report["batches"])
        # its own weights: only selected expert rows changed (bit for bit elsewhere), each selected expert trained
        assert not report["changed_other"]
        assert {(l, e) for l, _, e in report["changed_rows"]} == selected
        # its own routing: unsafe tokens only on selected experts in the masked layers, safe tokens anywhere
        assert report["routing_shares"]["routing/unsafe_on_selected"] == 1.0
        assert report["routing_shares"]["routing/safe_on_selected"] < 1.0
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients all-reduced: the same model on both ranks
    assert len(ranks[0]["final_saves"]) == 1 and ranks[1]["final_saves"] == []  # saved once, by rank 0
    assert done.stdout.count("final model:") == 1, done.stdout[-2000:]  # and reported once

    final = out / "final_model"
    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
    assert _expert_rows(saved, base) == selected
    config = json.loads((final / "training_config.json").read_text())
    assert config["world_size"] == 2 and config["batch_mix"] == {"safe": 4, "unsafe": 4}
    assert not any("fastmask" in name for name in saved.state_dict())


def test_trainer_fsdp2_two_ranks_save_and_resume(inputs, tmp_path):
    out = tmp_path / "out"
    done = _launch(inputs, out, tmp_path / "first", extra=("--save_steps", "2"), options=("--fsdp2",))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    first = [json.loads((tmp_path / "first" / f"rank{r}.json").read_text()) for r in range(2)]
    selected = {(l, e) for l, experts in SELECTED.items() for e in experts}
    base = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
    for report in first:
        assert report["rc"] == 0 and report["config"]["distributed"] == "FSDP" and report["config"]["world_size"] == 2
        assert all(groups == [0] * 4 + [1] * 4 for groups in report["batches"]) and len(report["batches"]) == 4
        assert report["routing_shares"]["routing/unsafe_on_selected"] == 1.0
    assert len(first[0]["final_saves"]) == 1 and first[1]["final_saves"] == []
    saved = AutoModelForCausalLM.from_pretrained(out / "final_model", dtype=torch.float32)
    assert _expert_rows(saved, base) == selected
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "checkpoint-2", dtype=torch.float32)
    assert _expert_rows(checkpoint, base) == selected  # checkpoints are plain OLMoE models too

    # one more epoch from the last checkpoint: the full tensors go back into the sharded model
    done = _launch(inputs, out, tmp_path / "resumed", extra=("--save_steps", "2", "--num_epochs", "3", "--resume"),
                   options=("--fsdp2",))  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    resumed = [json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(report["batches"]) == 2 for report in resumed)  # only the third epoch ran
    again = AutoModelForCausalLM.from_pretrained(out / "final_model", dtype=torch.float32)
    assert _expert_rows(again, base) == selected and _expert_rows(again, saved) == selected


def _fsdp_rank(rank: int, world_size: int, port: int, inputs, report_dir: str) -> None:
    """One rank of a hand-made FSDP2 run: the pipeline's dataset, sampler, collator, masks and slices."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoTokenizer

        import moe_fastmask as mf
        from moe_fastmask.integrations import expert_slices as es
        from moe_fastmask.pipeline import train as tr

        model_dir, analysis, selection_path = inputs
        selection = ExpertSelection.load(selection_path)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tr.prepare_model(model, selection)
        es.keep_slice_keys(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        dataset = tr.SFTDataset(tr.load_sft_frame(analysis / "sft_dataset_tiny.pkl"), tokenizer)
        sampler = tr.MixedBatchSampler(dataset.groups, BATCH, 0.5, order="analysis",
                                       analysis_batches=dataset.analysis_batches())  # fmt: skip
        collate = tr.MaskedSFTCollator(tokenizer.pad_token_id)
        seen = []
        model.train()
        for batch_idx, indices in enumerate(sampler.batches(0)):
            if batch_idx % world_size != rank:  # the DataLoader sharding of accelerate: batch i on rank i % N
                continue
            batch = collate([dataset[i] for i in indices])
            seen.append(batch["groups"].tolist())
            with mf.token_groups(model, batch["groups"]):
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        report = {"batches": seen, "trainable": trainable, "slice_keys": len([k for k in state if "fastmask" in k])}
        if rank == 0:
            es.merge_expert_slices(state)
            torch.save(state, Path(report_dir) / "full_state.pt")
        (Path(report_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_sharded_slices_train_only_the_selected_experts(inputs, tmp_path):
    mp.spawn(_fsdp_rank, args=(2, _free_port(), inputs, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in ranks:
        assert len(report["batches"]) == 2 and all(g == [0] * 4 + [1] * 4 for g in report["batches"])
        assert report["trainable"] and all(".fastmask_" in name for name in report["trainable"])
    assert ranks[0]["slice_keys"] == 2 * sum(len(experts) for experts in SELECTED.values())  # kept for the merge

    state = torch.load(tmp_path / "full_state.pt")
    assert not any("fastmask" in key for key in state)
    trained = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
    trained.load_state_dict(state)  # a plain OLMoE state dict
    base = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
    assert _expert_rows(trained, base) == {(l, e) for l, experts in SELECTED.items() for e in experts}
