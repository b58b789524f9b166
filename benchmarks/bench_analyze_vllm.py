"""``analyze`` throughput through vLLM (``--engine vllm``) against transformers (``--engine hf``), in one run.

Both analyses run on the same tiny random float32 OLMoE (head_dim 64, as vLLM's CPU attention needs) and the same
synthetic records, greedy, on the CPU unless a GPU build of vLLM is installed. Reported: the vLLM engine start, and
per engine the ``run_analysis`` time and prompts/s (engine start excluded); the script exits non-zero if the two
``risk_diff`` tables differ.

    python benchmarks/bench_analyze_vllm.py --out /tmp/bench_vllm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and report directory (bench_analyze_vllm.json)")
    parser.add_argument("--records", type=int, default=80, help="synthetic records (80%% go to the analysis)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import pandas as pd

    from moe_fastmask.pipeline.generation import vllm as vb

    try:
        vb.import_vllm()
    except (ImportError, ValueError) as error:  # not installed, or a version the backend does not support
        parser.error(str(error))

    from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
    from moe_fastmask.pipeline.demo import build_demo_dataset, build_tiny_olmoe

    out = Path(args.out)
    model = build_tiny_olmoe(out / "model", hidden_size=256, intermediate_size=64, seed=3)
    data = build_demo_dataset(out / "data.json", num_records=args.records, seed=0)
    common = dict(model=str(model), data=str(data), batch_size=args.batch_size, max_new_tokens=args.new_tokens,
                  device="cpu", dtype="float32", progress=False, verbose=False, overwrite=True)
    start = time.perf_counter()
    vb.load_engine(model, dtype="float32")  # analyze reuses it
    engine_start = time.perf_counter() - start
    report = {"engine_start_s": engine_start, "new_tokens": args.new_tokens, "batch_size": args.batch_size}
    tables = {}
    for engine in ("hf", "vllm"):
        start = time.perf_counter()
        result = run_analysis(AnalysisConfig(out=str(out / engine), engine=engine, **common))
        seconds = time.perf_counter() - start
        prompts = sum(len(b["batch_outputs"]) for b in result.batch_data_list)
        report[engine] = {"prompts": prompts, "seconds": seconds, "prompts_per_s": prompts / seconds}
        tables[engine] = result.risk_diff
        print(f"{engine:5s} {prompts} prompts in {seconds:.2f} s: {prompts / seconds:.2f} prompts/s", flush=True)
    print(f"vLLM engine start (not counted above): {engine_start:.1f} s")
    try:
        pd.testing.assert_frame_equal(tables["hf"], tables["vllm"])
        report["risk_diff_equal"] = True
    except AssertionError as error:
        report["risk_diff_equal"] = False
        print(f"risk_diff tables differ: {error}", file=sys.stderr)
    print(f"speedup vllm/hf: {report['vllm']['prompts_per_s'] / report['hf']['prompts_per_s']:.2f}x; "
          f"risk_diff equal: {report['risk_diff_equal']}")
    (out / "bench_analyze_vllm.json").write_text(json.dumps(report, indent=2))
    return 0 if report["risk_diff_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
