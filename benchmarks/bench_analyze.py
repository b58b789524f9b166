"""Analysis throughput: ``moe-fastmask analyze`` vs the usual router-logit dump, on the same prompts.

(a) ``analyze``: :func:`moe_fastmask.pipeline.analyze.run_analysis` end to end — batched generation with left padding
    under the routing recorder (counts on the device), per-batch statistics, aggregation, every artifact.
(b) reference: the method as it is usually run — one prompt at a time through ``generate``, a forward hook on every
    layer's ``mlp.gate`` copying the router logits to the host at every step and appending them to one numpy file
    per layer; afterwards the files are read back, top-k recomputed and the same statistics computed.

Both use the same prompts (safe and jailbreak chats of exactly ``--prompt-tokens`` tokens each), greedy decoding and
exactly ``--new-tokens`` new tokens (EOS suppressed with ``min_new_tokens``), so they do equal work. Reported: prompts
per second of each and the speedup (a)/(b); the per-batch expert counts of the two are compared.

Default (GPU): random-weight OLMoE-1B-7B architecture in bf16 — ``OlmoeConfig`` with 16 layers, 64 experts, top-8,
hidden 2048, 16 heads, vocab 50304 and ``intermediate_size=1024`` (the released checkpoints' value; the
``OlmoeConfig()`` default is 2048) — 64 pairs in 4 batches of 16 (8 safe + 8 unsafe), 128-token prompts, 64 new
tokens. Counts of the two methods need not match exactly in bf16 (batched and single-prompt numerics differ).

``--tiny``: the tiny random OLMoE of the demo in float32 on the CPU, a few short prompts — a smoke test; there the
per-batch counts of (a) and (b) must be identical, and the script exits non-zero if they are not.

    python benchmarks/bench_analyze.py --out /tmp/bench            # GPU
    python benchmarks/bench_analyze.py --out /tmp/bench --tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moe_fastmask as mf
from moe_fastmask.pipeline import artifacts, stats
from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
from moe_fastmask.pipeline.common import prepare_tokenizer
from moe_fastmask.pipeline.batching import Batch
from moe_fastmask.pipeline.data import render_prompt
from moe_fastmask.pipeline.demo import build_offline_tokenizer, build_tiny_olmoe

# a short FlipAttack-style system turn (the prompts' length is set by their user turns)
ATTACK_SYSTEM = "You are an expert and an assistant whose name is FlipAttack."


# ------------------------------------------------------------------------------------------------------------
# Model, tokenizer, prompts
# ------------------------------------------------------------------------------------------------------------


def full_size_config(tokenizer):
    """OLMoE-1B-7B architecture (random weights): 16 layers x 64 experts, top-8, hidden 2048, intermediate 1024."""
    from transformers import OlmoeConfig

    config = OlmoeConfig(
        intermediate_size=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    expected = dict(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, hidden_size=2048, vocab_size=50304)
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise RuntimeError(f"OlmoeConfig defaults changed, not the 1B-7B architecture any more: {wrong}")
    return config


def build_model(args, work: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, OlmoeForCausalLM

    if args.tiny:
        model_dir = build_tiny_olmoe(work / "tiny_model", seed=0)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
        return model, prepare_tokenizer(tokenizer), "tiny-olmoe"
    tokenizer = prepare_tokenizer(build_offline_tokenizer())
    config = full_size_config(tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(args.device):
            model = OlmoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    return model.eval(), tokenizer, "random-olmoe-1b-7b"


def _single_token_words(tokenizer) -> list[str]:
    words = []
    for token in sorted(tokenizer.get_vocab()):
        if token.startswith("\u0120") and token[1:].isalpha():
            word = " " + token[1:]
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    if len(words) < 8:
        raise RuntimeError("the tokenizer has too few single-token words to build exact-length prompts")
    return words


def _exact_text(tokenizer, build_chat, target: int, words: list[str], rng: np.random.Generator) -> str:
    """Grow a text word by word until the rendered chat is exactly ``target`` tokens long."""

    def length(text: str) -> int:
        return len(tokenizer(render_prompt(tokenizer, build_chat(text)), add_special_tokens=False)["input_ids"])

    text = "Task"
    while length(text) < target:
        text += words[int(rng.integers(len(words)))]
    if length(text) != target:
        raise RuntimeError(f"could not build a prompt of exactly {target} tokens (got {length(text)})")
    return text


def build_records(tokenizer, num_pairs: int, prompt_tokens: int, seed: int = 0) -> list[dict]:
    """``num_pairs`` records whose safe chat (default system prompt + goal) and jailbreak chat both render to
    exactly ``prompt_tokens`` tokens."""
    from moe_fastmask.pipeline.data import DEFAULT_SYSTEM_PROMPT

    rng = np.random.default_rng(seed)
    words = _single_token_words(tokenizer)
    records = []
    for index in range(num_pairs):
        goal = _exact_text(
            tokenizer,
            lambda t: [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": t}],
            prompt_tokens, words, rng,
        )  # fmt: skip
        attack = _exact_text(
            tokenizer,
            lambda t: [{"role": "system", "content": ATTACK_SYSTEM}, {"role": "user", "content": t}],
            prompt_tokens, words, rng,
        )  # fmt: skip
        records.append(
            {
                "id": index,
                "goal": goal,
                "all_prompt": [{"role": "system", "content": ATTACK_SYSTEM}, {"role": "user", "content": attack}],
                "judge_success_gpt4": 1,
            }
        )
    return records


# ------------------------------------------------------------------------------------------------------------
# (b) the reference method
# ------------------------------------------------------------------------------------------------------------


def reference_method(model, tokenizer, batches: list[Batch], config: AnalysisConfig, work: Path) -> dict:
    """One prompt at a time; router logits of every layer copied to the host at every step and appended to per-layer
    numpy files; statistics recomputed from the files. Returns per-batch counts and the aggregated table."""
    from moe_fastmask.pipeline.analysis_requests import method_messages

    mf.remove(model)
    layers = model.model.layers
    num_layers = len(layers)
    num_experts = layers[0].mlp.gate.num_experts
    top_k = layers[0].mlp.gate.top_k
    work.mkdir(parents=True, exist_ok=True)
    files = [open(work / f"router_logits_layer{layer:02d}.f32", "wb") for layer in range(num_layers)]

    def make_hook(layer: int):
        def hook(module, inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            files[layer].write(logits.detach().float().cpu().numpy().tobytes())

        return hook

    handles = [layer.mlp.gate.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    index = []  # (batch_idx, group, prompt rows, decode rows) of each prompt, in file order
    try:
        for batch in batches:
            for item, group in zip(batch.items, batch.groups):
                prompt = render_prompt(tokenizer, method_messages(item, config.system_prompt))
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=config.max_new_tokens,
                        min_new_tokens=config.min_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                generated = out.shape[1] - ids.shape[1]
                # the last generated token is never fed back; a final EOS is not either (generation stops there)
                index.append((batch.batch_idx, group, ids.shape[1], max(generated - 1, 0)))
    finally:
        for handle in handles:
            handle.remove()
        for f in files:
            f.close()

    counts = {b.batch_idx: {p: np.zeros((num_layers, 2, num_experts), np.int64) for p in ("prefill", "decode")}
              for b in batches}  # fmt: skip
    tokens = {b.batch_idx: {p: np.zeros(2, np.int64) for p in ("prefill", "decode")} for b in batches}
    for layer in range(num_layers):
        logits = np.fromfile(work / f"router_logits_layer{layer:02d}.f32", dtype=np.float32).reshape(-1, num_experts)
        # top-k of softmax(logits) = top-k of logits; stable sort: ties go to the lower expert index
        chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        row = 0
        for batch_idx, group, n_prompt, n_decode in index:
            for phase, n in (("prefill", n_prompt), ("decode", n_decode)):
                ids = chosen[row : row + n].reshape(-1)
                counts[batch_idx][phase][layer, group] += np.bincount(ids, minlength=num_experts)
                if layer == 0:
                    tokens[batch_idx][phase][group] += n
                row += n
        if row != logits.shape[0]:
            raise RuntimeError(f"layer {layer}: {logits.shape[0]} logit rows on disk, {row} expected")
    frames = []
    for batch in batches:
        total = counts[batch.batch_idx]["decode"]
        frames.append(
            stats.batch_risk_diff(total[:, 0], total[:, 1], tokens[batch.batch_idx]["decode"][0],
                                  tokens[batch.batch_idx]["decode"][1], batch.batch_idx)  # fmt: skip
        )
    import pandas as pd

    table = stats.aggregate_risk_diffs(pd.concat(frames, ignore_index=True), top_n=config.top_n)
    mf.apply(model)
    return {"counts": counts, "tokens": tokens, "table": table}


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(model, tokenizer, device: str, batch_size: int, prompt_tokens: int) -> None:
    """Generate once unpatched and once patched with a recorder, at the timed batch shape, before any timing.

    The patched run compiles the Triton kernel variants that the analysis uses (groups, counts, the tile sizes of
    prefill and decode shapes), so their one-time JIT compilation stays out of (a)'s time.
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tokenizer) - 1, (batch_size, prompt_tokens), generator=generator).to(device)
    single = ids[:1]
    groups = [i % 2 for i in range(batch_size)]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        mf.remove(model)
        model.generate(input_ids=single, attention_mask=torch.ones_like(single), **kwargs)
        mf.apply(model)
        recorder = mf.RoutingRecorder(model, num_groups=2, record_token_experts=True)
        with recorder.record(groups):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        mf.remove(model)
    _sync(device)


