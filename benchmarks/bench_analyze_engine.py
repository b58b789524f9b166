"""``analyze`` end to end through the static-cache CUDA-graph engine (``--engine graph``, packed method batches)
against the one-prompt-at-a-time method, and the route kernel's cost at many groups.

Scenarios, in one run on the same random-weight OLMoE-1B-7B (bf16, ``bench_analyze.full_size_config``):

1. ``analyze`` (:func:`run_analysis`, every artifact written) with ``engine="graph"`` on ``--pairs`` pairs of
   ``--prompt-tokens``-token prompts, exactly ``--new-tokens`` new tokens (EOS suppressed with ``min_new_tokens``, so
   all methods do equal work), method batches of 8 safe + 8 unsafe packed into GPU batches of ``--gpu-batch-size``
   (default: from free memory), per-token experts kept (analyze's default: the decode step writes them to device
   buffers, inside the graph) — four runs: analyze's defaults (``engine_compile="auto"``: compiled only when the
   run decodes enough to repay the compile, which 2,048 pairs do not) first in the process, then again (warm), then
   compiled (``"on"``; the first compiled run pays the compile) and compiled again in the same process (the compiled
   step reused: what every later run of a long analysis costs); each with where its time went
   (:attr:`AnalysisResult.timings`: prefill, decode, compile + capture, the host part in the background and the wait
   for it, rendering + tokenization, setup, final artifacts); the one-prompt-at-a-time method
   (``bench_analyze.reference_method``: ``generate`` per prompt, router logits dumped to disk at every step) on the
   first ``--reference-pairs`` pairs, and ``analyze`` with the ``hf`` engine, one method batch per request (the
   previous default), on ``--hf-pairs`` pairs;
2. the same at ``--long-prompt-tokens``-token prompts on ``--long-pairs`` pairs (analyze's defaults; with
   ``--long-compile`` compiled too);
3. the route kernel (Triton, bf16 logits, E=64, top-8, counts and a keep mask) at G = 2, 16, 64, 128 groups for a
   decode batch and a prefill chunk of tokens.

The engine's per-batch counts are checked against the counted totals recounted from its generated tokens (exact
whatever the numerics). Prompts are synthetic records whose two chats render to exactly the prompt length.

    python benchmarks/bench_analyze_engine.py --out /tmp/bae              # GPU, about 7 minutes on an H200
    python benchmarks/bench_analyze_engine.py --out /tmp/bae --smoke      # CPU, tiny model, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_analyze as ba  # noqa: E402

import moe_fastmask as mf  # noqa: E402
from moe_fastmask.pipeline import artifacts  # noqa: E402
from moe_fastmask.pipeline.analyze import AnalysisConfig, prepare_batches, run_analysis  # noqa: E402
from moe_fastmask.pipeline.data import DEFAULT_SYSTEM_PROMPT, render_prompt  # noqa: E402

GROUP_COUNTS = (2, 16, 64, 128)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------------
# Records of an exact prompt length, built with a few tokenizer calls each
# ------------------------------------------------------------------------------------------------------------


def _exact_chat_text(tokenizer, build_chat, target: int, words: list[str], rng: np.random.Generator) -> str:
    """A user text making the rendered chat exactly ``target`` tokens: single-token words are added in one go
    (each adds one token), then corrected one word at a time."""

    def length(text: str) -> int:
        return len(tokenizer(render_prompt(tokenizer, build_chat(text)), add_special_tokens=False)["input_ids"])

    text = "Task"
    base = length(text)
    text += "".join(words[int(i)] for i in rng.integers(len(words), size=max(0, target - base)))
    for _ in range(64):
        n = length(text)
        if n == target:
            return text
        if n < target:
            text += words[int(rng.integers(len(words)))]
        else:
            text = text[: text.rfind(" ")]
    raise RuntimeError(f"could not build a prompt of exactly {target} tokens")


def build_records(tokenizer, num_pairs: int, prompt_tokens: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ba._single_token_words(tokenizer)
    records = []
    for index in range(num_pairs):
        goal = _exact_chat_text(
            tokenizer, lambda t: [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": t}],
            prompt_tokens, words, rng,
        )  # fmt: skip
        attack = _exact_chat_text(
            tokenizer, lambda t: [{"role": "system", "content": ba.ATTACK_SYSTEM}, {"role": "user", "content": t}],
            prompt_tokens, words, rng,
        )  # fmt: skip
        records.append({
            "id": index, "goal": goal, "judge_success_gpt4": 1,
            "all_prompt": [{"role": "system", "content": ba.ATTACK_SYSTEM}, {"role": "user", "content": attack}],
        })  # fmt: skip
    return records


# ------------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------------


def totals_match_tokens(result, config: AnalysisConfig) -> bool:
    """Every batch's counted tokens recounted from its generated tokens: prompt tokens, and the generated tokens
    fed back (``new_tokens - 1`` per sequence, EOS suppressed); ``top_k`` experts per token and layer."""
    ok = True
    for batch in result.batch_data_list:
        outputs = batch["batch_outputs"]
        for phase in ("prefill", "decode"):
            expected = np.zeros(2, np.int64)
            for o in outputs:
                group = 0 if o["kind"] == "safe" else 1
                expected[group] += o["num_prompt_tokens"] if phase == "prefill" else min(
                    o["num_generated_tokens"], config.max_new_tokens - 1
                )
            counts, tokens = batch["group_counts"][phase], batch["group_tokens"][phase]
            top_k = counts[0].sum() // max(1, int(tokens.sum()))
            ok &= bool(np.array_equal(tokens, expected) and (counts.sum(-1) == expected[None] * top_k).all())
    return ok


def analysis_run(model, tokenizer, name: str, records: list[dict], work: Path, args, *, engine: str,
                 gpu_batch_size: int | None, engine_compile: str = "off") -> tuple[dict, object, AnalysisConfig]:  # fmt: skip
    data_path = artifacts.atomic_write_json(work / "data.json", records)
    config = AnalysisConfig(
        model=name, data=str(data_path), out=str(work / "analyze"), batch_size=16, safe_ratio=0.5, seed=0,
        test_fraction=0.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, device=args.device,
        engine=engine, gpu_batch_size=gpu_batch_size, keep_token_experts=True, overwrite=True, progress=False,
        verbose=False, engine_compile=engine_compile if engine == "graph" else "auto",
    )  # fmt: skip
    sync(args.device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_analysis(config, model=model, tokenizer=tokenizer)
    sync(args.device)
    seconds = time.perf_counter() - start
    said = sorted({str(w.message) for w in caught if "StaticCacheEngine" in str(w.message)})
    prompts = 2 * len(records)
    return ({"engine": engine, "engine_compile": config.engine_compile, "pairs": len(records), "prompts": prompts,
             "seconds": seconds, "prompts_per_s": prompts / seconds, "gpu_batch_size": gpu_batch_size,
             "engine_said": said, "timings": dict(result.timings),
             "totals_match_tokens": totals_match_tokens(result, config)}, result, config)  # fmt: skip


BREAKDOWN = (  # (label, timings key): where an analyze run's wall time went
    ("setup", "setup_s"), ("tokenize", "prepare_s"), ("prefill", "engine_prefill_s"), ("decode", "engine_decode_s"),
    ("compile", "engine_capture_s"), ("eng.host", None), ("host(bg)", "host_s"), ("hostwait", "host_wait_s"),
    ("finalize", "finalize_s"), ("total", "total_s"),
)


def breakdown_cells(timings: dict) -> list[str]:
    """Seconds per part; "eng.host": the rest of the time in the engine's ``generate`` (batch layout, copies to and
    from the device, decoding the texts); "host(bg)" overlaps generation, only "hostwait" adds to the total."""
    engine_parts = sum(timings.get(k, 0.0) for k in ("engine_prefill_s", "engine_decode_s", "engine_capture_s"))
    cells = []
    for _, key in BREAKDOWN:
        value = timings.get("generate_s", 0.0) - engine_parts if key is None else timings.get(key, float("nan"))
        cells.append(f"{value:8.2f}")
    return cells


def reference_run(model, tokenizer, records: list[dict], work: Path, args) -> dict:
    data_path = artifacts.atomic_write_json(work / "reference_data.json", records)
    config = AnalysisConfig(
        model="reference", data=str(data_path), out=str(work / "unused"), batch_size=2, safe_ratio=0.5, seed=0,
        test_fraction=0.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
    )  # fmt: skip
    _, _, batches = prepare_batches(config)
    sync(args.device)
    start = time.perf_counter()
    ba.reference_method(model, tokenizer, batches, config, work / "reference_logits")
    sync(args.device)
    seconds = time.perf_counter() - start
    prompts = 2 * len(records)
    return {"pairs": len(records), "prompts": prompts, "seconds": seconds, "prompts_per_s": prompts / seconds}


def route_cost(device: str, tokens_list: tuple[int, ...], repeats: int) -> list[dict]:
    """Median time of one routing call (bf16 logits [T, 64], top-8, keep mask and counts of G groups)."""
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for tokens in tokens_list:
        logits = torch.randn(tokens, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
        for groups in GROUP_COUNTS:
            group = torch.randint(-1, groups, (tokens,), generator=gen).to(device)
            keep = torch.rand(groups, 64, generator=gen) > 0.2
            keep[:, :8] = True
            keep = keep.to(device)
            counts = torch.zeros(groups, 64, dtype=torch.int64, device=device)
            call = lambda: mf.route(logits, 8, keep, group, counts, True, validate=False)  # noqa: E731
            for _ in range(3):
                call()
            times = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                call()
                sync(device)
                times.append(time.perf_counter() - start)
            if str(device).startswith("cuda"):
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                for _ in range(repeats):
                    call()
                end_event.record()
                sync(device)
                device_us = start_event.elapsed_time(end_event) / repeats * 1e3
            else:
                device_us = float("nan")
            times.sort()
            counted = int((group >= 0).sum())
            counts.zero_()
            call()
            exact = int(counts.sum()) == counted * 8
            rows.append({"tokens": tokens, "groups": groups, "call_us": times[len(times) // 2] * 1e6,
                         "device_us": device_us, "counts_exact": exact})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and report directory (bench_analyze_engine.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU, a few prompts")
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-pairs", type=int, default=512)
    parser.add_argument("--long-prompt-tokens", type=int, default=1024)
    parser.add_argument("--reference-pairs", type=int, default=4, help="pairs run one prompt at a time")
    parser.add_argument("--hf-pairs", type=int, default=16, help="pairs analysed with the hf engine (0: skip)")
    parser.add_argument("--gpu-batch-size", type=int, default=None, help="default: from free memory")
    parser.add_argument("--no-compile", action="store_true", help="only the uncompiled graph-engine runs")
    parser.add_argument("--no-compile-again", action="store_true",
                        help="skip the second compiled run (compiled step reused)")
    parser.add_argument("--long-compile", action="store_true",
                        help="a compiled run at the long prompts too (another compile: about a minute more)")
    args = parser.parse_args(argv)
    args.device, args.dtype, args.tiny = ("cpu", "float32", True) if args.smoke else ("cuda", "bfloat16", False)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device (--smoke runs a CPU check of the script)")
    if args.smoke:
        args.pairs, args.prompt_tokens, args.new_tokens = 16, 40, 6
        args.long_pairs, args.long_prompt_tokens, args.reference_pairs, args.hf_pairs = 8, 64, 2, 8
        args.gpu_batch_size = args.gpu_batch_size or 32
        args.no_compile = True  # auto never compiles on the CPU; "on" there would time a C++ build
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    model, tokenizer, name = ba.build_model(args, out)
    mf.apply(model)
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "model": name, "dtype": str(model.dtype), "new_tokens": args.new_tokens,
        "scenarios": [],
    }  # fmt: skip
    import transformers

    report["transformers"] = transformers.__version__
    for prompt_tokens, pairs in ((args.prompt_tokens, args.pairs), (args.long_prompt_tokens, args.long_pairs)):
        work = out / f"prompt{prompt_tokens}"
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        records = build_records(tokenizer, pairs, prompt_tokens)
        print(f"{pairs} records of {prompt_tokens}-token prompts built in {time.perf_counter() - start:.0f} s",
              flush=True)  # fmt: skip
        row: dict = {"prompt_tokens": prompt_tokens}
        if args.device == "cuda" and args.gpu_batch_size is None:
            from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

            # what analyze sizes its GPU batches from (it then spreads the batches evenly over >= 2 requests)
            row["fits_in_memory"] = StaticCacheEngine(model).batch_size_for_memory(prompt_tokens, args.new_tokens)
            print(f"{prompt_tokens}+{args.new_tokens} tokens: {row['fits_in_memory']} sequences fit in free memory",
                  flush=True)  # fmt: skip
        runs = [("graph", "auto")]  # analyze's defaults (auto: compiled only when the run repays the compile)
        if prompt_tokens == args.prompt_tokens:
            runs += [("graph_again", "auto"), ("graph_compiled", "on")] + ([] if args.no_compile_again else [("graph_compiled_again", "on")])
        elif args.long_compile:
            runs.append(("graph_compiled", "on"))
        for key, engine_compile in runs:
            if engine_compile == "on" and args.no_compile:
                continue
            row[key], result, config = analysis_run(
                model, tokenizer, name, records, work / key, args, engine="graph", gpu_batch_size=args.gpu_batch_size,
                engine_compile=engine_compile,
            )  # fmt: skip
            print(f"analyze --engine graph --engine-compile {engine_compile}, {prompt_tokens}-token prompts: "
                  f"{row[key]}", flush=True)  # fmt: skip
            del result
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if args.hf_pairs:
            row["hf"], _, _ = analysis_run(model, tokenizer, name, records[: args.hf_pairs], work / "hf", args,
                                           engine="hf", gpu_batch_size=None)  # fmt: skip
            print(f"analyze --engine hf (one batch per request): {row['hf']}", flush=True)
        row["reference"] = reference_run(model, tokenizer, records[: args.reference_pairs], work, args)
        print(f"one prompt at a time: {row['reference']}", flush=True)
        report["scenarios"].append(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report["route"] = route_cost(args.device, (512, 16384) if not args.smoke else (64,), 50 if not args.smoke else 3)
    report["elapsed_s"] = time.perf_counter() - wall
    (out / "bench_analyze_engine.json").write_text(json.dumps(report, indent=2, default=str))

    print(f"\n# analyze end to end: {report['device']}, torch {report['torch']}, transformers "
          f"{report['transformers']}, {report['model']} ({report['dtype']}), {args.new_tokens} new tokens")
    labels = (("graph", "analyze --engine graph (defaults)"), ("graph_again", "graph, defaults, 2nd run"),
              ("graph_compiled", "graph, compiled (1st run)"),
              ("graph_compiled_again", "graph, compiled (2nd run)"), ("hf", "analyze --engine hf"),
              ("reference", "one prompt at a time"))  # fmt: skip
    print(" prompt  method                              prompts  seconds  prompts/s  x one-at-a-time  totals exact")
    for row in report["scenarios"]:
        ref = row["reference"]["prompts_per_s"]
        for key, label in labels:
            if key not in row:
                continue
            r = row[key]
            exact = r.get("totals_match_tokens", "-")
            print(f" {row['prompt_tokens']:6d}  {label:35s} {r['prompts']:8d} {r['seconds']:8.1f} "
                  f"{r['prompts_per_s']:10.2f} {r['prompts_per_s'] / ref:16.1f}  {exact}")
        if "fits_in_memory" in row:
            print(f"         GPU batch from free memory: {row['fits_in_memory']} sequences fit; analyze spreads the "
                  f"{2 * row['graph']['pairs']} prompts over >= 2 requests")
        for key, _ in labels:
            if key in row and row[key].get("engine_said"):
                print(f"         {key}: engine said: {row[key]['engine_said']}")
    print("\n# where the time of each graph-engine run went, seconds: setup (records, split), tokenize (chat rendering "
          "+ tokenization), prefill, decode, compile (compile + CUDA-graph capture of the decode step), eng.host (the "
          "rest of generate: batch layout, copies, texts), host(bg) (judging, batch records, per-batch files: in a "
          "background thread, alongside generation), hostwait (generation waiting for it), finalize (artifacts)")
    print(" prompt  run                  " + "".join(f"{label:>9s}" for label, _ in BREAKDOWN))
    for row in report["scenarios"]:
        for key, label in labels[:3]:
            if key in row:
                print(f" {row['prompt_tokens']:6d}  {key:20s} " + " ".join(breakdown_cells(row[key]["timings"])))
    print("\n# route kernel (bf16 logits, E=64, top-8, keep mask, counts): median us per call (host) / device us")
    print(" tokens  " + "  ".join(f"G={g:<14d}" for g in GROUP_COUNTS))
    for tokens in sorted({r["tokens"] for r in report["route"]}):
        cells = [r for r in report["route"] if r["tokens"] == tokens]
        print(f" {tokens:6d}  " + "  ".join(f"{r['call_us']:7.1f}/{r['device_us']:6.1f}{'' if r['counts_exact'] else '!'}"
                                          for r in cells))  # fmt: skip
    print(f"elapsed {report['elapsed_s']:.0f} s; written {out / 'bench_analyze_engine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
