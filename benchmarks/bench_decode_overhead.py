"""Where the host time of a decode step goes: plain vs patched OLMoE routing, measured interleaved.

A decode step of OLMoE-1B-7B at batch 16 is launch-bound (the host issues kernels slower than the GPU runs them), so
the patch's cost is host time per router call. This script measures, on a GPU:

1. host time per router call at T=16 tokens, E=64, top-8 (bf16): the plain transformers chain (softmax in float32,
   topk, cast) against ``route`` with and without groups and counts, and the parts of ``route`` (argument checks,
   backend resolution, the kernel launch through Triton's JIT entry point and directly);
2. whole ``generate`` calls of the random-weight OLMoE-1B-7B (batch 16 x 128-token prompts, 32 new tokens), plain,
   patched, and patched with the recorder, interleaved round-robin so that drifts of the host's speed hit all three
   (ratios: medians of per-round ratios);
3. a cProfile of one patched + recorded ``generate`` (top functions by own time) to ``OUT/decode_profile.txt``.

    python benchmarks/bench_decode_overhead.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_olmoe_generate  # noqa: E402  (model builder, prompts)

import moe_fastmask as mf  # noqa: E402
from moe_fastmask.ops import triton_route  # noqa: E402

# the module, not the function that moe_fastmask.ops re-exports under the same name
route_module = importlib.import_module("moe_fastmask.ops.route")


def per_call_us(fn, calls: int) -> float:
    """Median over 5 runs of the wall time per call of ``calls`` back-to-back calls (host-bound at small T)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def router_call_costs(calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    num_tokens, num_experts, top_k = 16, 64, 8
    hidden = torch.randn(num_tokens, 2048, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(num_experts, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    logits = torch.nn.functional.linear(hidden, weight)
    group = torch.randint(-1, 2, (num_tokens,), device="cuda")
    counts = torch.zeros(2, num_experts, dtype=torch.int64, device="cuda")
    device = logits.device

    def plain_chain():
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, top_k, dim=-1)
        return top_w.to(logits.dtype), top_i

    results = {}
    with torch.no_grad():
        results["linear"] = per_call_us(lambda: torch.nn.functional.linear(hidden, weight), calls)
        results["plain softmax+topk+cast"] = per_call_us(plain_chain, calls)
        results["route (no groups)"] = per_call_us(lambda: mf.route(logits, top_k, validate=False), calls)
        results["route (groups + counts)"] = per_call_us(
            lambda: mf.route(logits, top_k, group=group, counts=counts, validate=False), calls
        )
        results["route_prechecked (groups + counts), as the patched router calls it"] = per_call_us(
            lambda: route_module.route_prechecked(logits, top_k, None, group, counts, False, "triton"), calls
        )
        results["  check_route_args"] = per_call_us(
            lambda: route_module.check_route_args(logits, top_k, None, group, counts, False, validate=False), calls
        )
        results["  resolve_backend"] = per_call_us(lambda: route_module.resolve_backend("auto", device), calls)
        for fast in (False, True):
            triton_route.FAST_LAUNCH = fast
            results[f"  triton route_forward, {'direct' if fast else 'JIT'} launch"] = per_call_us(
                lambda: triton_route.route_forward(logits, top_k, None, group, counts, False), calls
            )
        results["  torch.empty x2"] = per_call_us(
            lambda: (torch.empty((num_tokens, top_k), dtype=logits.dtype, device=device),
                     torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)), calls)  # fmt: skip
    return results


def generate_interleaved(
    model, recorder: mf.RoutingRecorder, rounds: int, new_tokens: int
) -> tuple[dict[str, dict[str, list[float]]], str]:
    input_ids, attention_mask, groups, gen_kwargs = bench_olmoe_generate.generation_inputs(16, 128, new_tokens)

    def generate():
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)

    @contextlib.contextmanager
    def patched_with_groups():
        with bench_olmoe_generate.patched_variant(model), mf.token_groups(model, groups):
            yield

    variants = {
        "plain": lambda: bench_olmoe_generate.plain_variant(model),
        "patched": lambda: bench_olmoe_generate.patched_variant(model),
        "patched + token_groups (no counting)": patched_with_groups,
        "patched + recorder": lambda: bench_olmoe_generate.patched_variant(model, recorder, groups),
    }
    times = bench_olmoe_generate.time_interleaved(generate, variants, rounds)

    text = io.StringIO()
    for variant in ("patched + recorder", "plain"):
        with variants[variant]():
            profiler = cProfile.Profile()
            profiler.enable()
            generate()
            torch.cuda.synchronize()
            profiler.disable()
        text.write(f"==== {variant} ====\n")
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    return times, text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark measures the host cost of GPU launches and needs a CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers
    import triton

    report = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__},
    }  # fmt: skip
    report["router_call_us"] = router_call_costs(args.calls)
    model = bench_olmoe_generate.build_model(None, torch.bfloat16)
    recorder = mf.RoutingRecorder(mf.apply(model), num_groups=2)
    groups = bench_olmoe_generate.generation_inputs(16, 128, args.new_tokens)[2]

    def enter_and_exit_record():
        with recorder.record(groups):
            pass

    report["router_call_us"]["record() enter + exit, once per generate"] = per_call_us(enter_and_exit_record, 200)
    times, profile = generate_interleaved(model, recorder, args.rounds, args.new_tokens)
    report["generate_s"] = times
    for kind, key in (("wall", "generate_ratio_to_plain"), ("cpu", "generate_cpu_ratio_to_plain")):
        report[key] = {name: bench_olmoe_generate.ratio_summary(times[kind], name, "plain") for name in times[kind]}
    (out / "decode_profile.txt").write_text(profile)
    (out / "decode_overhead.json").write_text(json.dumps(report, indent=2))

    print(f"device: {report['device']}  {report['versions']}")
    print("\n| router call, T=16 E=64 top-8 bf16 | host us/call |\n|---|---:|")
    for name, value in report["router_call_us"].items():
        print(f"| {name} | {value:.1f} |")
    print(f"\n{args.rounds} interleaved rounds; ratios: median of per-round ratios to plain [95% bootstrap CI]")
    print(f"| generate 16x128 + {args.new_tokens} | median wall s | ratio | median host CPU s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in times["wall"]:
        wall, cpu = report["generate_ratio_to_plain"][name], report["generate_cpu_ratio_to_plain"][name]
        print(
            f"| {name} | {statistics.median(times['wall'][name]):.3f} | {wall['median']:.3f} [{wall['ci95_low']:.3f}, "
            f"{wall['ci95_high']:.3f}] | {statistics.median(times['cpu'][name]):.3f} | {cpu['median']:.3f} |"
        )


if __name__ == "__main__":
    main()
