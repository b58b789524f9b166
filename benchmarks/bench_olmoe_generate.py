"""Generation with the OLMoE patch and routing recorder vs plain transformers vs naive host-side capture.

Random-weight OLMoE with the full OLMoE-1B-7B config (bf16): batch 16 x 128-token prompts, 64 new tokens, greedy
(full length forced with ``min_new_tokens``), and the prefill forward of 16 x 512 tokens with and without the patch.
The variants run interleaved, round-robin (see :func:`time_interleaved`); ratios are medians of per-round ratios, with
95% bootstrap confidence intervals (:func:`ratio_summary`), for whole ``generate`` calls and for their decode steps
(timed by :class:`StepClock`).

    python benchmarks/bench_olmoe_generate.py --out benchmarks/out

Also checks, on the same model, that a patched decode step with the recorder makes no host synchronisation and that
it can be captured in a CUDA graph with a static cache; and counts the host syncs of whole ``generate`` calls
(``torch.cuda.set_sync_debug_mode("warn")``), which transformers' own stopping checks make in every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

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
    mf.remove(model)
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
    mf.apply(model)
    with recorder.record(groups) if recorder is not None else contextlib.nullcontext():
        yield


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops and stamps the host clock at every generation step.

    ``generate`` calls it once per new token, after the forward and the token choice, so the differences of its
    stamps are the wall times of the decode steps (each one forward + sampling). It returns one cached all-False
    tensor: no allocation, no kernel, no synchronisation of its own.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._not_done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if self._not_done is None or self._not_done.shape[0] != input_ids.shape[0]:
            self._not_done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._not_done

    def take_step_times(self) -> list[float]:
        """The decode-step durations (s) since the last call, and a fresh start."""
        steps = np.diff(self.stamps).tolist()
        self.stamps = []
        return steps


def time_interleaved(
    fn,
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
    rounds: int,
    after_each: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time ``fn`` under each variant's context, round-robin over ``rounds`` rounds after one warm-up each.

    The decode loop is host-bound and the host's speed drifts over a run; interleaving puts every variant under the
    same drift, the order of the variants rotates from round to round, and the ratio of two variants within one
    round (seconds apart) cancels most of the drift. As in ``timeit``, the garbage collector is run before and
    disabled during each timed call, so that no variant pays for a collection of the others' garbage.
    ``after_each(name)`` runs after each timed call (and after the warm-ups), outside the timed region.
    Returns ``{"wall": {variant: [s per round]}, "cpu": {...}}``: wall time, and the CPU time of the calling thread
    (the host work itself, without time the thread spent descheduled or waiting).
    """
    for name, enter in variants.items():
        with enter():
            fn()
        if after_each is not None:
            after_each(name)
    names = list(variants)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    gc_was_enabled = gc.isenabled()
    for round_index in tqdm(range(rounds), desc="interleaved rounds"):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with variants[name]():
                torch.cuda.synchronize()
                gc.collect()
                gc.disable()
                try:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    fn()
                    torch.cuda.synchronize()
                    times["cpu"][name].append(time.thread_time() - cpu)
                    times["wall"][name].append(time.perf_counter() - wall)
                finally:
                    if gc_was_enabled:
                        gc.enable()
            if after_each is not None:
                after_each(name)
    return times


