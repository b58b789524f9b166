"""``moe-fastmask analyze`` over two processes (Gloo on the CPU, loopback only): same artifacts as one process.

Both multi-process launches the issue names are used: ``torchrun --nproc-per-node 2`` on the CLI, and
``torch.multiprocessing.spawn`` with the launcher's environment variables for the per-rank crash and resume.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from artifact_checks import assert_same
import torch
import torch.multiprocessing as mp

from conftest import load_benchmark
from moe_fastmask.pipeline import analyze, distributed
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
from moe_fastmask.pipeline.demo import build_demo

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

NUM_BATCHES = 4
SMALL = dict(batch_size=8, max_new_tokens=4, num_batches=NUM_BATCHES, progress=False, verbose=False)
PICKLES = ("batch_outputs", "risk_diff", "sft_dataset")
TEXTS = (("risk_diff", ".csv"), ("split", ".json"), ("analysis_config", ".json"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_env() -> dict:
    env = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # Gloo's own connections stay on the loopback device too
    return env


def _config(inputs, out) -> AnalysisConfig:
    model, data = inputs
    return AnalysisConfig(model=str(model), data=str(data), out=str(out), device="cpu", **SMALL)


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def single_run(demo_inputs, tmp_path_factory):
    """The one-process run, single-threaded like the launched ranks (torchrun sets OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_analysis(_config(demo_inputs, out))
    finally:
        torch.set_num_threads(threads)
    return out


def _artifact(out: Path, stem: str, suffix: str = ".pkl") -> Path:
    (path,) = Path(out).glob(f"{stem}_*{suffix}")
    return path


def _assert_same_artifacts(reference: Path, out: Path) -> None:
    for stem in PICKLES:
        assert_same(pd.read_pickle(_artifact(reference, stem)), pd.read_pickle(_artifact(out, stem)), stem)
    for stem, suffix in TEXTS:
        assert _artifact(reference, stem, suffix).read_text() == _artifact(out, stem, suffix).read_text(), stem
    for stem in ("risk_diff_heatmap", "top_experts"):
        assert _artifact(out, stem, ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    batches = pd.read_pickle(_artifact(out, "batch_outputs"))["batch_data_list"]
    assert [b["batch_idx"] for b in batches] == list(range(NUM_BATCHES))
    assert not list(Path(out).glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------------------
# one process: sharding and the identity collectives
# ------------------------------------------------------------------------------------------------------------


def test_shard_is_round_robin_and_covers_every_batch():
    for n, world in ((0, 1), (4, 1), (4, 2), (7, 3), (2, 4)):
        shards = [distributed.shard(n, rank, world) for rank in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        for rank, indices in enumerate(shards):
            assert all(distributed.owner(i, world) == rank for i in indices)
    assert distributed.shard(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(4, 2, 2)


def test_single_process_collectives_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = distributed.setup("cpu")
    assert (state.rank, state.world_size, state.device, state.enabled, state.is_main) == (0, 1, "cpu", False, True)
    assert not distributed.is_initialized()
    assert distributed.gather_in_order({1: "b", 0: "a"}, 2) == ["a", "b"]
    assert distributed.broadcast_object({"x": 1}) == {"x": 1} and distributed.any_rank(True)
    counts = torch.arange(4)
    assert distributed.all_reduce_sum(counts) is counts and counts.tolist() == [0, 1, 2, 3]
    with distributed.main_process_first():
        pass
    distributed.barrier()


def test_teardown_leaves_a_group_it_did_not_create_unless_told():
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        distributed.teardown()  # accelerate's group, say: not ours
        assert torch.distributed.is_initialized()
        distributed.teardown(owned_only=False)  # a command's entry point owns its process
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------------------------


def _gloo_threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [name for name in names if name.startswith(("pt_gloo", "gloo"))]


def _teardown_rank(rank: int, world_size: int, port: int, log_dir: str) -> None:
    os.environ.update(_loopback_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_PORT=str(port))  # fmt: skip
    distributed.setup("cpu")
    during = _gloo_threads()
    # what loading a model does: transformers imports FSDP, whose signatures default to the world group
    import transformers.modeling_utils  # noqa: F401

    distributed.any_rank(False)
    distributed.teardown()
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({"during": during, "after": _gloo_threads()}))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_teardown_releases_the_group_after_transformers_is_imported(tmp_path):
    """No Gloo thread survives teardown: one that did would outlive the interpreter and abort the rank at exit."""
    mp.spawn(_teardown_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert threads["during"], "the group's worker threads should exist before teardown"
        assert threads["after"] == [], f"rank {rank}: {threads['after']} still running after teardown"


def test_torchrun_cli_two_ranks_equal_one_process(demo_inputs, single_run, tmp_path):
    model, data = demo_inputs
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "moe_fastmask.cli", "analyze", "--model", str(model),
        "--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "8",
        "--num-batches", str(NUM_BATCHES), "--max-new-tokens", "4", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, **_loopback_env()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes, batch i on rank i % 2: rank 0 has 2" in done.stdout
    assert "2 ranks: 4 batches counted" in done.stdout
    assert done.stdout.count("top 10 experts by risk_diff") == 1  # rank 0 alone reports
    _assert_same_artifacts(single_run, out)


def _rank_main(rank: int, world_size: int, port: int, inputs, out: str, crash_on, log_dir: str) -> None:
    """One rank, started by ``torch.multiprocessing.spawn`` with the environment a launcher would set."""
    os.environ.update(_loopback_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    real_generate = analyze.generate_batch
    calls = []

    def generate(model, tokenizer, batch, *args, **kwargs):
        calls.append(batch.batch_idx)
        if batch.batch_idx == crash_on:
            raise RuntimeError("simulated crash")
        return real_generate(model, tokenizer, batch, *args, **kwargs)

    analyze.generate_batch = generate
    try:
        run_analysis(_config(inputs, out))
        outcome = "ok"
    except Exception as error:  # noqa: BLE001 - reported to the test
        outcome = f"{type(error).__name__}: {error}"
    finally:
        analyze.generate_batch = real_generate
        distributed.teardown()
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({"calls": calls, "outcome": outcome}))


def _spawn(inputs, out: Path, crash_on, log_dir: Path) -> list[dict]:
    log_dir.mkdir(parents=True, exist_ok=True)
    args = (2, _free_port(), inputs, str(out), crash_on, str(log_dir))
    mp.spawn(_rank_main, args=args, nprocs=2, join=True)
    return [json.loads((log_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_rank_crash_then_resume_gives_identical_artifacts(demo_inputs, single_run, tmp_path):
    out = tmp_path / "out"
    # rank 1 owns batches 1 and 3: it saves batch 1, then crashes on batch 3; rank 0 finishes 0 and 2
    crashed = _spawn(demo_inputs, out, 3, tmp_path / "crash")
    assert crashed[0] == {"calls": [0, 2], "outcome": crashed[0]["outcome"]}
    assert crashed[0]["outcome"].startswith("AnalysisError: another rank failed")
    assert crashed[1] == {"calls": [1, 3], "outcome": "RuntimeError: simulated crash"}
    batch_dir = out / "batches_demo--model"
    assert sorted(p.name for p in batch_dir.iterdir()) == [f"batch_0000{i}.pkl" for i in (0, 1, 2)]
    assert not list(out.glob("risk_diff_*")) and not list(out.glob("batch_outputs_*"))

    resumed = _spawn(demo_inputs, out, None, tmp_path / "resume")
    assert resumed == [{"calls": [], "outcome": "ok"}, {"calls": [3], "outcome": "ok"}]  # each rank: its own gap
    _assert_same_artifacts(single_run, out)

    # the per-batch files are indexed by batch, not by rank: one process resumes the same directory as well
    calls = []
    real_generate = analyze.generate_batch

    def counting(model, tokenizer, batch, *args, **kwargs):
        calls.append(batch.batch_idx)
        return real_generate(model, tokenizer, batch, *args, **kwargs)

    (batch_dir / "batch_00002.pkl").unlink()
    analyze.generate_batch = counting
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        run_analysis(_config(demo_inputs, out))
    finally:
        torch.set_num_threads(threads)
        analyze.generate_batch = real_generate
    assert calls == [2]
    _assert_same_artifacts(single_run, out)


# ------------------------------------------------------------------------------------------------------------
# benchmark smoke test: the multi-GPU benchmark's CPU/Gloo mode, 1 and 2 processes
# ------------------------------------------------------------------------------------------------------------


def test_bench_analyze_multi_gpu_tiny(tmp_path, capsys):
    bench = load_benchmark("bench_analyze_multi_gpu")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "bench_analyze_multi_gpu.json").read_text())["runs"]
    assert [run["world_size"] for run in runs] == [1, 2]
    assert all(run["artifacts_match_n1"] and run["prompts_per_s"] > 0 for run in runs)
    assert runs[1]["backend"] == "gloo" and runs[1]["batches_per_rank"] == 2
    assert runs[1]["efficiency"] == pytest.approx(runs[1]["speedup"] / 2)
    assert "efficiency" in capsys.readouterr().out
