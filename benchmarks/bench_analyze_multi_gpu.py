"""Data-parallel analysis: ``moe-fastmask analyze`` over N GPUs vs 1 GPU — prompts per second and scaling efficiency.

Each rank builds the same random-weight OLMoE-1B-7B architecture in bf16 (``bench_analyze.build_model``: 16 layers x
64 experts, top-8, hidden 2048, intermediate 1024) on the GPU of its ``LOCAL_RANK``; the prompts are
``bench_analyze.build_records``' exact-length safe/jailbreak chats; greedy decoding with exactly ``--new-tokens`` new
tokens (EOS suppressed), so every batch does the same work. Timed: :func:`run_analysis` end to end (generation of
each rank's share, gathering, the count all-reduce, the artifacts written by rank 0), from a barrier after warm-up to
its return. ``prompts_per_s = 2 * pairs / seconds``; ``speedup = prompts_per_s(N) / prompts_per_s(1)``;
``efficiency = speedup / N``.

Two ways to run it:

* driver (launches ``torchrun`` once per GPU count, then writes the table)::

      python benchmarks/bench_analyze_multi_gpu.py --out /tmp/bench_mg --gpus 1 2 4 8

* one GPU count at a time, under the launcher (the N=1 report in ``--out`` is the baseline of the others)::

      torchrun --nproc-per-node 1 benchmarks/bench_analyze_multi_gpu.py --out /tmp/bench_mg
      torchrun --nproc-per-node 8 benchmarks/bench_analyze_multi_gpu.py --out /tmp/bench_mg

``--tiny``: the tiny random OLMoE of the demo in float32 on the CPU, Gloo over loopback, 1 and 2 processes — a smoke
test; there the artifacts of every N must equal those of N=1, and the script exits non-zero if they do not.

Reports: ``OUT/bench_analyze_multi_gpu_n{N}.json`` per GPU count, ``OUT/bench_analyze_multi_gpu.json`` (driver).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_analyze  # noqa: E402  (the single-GPU benchmark: model builder, prompts, warm-up)

from moe_fastmask.pipeline import artifacts, distributed  # noqa: E402
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis  # noqa: E402
from moe_fastmask.pipeline.demo import build_tiny_olmoe  # noqa: E402

REPORT = "bench_analyze_multi_gpu"
COMPARED = ("batch_outputs", "risk_diff", "sft_dataset")


def _report_path(out: Path, world_size: int) -> Path:
    return out / f"{REPORT}_n{world_size}.json"


# ------------------------------------------------------------------------------------------------------------
# Worker: one process of a torchrun launch
# ------------------------------------------------------------------------------------------------------------


def run_worker(args) -> dict | None:
    """Time one analysis over the launched processes; rank 0 writes and returns the report (others: None)."""
    state = distributed.setup(args.device)
    out = Path(args.out)
    args.device = state.device
    if args.tiny:  # saved once (save_pretrained writes on rank 0 only), reused by later launches, loaded by all
        model_dir = out / "work" / "tiny_model"
        with distributed.main_process_first():
            if state.is_main and not (model_dir / "config.json").exists():
                build_tiny_olmoe(model_dir, seed=0)
        model, tokenizer, name = _load_tiny(model_dir, state.device)
    else:  # random weights, seeded: the same model on every rank
        model, tokenizer, name = bench_analyze.build_model(args, out / "work")
    data_path = out / "bench_data.json"
    with distributed.main_process_first():
        if distributed.is_main_process():
            artifacts.atomic_write_json(data_path, bench_analyze.build_records(tokenizer, args.pairs,
                                                                              args.prompt_tokens))  # fmt: skip
    config = AnalysisConfig(
        model=name, data=str(data_path), out=str(out / f"analyze_n{state.world_size}"), batch_size=args.batch_size,
        safe_ratio=0.5, seed=0, test_fraction=0.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        device=state.device, overwrite=True, progress=False, verbose=False,
    )  # fmt: skip
    bench_analyze._warm_up(model, tokenizer, state.device, args.batch_size, args.prompt_tokens)
    distributed.barrier()
    start = time.perf_counter()
    result = run_analysis(config, model=model, tokenizer=tokenizer)
    bench_analyze._sync(state.device)
    seconds = max(distributed.all_gather_object(time.perf_counter() - start))
    if not state.is_main:
        return None
    on_cuda = str(state.device).startswith("cuda")
    report = {
        "world_size": state.world_size, "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "backend": str(torch.distributed.get_backend()) if distributed.is_initialized() else "none",
        "model": name, "dtype": str(model.dtype), "pairs": args.pairs, "batch_size": args.batch_size,
        "num_batches": len(result.batch_data_list),
        "batches_per_rank": -(-len(result.batch_data_list) // state.world_size),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "analyze_s": seconds, "prompts_per_s": 2 * args.pairs / seconds, "artifacts": config.out,
    }  # fmt: skip
    _add_scaling(report, out)
    artifacts.atomic_write_json(_report_path(out, state.world_size), report)
    return report


def _load_tiny(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_fastmask.pipeline.common import prepare_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir)), "tiny-olmoe"


def _add_scaling(report: dict, out: Path) -> None:
    base = _report_path(out, 1)
    if report["world_size"] == 1:
        report.update(speedup=1.0, efficiency=1.0)
    elif base.exists():
        baseline = json.loads(base.read_text())
        same = all(baseline[k] == report[k] for k in ("model", "dtype", "pairs", "batch_size", "prompt_tokens",
                                                      "new_tokens"))  # fmt: skip
        if same:
            speedup = report["prompts_per_s"] / baseline["prompts_per_s"]
            report.update(speedup=speedup, efficiency=speedup / report["world_size"])


# ------------------------------------------------------------------------------------------------------------
# Driver: one torchrun launch per GPU count
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args, world_size: int) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()),
        "--out", args.out, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
    ] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = dict(os.environ)
    if args.tiny:
        env.update(OMP_NUM_THREADS="1")
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    subprocess.run(command, env=env, check=True)
    return json.loads(_report_path(Path(args.out), world_size).read_text())


def _same_artifacts(a: Path, b: Path) -> bool:
    import numpy as np
    import pandas as pd

    def load(out: Path, stem: str):
        (path,) = out.glob(f"{stem}_*.pkl")
        return pd.read_pickle(path)

    def same(x, y) -> bool:
        if isinstance(x, pd.DataFrame):
            return isinstance(y, pd.DataFrame) and x.equals(y) and list(x.columns) == list(y.columns)
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and list(x) == list(y) and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        return type(x) is type(y) and x == y

    csv = [sorted(out.glob("risk_diff_*.csv"))[0].read_text() for out in (a, b)]
    return csv[0] == csv[1] and all(same(load(a, stem), load(b, stem)) for stem in COMPARED)


def run_driver(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = sorted(set(args.gpus or ([1, 2] if args.tiny else [1, max(torch.cuda.device_count(), 1)])))
    if 1 not in counts:
        counts.insert(0, 1)
    reports = [_launch(args, n) for n in counts]
    ok = True
    for report in reports:
        if args.tiny:
            report["artifacts_match_n1"] = _same_artifacts(Path(reports[0]["artifacts"]), Path(report["artifacts"]))
            ok &= report["artifacts_match_n1"]
    artifacts.atomic_write_json(out / f"{REPORT}.json", {"runs": reports})
    first = reports[0]
    print(f"device: {first['device']}  model: {first['model']} ({first['dtype']})  {first['pairs']} pairs in "
          f"{first['num_batches']} batches of {first['batch_size']}, {first['prompt_tokens']}-token prompts, "
          f"{first['new_tokens']} new tokens")  # fmt: skip
    print(f"{'N':>3} {'seconds':>9} {'prompts/s':>10} {'speedup':>8} {'efficiency':>10}")
    for r in reports:
        speedup, efficiency = r.get("speedup", float("nan")), r.get("efficiency", float("nan"))
        match = f"   artifacts = N=1: {r['artifacts_match_n1']}" if args.tiny else ""
        print(f"{r['world_size']:>3} {r['analyze_s']:>9.2f} {r['prompts_per_s']:>10.2f} {speedup:>8.2f} "
              f"{efficiency:>10.2f}{match}")  # fmt: skip
    print(f"report: {out / f'{REPORT}.json'}")
    if not ok:
        print("error: the artifacts of a multi-process run differ from those of one process", file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and report directory")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU with Gloo (smoke test)")
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="driver: process counts to launch (default: 1 and every visible GPU; --tiny: 1 2)")
    parser.add_argument("--pairs", type=int, default=None, help="default: 256 (--tiny: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 (--tiny: 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 128 (--tiny: 40)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (--tiny: 4)")
    parser.add_argument("--device", default=None, help="default: the GPU of LOCAL_RANK (--tiny: cpu)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 (--tiny: float32)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available() and not str(args.device or "").startswith("cpu"):
        parser.error("this benchmark needs CUDA devices (--tiny runs a CPU check of the script)")
    return bench_analyze.fill_size_defaults(
        args, tiny=(8, 4, 40, 4, "cpu", "float32"), full=(256, 16, 128, 64, None, "bfloat16")
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun / accelerate launch: one worker
        try:
            report = run_worker(args)
        finally:
            distributed.teardown()
        if report is not None:
            print(json.dumps(report, indent=2))
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