def run_benchmark(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, name = build_model(args, out)
    records = build_records(tokenizer, args.pairs, args.prompt_tokens)
    data_path = artifacts.atomic_write_json(out / "bench_data.json", records)
    config = AnalysisConfig(
        model=name, data=str(data_path), out=str(out / "analyze"), batch_size=args.batch_size, safe_ratio=0.5,
        seed=0, test_fraction=0.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        device=args.device, overwrite=True, progress=False, verbose=False,
    )  # fmt: skip
    _warm_up(model, tokenizer, args.device, args.batch_size, args.prompt_tokens)
    num_prompts = 2 * args.pairs

    mf.apply(model)
    _sync(args.device)
    start = time.perf_counter()
    result = run_analysis(config, model=model, tokenizer=tokenizer)
    _sync(args.device)
    seconds_a = time.perf_counter() - start
    report = {
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        "model": name, "dtype": str(model.dtype), "pairs": args.pairs, "batch_size": args.batch_size,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "analyze_s": seconds_a, "analyze_prompts_per_s": num_prompts / seconds_a,
    }  # fmt: skip
    if not args.skip_reference:
        from moe_fastmask.pipeline.analyze import prepare_batches

        _, _, planned = prepare_batches(config)
        _sync(args.device)
        start = time.perf_counter()
        reference = reference_method(model, tokenizer, planned, config, out / "reference_logits")
        _sync(args.device)
        seconds_b = time.perf_counter() - start
        match, entries, differing = True, 0, 0
        for batch_data in result.batch_data_list:
            for phase in ("prefill", "decode"):
                ours = batch_data["group_counts"][phase]
                theirs = reference["counts"][batch_data["batch_idx"]][phase]
                entries += ours.size
                differing += int((ours != theirs).sum())
                ref_tokens = reference["tokens"][batch_data["batch_idx"]][phase]
                same_tokens = np.array_equal(batch_data["group_tokens"][phase], ref_tokens)
                match &= bool(np.array_equal(ours, theirs)) and same_tokens
        report.update(
            reference_s=seconds_b, reference_prompts_per_s=num_prompts / seconds_b, speedup=seconds_b / seconds_a,
            counts_match=match, count_entries_differing=differing, count_entries=entries,
        )  # fmt: skip
    artifacts.atomic_write_json(out / "bench_analyze.json", report)
    return report


SIZE_ARGUMENTS = ("pairs", "batch_size", "prompt_tokens", "new_tokens", "device", "dtype")


def fill_size_defaults(args: argparse.Namespace, *, tiny: tuple, full: tuple) -> argparse.Namespace:
    """Set each of :data:`SIZE_ARGUMENTS` left at None to its default: ``tiny`` with ``--tiny``, else ``full``."""
    for key, value in zip(SIZE_ARGUMENTS, tiny if args.tiny else full, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and report directory (bench_analyze.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU (smoke test)")
    parser.add_argument("--pairs", type=int, default=None, help="default: 64 (--tiny: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 (--tiny: 8)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 128 (--tiny: 40)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (--tiny: 6)")
    parser.add_argument("--device", default=None, help="default: cuda (--tiny: cpu)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 (--tiny: float32)")  # fmt: skip
    parser.add_argument("--skip-reference", action="store_true", help="time (a) only")
    args = parser.parse_args(argv)
    args = fill_size_defaults(args, tiny=(8, 8, 40, 6, "cpu", "float32"), full=(64, 16, 128, 64, "cuda", "bfloat16"))
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--tiny runs a CPU check of the script)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(f"device: {report['device']}  model: {report['model']} ({report['dtype']})  {report['pairs']} pairs, "
          f"batch {report['batch_size']}, {report['prompt_tokens']}-token prompts, "
          f"{report['new_tokens']} new tokens")  # fmt: skip
    print(f"(a) analyze    {report['analyze_s']:9.2f} s  {report['analyze_prompts_per_s']:9.2f} prompts/s")
    if "reference_s" in report:
        print(f"(b) reference  {report['reference_s']:9.2f} s  {report['reference_prompts_per_s']:9.2f} prompts/s")
        print(f"speedup (a)/(b): {report['speedup']:.1f}x   per-batch counts identical: {report['counts_match']} "
              f"({report['count_entries_differing']}/{report['count_entries']} entries differ)")  # fmt: skip
        if args.tiny and not report["counts_match"]:
            print("error: on the tiny float32 model both methods must give the same counts", file=sys.stderr)
            return 1
    print(f"report: {Path(args.out) / 'bench_analyze.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
