"""Decode throughput of the static-cache CUDA-graph engine vs ``generate``, against the bandwidth floor.

Random-weight OLMoE with the full OLMoE-1B-7B config (bf16), 128-token prompts (half of each batch left-padded by
1/8), groups 0/1 alternating, recording on, greedy with every sequence forced to full length (``min_new_tokens``):

1. decode tokens/s of the engine at batch 16, 256, 512 and 1024 (skipped if it does not fit), from the engine's
   own prefill/decode timing (one host sync after each phase), second call of each size (the first captures);
2. ``generate`` (patched model + recorder, dynamic cache) at the same batch sizes with few new tokens: decode
   tokens/s from the median decode step (host stamps at each step; ``generate`` syncs at every step anyway);
3. the floor: weights + the filled KV cache read once per step at the measured device copy bandwidth;
4. ``torch.compile`` of the engine's decode forward at batch 512 (``--no-compile`` skips it);
5. where a decode step's device time goes at batch 512 (torch profiler over eager steps of the same engine code:
   attention, experts, router, logits (LM head), sampling, other), next to the graph-replayed step time;
6. a check that the replayed graph gives the same tokens and counts as the eager step.

    python benchmarks/bench_engine.py --out benchmarks/out          # GPU, about 4 minutes on an H200
    python benchmarks/bench_engine.py --smoke                       # CPU, tiny model, checks the script runs

Prints a compact table last and writes ``engine.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import moe_fastmask as mf
import numpy as np

from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings
from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

CATEGORIES = ("attention", "experts", "router", "logits", "sampling")


# --------------------------------------------------------------------------------------------------------------
# Model, inputs, device helpers
# --------------------------------------------------------------------------------------------------------------


def build_model(smoke: bool, layers: int | None):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    if smoke:
        from moe_fastmask.pipeline.demo import tiny_olmoe_config

        config = tiny_olmoe_config(512, num_layers=layers or 2, pad_token_id=1, eos_token_id=0)
        dtype, device = torch.float32, "cpu"
    else:
        # OLMoE-1B-7B: OlmoeConfig's defaults (16 layers, 64 experts, top-8, hidden 2048, vocab 50304) with the
        # released checkpoints' intermediate size of 1024
        config = OlmoeConfig(intermediate_size=1024, pad_token_id=1, eos_token_id=50279)
        if layers is not None:
            config.num_hidden_layers = layers
        dtype, device = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = OlmoeForCausalLM(config)
    torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return mf.apply(model.eval())


def prompts(batch: int, prompt_len: int, vocab: int, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Random prompts, the first half shorter by ``prompt_len // 8`` (left padding), groups 0/1 alternating."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab - 300, (batch, prompt_len), generator=gen).tolist()
    cut = prompt_len // 8
    return [row[cut:] if b < batch // 2 else row for b, row in enumerate(ids)], [b % 2 for b in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10 copies of 512 MiB."""
    n = (1 << 29) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    times.sort()
    return 2 * n / times[len(times) // 2] / 1e9


def floor_ms(model, batch: int, prompt_len: int, new_tokens: int, bandwidth_gbs: float) -> float:
    """One decode step's bytes at ``bandwidth_gbs``: every weight once, plus the KV cache filled so far (mean
    over the steps)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    kv = batch * (prompt_len + new_tokens / 2) * per_token
    return (weights + kv) / (bandwidth_gbs * 1e9) * 1e3


def fits(model, batch: int, cache_len: int) -> bool:
    """Room on the device for the static cache plus a generous margin for activations and logits."""
    if model.device.type != "cuda":
        return True
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = batch * cache_len * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    free, _ = torch.cuda.mem_get_info()
    return cache * 1.5 + batch * cfg.vocab_size * 4 * 8 + (8 << 30) < free


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


def engine_run(engine: StaticCacheEngine, batch: int, args, vocab: int) -> dict:
    ids, groups = prompts(batch, args.prompt_len, vocab)
    sampling = SamplingSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    request = GenerationRequest(prompts=ids, sampling=sampling, groups=groups, num_groups=2)
    wall = time.perf_counter()
    engine.generate(request)  # first call of this size: captures the decode graph
    first_s = time.perf_counter() - wall
    out = engine.generate(request)
    t = engine.last_timings
    assert t["batches"] == 1, "the engine's max_batch_size must hold the whole request"
    return {
        "batch": batch,
        "first_call_s": first_s,
        "prefill_s": t["prefill_s"],
        "decode_s": t["decode_s"],
        "decode_ms_per_step": t["decode_s"] / t["decode_steps"] * 1e3,
        "decode_tok_s": batch * t["decode_steps"] / t["decode_s"],
        "counted_decode_tokens": int(out.decode_tokens.sum()),
    }


class StepStamps(StoppingCriteria):
    """A stopping criterion that never stops and stamps the host clock at each generation step (``generate``
    synchronises with the host at every step for its own stopping checks, so the stamps are step boundaries)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.done


def generate_run(model, batch: int, args, vocab: int) -> dict:
    """``generate`` of the patched model with the recorder (dynamic cache): the median decode step time."""
    ids, groups = prompts(batch, args.prompt_len, vocab)
    width = max(len(row) for row in ids)
    input_ids = torch.full((batch, width), model.config.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(batch, width, dtype=torch.int64)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    recorder = mf.RoutingRecorder(model, num_groups=2)
    clock = StepStamps()

    def call(new: int) -> None:
        clock.stamps = []
        with torch.no_grad(), recorder.record(groups):
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=model.config.pad_token_id,
                           stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip

    call(2)  # warm-up
    call(args.generate_new_tokens)
    steps = sorted(b - a for a, b in zip(clock.stamps, clock.stamps[1:]))
    step_s = steps[len(steps) // 2]
    return {"batch": batch, "decode_ms_per_step": step_s * 1e3, "decode_tok_s": batch / step_s,
            "steps_timed": len(steps)}  # fmt: skip


def totals_match_tokens(out, ids, groups, new: int) -> bool:
    """The counted totals recounted from the generated tokens: every prompt token; each generated token fed back
    before its sequence's EOS (at most ``new - 1``); ``top_k`` experts per token and layer."""
    prefill, decode = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for prompt, tokens, g in zip(ids, out.tokens, groups):
        prefill[g] += len(prompt)
        decode[g] += min(len(tokens), new - 1)
    top_k = int(out.prefill_counts[0].sum() // max(1, int(prefill.sum())))
    return bool(
        np.array_equal(out.prefill_tokens, prefill) and np.array_equal(out.decode_tokens, decode)
        and (out.prefill_counts.sum(-1) == prefill[None] * top_k).all()
        and (out.decode_counts.sum(-1) == decode[None] * top_k).all()
    )  # fmt: skip


def graph_matches_eager(model, batch: int, args, vocab: int) -> dict:
    """Graph replay vs the eager step on the same request, and each against itself (run twice): when eager vs
    eager already differs, the kernels are not deterministic and graph vs eager differences are numerics, not the
    graph. ``first_diff_step``: the first decode step where any row's token differs (None: equal)."""
    ids, groups = prompts(batch, args.prompt_len, vocab, seed=2)
    new = min(args.new_tokens, 24)
    request = GenerationRequest(prompts=ids, sampling=SamplingSettings(max_new_tokens=new, min_new_tokens=new),
                                groups=groups, num_groups=2)  # fmt: skip
    outs = {}
    for name, graphs in (("graph", True), ("graph2", True), ("eager", False), ("eager2", False)):
        engine = StaticCacheEngine(model, max_batch_size=batch, use_cuda_graph=graphs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[name] = engine.generate(request)
        engine.close()

    def same(a, b) -> dict:
        steps = [t for t in range(new) if any(len(x) > t and len(y) > t and x[t] != y[t] for x, y in zip(a.tokens, b.tokens))]
        return {
            "tokens_equal": a.tokens == b.tokens,
            "counts_equal": bool(np.array_equal(a.prefill_counts, b.prefill_counts)
                                 and np.array_equal(a.decode_counts, b.decode_counts)),  # fmt: skip
            "prefill_counts_equal": bool(np.array_equal(a.prefill_counts, b.prefill_counts)),
            "first_diff_step": steps[0] if steps else None,
        }

    return {
        "graph_vs_eager": same(outs["graph"], outs["eager"]),
        "graph_vs_graph": same(outs["graph"], outs["graph2"]),
        "eager_vs_eager": same(outs["eager"], outs["eager2"]),
        "totals_match_tokens": {name: totals_match_tokens(out, ids, groups, new) for name, out in outs.items()},
    }


@contextlib.contextmanager
def labelled_ranges(model, engine: StaticCacheEngine):
    """Profiler ranges around attention, experts, router, the LM head (module hooks) and token choice."""
    handles, stack = [], []

    def enter(label):
        def hook(module, args):
            ctx = torch.profiler.record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for layer in model.model.layers:
        for module, label in ((layer.self_attn, "attention"), (layer.mlp.experts, "experts"), (layer.mlp.gate, "router")):
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave))
    handles.append(model.lm_head.register_forward_pre_hook(enter("logits")))
    handles.append(model.lm_head.register_forward_hook(leave))
    choose, step = engine._choose, engine._step

    def labelled_choose(*a, **k):
        with torch.profiler.record_function("sampling"):
            return choose(*a, **k)

    def labelled_step(*a, **k):
        with torch.profiler.record_function("decode_step"):
            return step(*a, **k)

    engine._choose, engine._step = labelled_choose, labelled_step
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        engine._choose, engine._step = choose, step


def _event_time_us(event, device: bool) -> float:
    """Time of ``event``'s own kernels (device) or its own CPU time (CPU runs), children excluded."""
    if device:
        return sum(k.duration for k in getattr(event, "kernels", [])) if getattr(event, "kernels", None) else 0.0
    return float(getattr(event, "self_cpu_time_total", 0.0))


def step_breakdown(model, batch: int, args, vocab: int) -> dict:
    """Device time per decode step by category, from the profiler over eager decode steps at ``batch``."""
    engine = StaticCacheEngine(model, max_batch_size=batch, use_cuda_graph=False)
    ids, groups = prompts(batch, args.prompt_len, vocab)
    new = 6
    request = GenerationRequest(prompts=ids, sampling=SamplingSettings(max_new_tokens=new, min_new_tokens=new),
                                groups=groups, num_groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.generate(request)  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU]
        on_device = model.device.type == "cuda"
        if on_device:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with labelled_ranges(model, engine), torch.profiler.profile(activities=activities) as prof:
            engine.generate(request)
    engine.close()
    totals = {name: 0.0 for name in (*CATEGORIES, "other")}
    steps = 0

    def walk(event, label):
        name = event.name if event.name in CATEGORIES else label
        totals[name] += _event_time_us(event, on_device)
        for child in event.cpu_children:
            walk(child, name)

    for event in prof.events():
        # CPU-side ranges only (the profiler mirrors each range as a device-side annotation too)
        if event.name == "decode_step" and event.device_type == torch.autograd.DeviceType.CPU:
            steps += 1
            for child in event.cpu_children:
                walk(child, "other")
    steps = max(steps, 1)
    result = {name: value / steps / 1e3 for name, value in totals.items()}  # ms per step
    result["total"] = sum(result.values())
    result["steps"] = steps
    result["clock"] = "device" if on_device else "cpu"
    return result


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes: checks that the script runs")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="engine batch sizes (16 256 512 1024)")
    parser.add_argument("--generate-batches", type=int, nargs="+", default=None, help="generate baselines (16 256 512)")
    parser.add_argument("--prompt-len", type=int, default=None, help="128")
    parser.add_argument("--new-tokens", type=int, default=None, help="engine new tokens (64)")
    parser.add_argument("--generate-new-tokens", type=int, default=None, help="generate baseline new tokens (9)")
    parser.add_argument("--profile-batch", type=int, default=None, help="512")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args(argv)
    defaults = (
        dict(batches=[2, 4], generate_batches=[2, 4], prompt_len=8, new_tokens=6, generate_new_tokens=4, profile_batch=4)
        if args.smoke
        else dict(batches=[16, 256, 512, 1024], generate_batches=[16, 256, 512], prompt_len=128, new_tokens=64,
                  generate_new_tokens=9, profile_batch=512)
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.no_compile = True
    return args


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_engine.py needs a CUDA device (or --smoke for a CPU check of the script)")
    out_dir = Path(args.out if not args.smoke else tempfile.mkdtemp(prefix="bench_engine_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    model = build_model(args.smoke, args.layers)
    vocab = model.config.vocab_size
    results: dict = {
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "config": vars(args),
        "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
    }
    results["copy_bandwidth_gbs"] = bw = copy_bandwidth_gbs(model.device)
    print(f"copy bandwidth {bw:.0f} GB/s; weights {results['weights_gb']:.2f} GB", flush=True)
    results["graph_vs_eager"] = graph_matches_eager(model, min(args.batches), args, vocab)
    print(f"graph vs eager (and each against itself; counted totals vs the tokens): {results['graph_vs_eager']}", flush=True)

    cache_multiple = 64
    engine = StaticCacheEngine(model, max_batch_size=max(args.batches), time_phases=True, max_slots=1,
                               cache_multiple=cache_multiple)  # fmt: skip
    rows = []
    for batch in args.batches:
        cache_len = -(-(args.prompt_len + args.new_tokens) // cache_multiple) * cache_multiple
        if not fits(model, batch, cache_len):
            print(f"batch {batch}: skipped (does not fit)", flush=True)
            continue
        row = engine_run(engine, batch, args, vocab)
        row["floor_ms"] = floor_ms(model, batch, args.prompt_len, args.new_tokens, bw)
        rows.append(row)
        print(f"engine batch {batch}: {row['decode_tok_s']:.0f} tok/s ({row['decode_ms_per_step']:.2f} ms/step)", flush=True)
    engine.close()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    results["engine"] = rows

    results["generate"] = []
    for batch in args.generate_batches:
        row = generate_run(model, batch, args, vocab)
        results["generate"].append(row)
        print(f"generate batch {batch}: {row['decode_tok_s']:.0f} tok/s", flush=True)

    if not args.no_compile:
        batch = args.profile_batch
        compiled = StaticCacheEngine(model, max_batch_size=batch, time_phases=True, compile=True, max_slots=1)
        start = time.perf_counter()
        try:
            row = engine_run(compiled, batch, args, vocab)
            row["compile_and_first_call_s"] = time.perf_counter() - start - row["prefill_s"] - row["decode_s"]
            # a forward that failed to compile was replaced by the eager one: then this row measures no compile
            row["compiled"] = compiled.compiled
            results["compiled"] = row
            print(f"compiled engine batch {batch}: {row['decode_tok_s']:.0f} tok/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            results["compiled"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        compiled.close()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()

    results["breakdown"] = step_breakdown(model, args.profile_batch, args, vocab)
    results["elapsed_s"] = time.perf_counter() - begin
    (out_dir / "engine.json").write_text(json.dumps(results, indent=1))

    # compact table last
    gen = {row["batch"]: row for row in results["generate"]}
    print(f"\n# engine decode with recording: {results['device']}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, prompt {args.prompt_len}, new {args.new_tokens}")  # fmt: skip
    print(f"{'batch':>6} {'engine tok/s':>13} {'ms/step':>8} {'generate tok/s':>15} {'x gen':>6} {'floor ms':>9} "
          f"{'x floor':>8} {'prefill s':>10} {'1st call s':>11}")  # fmt: skip
    for row in rows:
        g = gen.get(row["batch"])
        g_tok = f"{g['decode_tok_s']:.0f}" if g else "-"
        ratio = f"{row['decode_tok_s'] / g['decode_tok_s']:.1f}" if g else "-"
        print(f"{row['batch']:>6} {row['decode_tok_s']:>13.0f} {row['decode_ms_per_step']:>8.2f} {g_tok:>15} "
              f"{ratio:>6} {row['floor_ms']:>9.2f} {row['decode_ms_per_step'] / row['floor_ms']:>8.2f} "
              f"{row['prefill_s']:>10.2f} {row['first_call_s']:>11.2f}")  # fmt: skip
    if "compiled" in results:
        c = results["compiled"]
        print("compiled: " + (c["error"] if "error" in c else
              f"batch {c['batch']}: {c['decode_tok_s']:.0f} tok/s, {c['decode_ms_per_step']:.2f} ms/step "
              f"(compile + capture {c['compile_and_first_call_s']:.0f} s)"
              + ("" if c["compiled"] else " -- compile FAILED, eager forward measured")))  # fmt: skip
    b = results["breakdown"]
    print(f"step breakdown at batch {args.profile_batch} ({b['clock']} time, eager step, ms): "
          + ", ".join(f"{k} {b[k]:.2f}" for k in (*CATEGORIES, "other", "total")))
    print(f"graph vs eager: {results['graph_vs_eager']}; elapsed {results['elapsed_s']:.0f} s; "
          f"written {out_dir / 'engine.json'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
