"""Generation with the OLMoE patch and routing recorder vs plain transformers vs naive host-side capture.

Random-weight OLMoE with the full OLMoE-1B-7B config (bf16): batch 16 x 128-token prompts, 64 new tokens, greedy
(full length forced with ``min_new_tokens``), and the prefill forward of 16 x 512 tokens with and without the patch.
The variants run interleaved, round-robin (see :func:`time_interleaved`); ratios are medians of per-round ratios.

    python benchmarks/bench_olmoe_generate.py --out benchmarks/out

Also checks, on the same model, that a patched decode step with the recorder makes no host synchronisation and that
it can be captured in a CUDA graph with a static cache; and counts the host syncs of whole ``generate`` calls
(``torch.cuda.set_sync_debug_mode("warn")``), which transformers' own stopping checks make in every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

import moe_fastmask as mf


def build_model(layers: int | None, dtype: torch.dtype):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    # OLMoE-1B-7B: OlmoeConfig's defaults (16 layers, 64 experts, top-8, hidden 2048, vocab 50304) with the
    # released checkpoints' intermediate size of 1024 (the class default is 2048)
    config = OlmoeConfig(intermediate_size=1024)
    if layers is not None:
        config.num_hidden_layers = layers
    config.pad_token_id = 1
    config.eos_token_id = 50279
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = OlmoeForCausalLM(config)
    torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 50279
    return model.eval()


def generation_inputs(
    batch: int, prompt_len: int, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], dict]:
    """Random prompts (half the batch left-padded by prompt_len / 8), groups 0/1 alternating, and greedy generate
    arguments forcing exactly ``new_tokens`` new tokens: ``(input_ids, attention_mask, groups, gen_kwargs)``."""
    torch.manual_seed(1)
    input_ids = torch.randint(2, 50000, (batch, prompt_len), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: batch // 2, : prompt_len // 8] = 0
    groups = [i % 2 for i in range(batch)]
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return input_ids, attention_mask, groups, gen_kwargs


@contextlib.contextmanager
def plain_variant(model, capture_to_host: bool = False) -> Iterator[None]:
    """The unpatched model; ``capture_to_host``: with a forward hook copying each router's logits to the host (the
    naive capture method) for the duration of the block."""
    mf.remove_from_olmoe(model)
    hooks = []
    if capture_to_host:
        captured = []
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda mod, inp, out: captured.append(out[0].float().cpu()))
            for layer in model.model.layers
        ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def patched_variant(model, recorder: "mf.RoutingRecorder | None" = None, groups=None) -> Iterator[None]:
    """The patched model, recording with ``recorder`` (its groups ``groups``) when one is given."""
    mf.apply_to_olmoe(model)
    with recorder.record(groups) if recorder is not None else contextlib.nullcontext():
        yield


def time_interleaved(
    fn, variants: dict[str, Callable[[], contextlib.AbstractContextManager]], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Time ``fn`` under each variant's context, round-robin over ``rounds`` rounds after one warm-up each.

    The decode loop is host-bound and the host's speed drifts over a run; interleaving puts every variant under the
    same drift, the order of the variants rotates from round to round, and the ratio of two variants within one
    round (seconds apart) cancels most of the drift. Returns ``{"wall": {variant: [s per round]}, "cpu": {...}}``:
    wall time, and the CPU time of the calling thread (the host work itself, without time the thread spent
    descheduled or waiting).
    """
    for enter in variants.values():
        with enter():
            fn()
    names = list(variants)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for round_index in tqdm(range(rounds), desc="interleaved rounds"):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with variants[name]():
                torch.cuda.synchronize()
                wall, cpu = time.perf_counter(), time.thread_time()
                fn()
                torch.cuda.synchronize()
                times["cpu"][name].append(time.thread_time() - cpu)
                times["wall"][name].append(time.perf_counter() - wall)
    return times


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``times[name][r] / times[baseline][r]``."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def decode_step_checks(model, batch: int, prompt_len: int) -> dict:
    """A patched decode step with the recorder: no host sync, and capturable in a CUDA graph (static cache)."""
    from transformers import StaticCache

    result = {}
    # the static cache advances by one position per step, replays included: leave room for every step below
    timed_steps = 10
    max_len = prompt_len + 2 * timed_steps + 16
    input_ids = torch.randint(2, 50000, (batch, prompt_len), device="cuda")
    rec = mf.RoutingRecorder(model, num_groups=2)
    groups = [i % 2 for i in range(batch)]
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad(), rec.record(groups):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask4d = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device="cuda")
        mask4d[..., : prompt_len + 1] = True
        position_ids = torch.full((batch, 1), prompt_len, device="cuda")
        step = lambda: model(input_ids=token, attention_mask=mask4d, position_ids=position_ids, past_key_values=cache, use_cache=True)  # noqa: E731
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            result["decode_step_sync_free"] = True
        except RuntimeError as exc:
            result["decode_step_sync_free"] = f"synced: {str(exc)[:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        before = rec.decode_counts.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = step()
            torch.cuda.synchronize()
            before = rec.decode_counts.clone()
            graph.replay()
            torch.cuda.synchronize()
            added = rec.decode_counts - before
            eager = step().logits
            result["decode_step_cuda_graph"] = {
                "captured": True,
                "replay_counts_added": int(added.sum()),
                "expected_per_step": batch * model.config.num_hidden_layers * model.config.num_experts_per_tok,
                "replay_logits_max_abs_diff_vs_eager": float((graph_out.logits - eager).abs().max()),
            }
            graph.replay()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(timed_steps):
                graph.replay()
            torch.cuda.synchronize()
            result["decode_step_cuda_graph"]["replay_ms"] = (time.perf_counter() - start) / timed_steps * 1e3
            start = time.perf_counter()
            for _ in range(timed_steps):
                step()
            torch.cuda.synchronize()
            result["decode_step_eager_ms"] = (time.perf_counter() - start) / timed_steps * 1e3
        except Exception as exc:  # report, don't hide: the table says why
            result["decode_step_cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (default: 16)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the three generate variants")
    args = parser.parse_args()

    import transformers

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers, torch.bfloat16)
    B, P = args.batch, args.prompt_len
    input_ids, attention_mask, groups, gen_kwargs = generation_inputs(B, P, args.new_tokens)

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "config": vars(args),
    }
    rec = mf.RoutingRecorder(mf.apply_to_olmoe(model), num_groups=2)
    variants = {
        "a": lambda: plain_variant(model),  # plain transformers
        "b": lambda: patched_variant(model, rec, groups),  # the patch and the recorder
        "c": lambda: plain_variant(model, capture_to_host=True),  # naive capture: every router's logits to the host
    }
    measured = time_interleaved(generate, variants, args.rounds)
    results["generate_s_per_round"] = measured
    times = measured["wall"]
    results["a_plain_generate_s"] = statistics.median(times["a"])
    results["b_patched_recorder_generate_s"] = statistics.median(times["b"])
    results["c_host_copy_generate_s"] = statistics.median(times["c"])
    results["b_over_a"] = median_ratio(times, "b", "a")
    results["c_over_a"] = median_ratio(times, "c", "a")
    results["b_over_a_host_cpu"] = median_ratio(measured["cpu"], "b", "a")
    results["c_over_a_host_cpu"] = median_ratio(measured["cpu"], "c", "a")

    with variants["a"]():
        results["a_syncs"] = count_syncs(generate)
        plain_tokens = generate()
    rec.reset()
    with variants["b"]():
        results["b_syncs"] = count_syncs(generate)
    rec.reset()
    with variants["b"]():
        patched_tokens = generate()
    results["b_same_tokens_as_a"] = bool(torch.equal(patched_tokens, plain_tokens))
    results["b_prefill_tokens_counted"] = rec.prefill_tokens.tolist()
    results["b_decode_tokens_counted"] = rec.decode_tokens.tolist()

    # prefill forward of B x prefill_len, interleaved the same way
    long_ids = torch.randint(2, 50000, (B, args.prefill_len), device="cuda")

    def prefill():
        with torch.no_grad():
            model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))

    prefill_times = time_interleaved(
        prefill,
        {"plain": lambda: plain_variant(model), "patched": lambda: patched_variant(model),
         "patched + recorder": lambda: patched_variant(model, rec, groups)},
        rounds=10,
    )["wall"]  # fmt: skip
    results["prefill_plain_ms"] = statistics.median(prefill_times["plain"]) * 1e3
    results["prefill_patched_ms"] = statistics.median(prefill_times["patched"]) * 1e3
    results["prefill_patched_recorder_ms"] = statistics.median(prefill_times["patched + recorder"]) * 1e3
    mf.apply_to_olmoe(model)
    results.update(decode_step_checks(model, B, P))

    (out_dir / "olmoe_generate.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| variant | median time | median per-round ratio to (a) |\n|---|---|---|")
    print(f"| (a) plain generate | {results['a_plain_generate_s']:.3f} s | 1.00 |")
    print(f"| (b) patch + recorder | {results['b_patched_recorder_generate_s']:.3f} s | {results['b_over_a']:.3f} "
          f"(host CPU time: {results['b_over_a_host_cpu']:.3f}) |")
    print(f"| (c) host copy of router logits | {results['c_host_copy_generate_s']:.3f} s | {results['c_over_a']:.3f} "
          f"(host CPU time: {results['c_over_a_host_cpu']:.3f}) |")
    print(f"| prefill {B}x{args.prefill_len} plain | {results['prefill_plain_ms']:.1f} ms | |")
    print(f"| prefill patched / + recorder | {results['prefill_patched_ms']:.1f} / {results['prefill_patched_recorder_ms']:.1f} ms | |")


if __name__ == "__main__":
    main()