def ratio_summary(
    times: dict[str, list[float]], name: str, baseline: str, resamples: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Median of the per-round ratios ``times[name][r] / times[baseline][r]``, their quartiles, and a 95% bootstrap
    confidence interval of that median (percentile method, rounds resampled with replacement)."""
    ratios = np.asarray(times[name]) / np.asarray(times[baseline])
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, ratios.size), replace=True), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"median": float(np.median(ratios)), "ci95_low": float(low), "ci95_high": float(high),
            "q1": float(q1), "q3": float(q3), "rounds": int(ratios.size)}  # fmt: skip


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
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the three generate variants")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device")

    import transformers

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers, torch.bfloat16)
    B, P = args.batch, args.prompt_len
    input_ids, attention_mask, groups, gen_kwargs = generation_inputs(B, P, args.new_tokens)
    clock = StepClock()

    def generate(stopping_criteria=None):
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stopping_criteria, **gen_kwargs
            )

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "config": vars(args),
    }
    rec = mf.RoutingRecorder(mf.apply(model), num_groups=2)
    variants = {
        "a": lambda: plain_variant(model),  # plain transformers
        "b": lambda: patched_variant(model, rec, groups),  # the patch and the recorder
        "c": lambda: plain_variant(model, capture_to_host=True),  # naive capture: every router's logits to the host
    }
    # every variant's generate carries the same step clock: a per-decode-step view of the same runs
    step_times: dict[str, list[list[float]]] = {name: [] for name in variants}
    measured = time_interleaved(
        lambda: generate(StoppingCriteriaList([clock])), variants, args.rounds, after_each=lambda name: step_times[name].append(clock.take_step_times())
    )  # fmt: skip
    for name in variants:
        del step_times[name][0]  # the warm-up
    results["generate_s_per_round"] = measured
    results["decode_step_s_per_round"] = step_times
    times = measured["wall"]
    results["a_plain_generate_s"] = statistics.median(times["a"])
    results["b_patched_recorder_generate_s"] = statistics.median(times["b"])
    results["c_host_copy_generate_s"] = statistics.median(times["c"])
    for name in ("b", "c"):
        results[f"{name}_over_a_summary"] = summary = ratio_summary(times, name, "a")
        results[f"{name}_over_a"] = summary["median"]
        results[f"{name}_over_a_host_cpu"] = ratio_summary(measured["cpu"], name, "a")["median"]
    # the median decode step of each round: robust to the bursts of host slowness that hit single steps
    step_medians = {name: [statistics.median(steps) for steps in rounds] for name, rounds in step_times.items()}
    for name in variants:
        results[f"{name}_decode_step_ms"] = statistics.median(step_medians[name]) * 1e3
    for name in ("b", "c"):
        results[f"{name}_over_a_decode_step_summary"] = ratio_summary(step_medians, name, "a")

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
    mf.apply(model)
    results.update(decode_step_checks(model, B, P))

    (out_dir / "olmoe_generate.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({key: value for key, value in results.items() if not key.endswith("_per_round")}, indent=2))
    print(f"\n{args.rounds} interleaved rounds; ratios: median of per-round ratios to (a) [95% bootstrap CI]")
    print("| variant | median generate | ratio | median decode step | ratio |\n|---|---:|---:|---:|---:|")
    print(f"| (a) plain generate | {results['a_plain_generate_s']:.3f} s | 1.00 | {results['a_decode_step_ms']:.2f} ms | 1.00 |")
    for name, label, seconds in (("b", "(b) patch + recorder", "b_patched_recorder_generate_s"),
                                 ("c", "(c) host copy of router logits", "c_host_copy_generate_s")):  # fmt: skip
        whole, step = results[f"{name}_over_a_summary"], results[f"{name}_over_a_decode_step_summary"]
        print(
            f"| {label} | {results[seconds]:.3f} s | {whole['median']:.3f} [{whole['ci95_low']:.3f}, "
            f"{whole['ci95_high']:.3f}] | {results[f'{name}_decode_step_ms']:.2f} ms | {step['median']:.3f} "
            f"[{step['ci95_low']:.3f}, {step['ci95_high']:.3f}] |"
        )
    print(f"| prefill {B}x{args.prefill_len} plain | {results['prefill_plain_ms']:.1f} ms | | | |")
    print(f"| prefill patched / + recorder | {results['prefill_patched_ms']:.1f} / {results['prefill_patched_recorder_ms']:.1f} ms | | | |")


if __name__ == "__main__":
    main()
