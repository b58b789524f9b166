"""Generation on a random-weight Qwen3-MoE of Qwen3-30B-A3B's size, recording on vs off, on one GPU.

The model: ``Qwen3MoeConfig`` with the released Qwen3-30B-A3B numbers (48 layers, 128 experts, top-8 renormalised,
hidden 2048, expert intermediate 768, 32 query / 4 KV heads of 128, vocab 151,936, untied LM head): about 30.5 B
parameters, 61 GB in bf16, built directly on the GPU with normal-random weights (``--layers`` shrinks it). Prompts
of 128 tokens (half of each batch left-padded by 1/8, groups 0/1 alternating), 64 new tokens, greedy with every
sequence forced to full length (``min_new_tokens``), at batch 16 and 256. For each batch, new tokens per second of
whole calls (second call of each; the first warms up, and captures the engine's graph):

* ``generate``: transformers' ``model.generate`` through the ``hf`` generation backend, unpatched, no recording;
* ``generate+rec``: the same backend with the routing patch and the recorder, as ``analyze`` runs it;
* ``engine``: the static-cache CUDA-graph engine (``graph`` backend), recording off;
* ``engine+rec``: the engine with recording on.

Each recording row checks its counts exactly: the recorded token totals per group equal a recount from the prompts
and the generated tokens, and every counted token has ``top_k`` experts in every layer
(:func:`bench_engine.totals_match_tokens`).

    python benchmarks/bench_family_generate.py --out benchmarks/out     # GPU: under 6 minutes on an H200 (--budget-s)
    python benchmarks/bench_family_generate.py --layers 4 --out /tmp/fg # GPU, a quick check of the script
    python benchmarks/bench_family_generate.py --tiny --out /tmp/fg     # CPU, tiny config

Writes ``family_generate.csv`` and ``family_generate.md`` under ``--out`` and prints the table. ``--budget-s``: no
new measurement starts once the run has taken that long (the rows left out say so).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be  # noqa: E402  (prompts, device sync, the exact-count check)

import moe_fastmask as mf  # noqa: E402
from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings  # noqa: E402
from moe_fastmask.pipeline.generation.engine import StaticCacheEngine  # noqa: E402
from moe_fastmask.pipeline.generation.hf import HFGenerateBackend  # noqa: E402

VARIANTS = ("generate", "generate+rec", "engine", "engine+rec")

# Qwen3-30B-A3B's config.json; the fields Qwen3MoeConfig's defaults get wrong for it are the layer count (24),
# head_dim (hidden / heads = 64), norm_topk_prob (False), rope_theta and the special tokens
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, rms_norm_eps=1e-6,
    max_position_embeddings=40960, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)  # fmt: skip

# A few layers of a few small experts, for a CPU run of the same code
TINY = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
)  # fmt: skip


def build_model(config_kwargs: dict, *, layers: int | None, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight ``Qwen3MoeForCausalLM`` made directly on ``device`` in ``dtype`` (normal-random weights
    from the model's own init, run on the device: seconds for the full size on a GPU)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**config_kwargs)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def id_tokenizer(vocab_size: int, pad_token_id: int, eos_token_id: int):
    """A word-level tokenizer whose token ``i`` is the string ``str(i)``: what the ``hf`` backend needs to pad and
    decode token ids of a model without a tokenizer of its own."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=str(pad_token_id))),
        pad_token=str(pad_token_id), eos_token=str(eos_token_id), padding_side="left",
    )  # fmt: skip
    return tokenizer


def _timed(device: torch.device, fn):
    be.sync(device)
    start = time.perf_counter()
    out = fn()
    be.sync(device)
    return out, time.perf_counter() - start


def measure(model, tokenizer, variant: str, batch: int, args, engine: StaticCacheEngine | None) -> dict:
    """One row: ``variant`` at ``batch`` (a warm-up call, then the timed one)."""
    ids, groups = be.prompts(batch, args.prompt_len, model.config.vocab_size)
    recording = variant.endswith("+rec")
    sampling = SamplingSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    request = GenerationRequest(prompts=ids, sampling=sampling, groups=groups if recording else None, num_groups=2)
    if variant.startswith("generate"):
        if variant == "generate" and mf.is_patched(model):
            mf.remove(model)
        backend = HFGenerateBackend(model, tokenizer)
        # the warm-up needs no more than a few steps: every decode step has the same shapes
        warm = SamplingSettings(max_new_tokens=2, min_new_tokens=2)
        _, first_s = _timed(model.device, lambda: backend.generate(
            GenerationRequest(prompts=ids, sampling=warm, groups=request.groups, num_groups=2)))
        out, wall_s = _timed(model.device, lambda: backend.generate(request))
        patched = mf.is_patched(model)
        backend.close()
        decode_tok_s = None
    else:
        _, first_s = _timed(model.device, lambda: engine.generate(request))  # captures this size's decode graph
        out, wall_s = _timed(model.device, lambda: engine.generate(request))
        t = engine.last_timings
        decode_tok_s = batch * t["decode_steps"] / t["decode_s"] if t.get("decode_s") else None
        patched = True
    new = sum(len(row) for row in out.tokens)
    if new != batch * args.new_tokens:
        raise RuntimeError(f"{variant} at batch {batch} generated {new} tokens, not {batch} x {args.new_tokens}")
    return {
        "variant": variant,
        "batch": batch,
        "patched": patched,
        "recording": recording,
        "new_tok_s": new / wall_s,
        "wall_s": wall_s,
        "decode_tok_s": decode_tok_s,
        "first_call_s": first_s,
        "counts_exact": be.totals_match_tokens(out, ids, groups, args.new_tokens) if recording else None,
    }


def run_benchmark(model, args, log=print) -> pd.DataFrame:
    """Every (variant, batch) row in the order unpatched ``generate``, ``generate`` with recording, engine off / on
    (the engine patches the model; the unpatched rows come first). Rows not started within ``args.budget_s`` of
    this call are kept with ``skipped`` set."""
    begin = time.perf_counter()
    cfg = model.config
    tokenizer = id_tokenizer(cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id)
    rows: list[dict] = []
    engine = None
    for variant in args.variants:
        if variant.startswith("engine") and engine is None:
            # one engine for both settings: recording on and off are separate captured slots
            engine = StaticCacheEngine(model, max_batch_size=max(args.batches), time_phases=True, max_slots=2)
        for batch in args.batches:
            elapsed = time.perf_counter() - begin
            if elapsed > args.budget_s:
                skipped = f"budget ({elapsed:.0f} s > {args.budget_s} s)"
                rows.append({"variant": variant, "batch": batch, "skipped": skipped})
                log(f"{variant:>13} batch {batch:>4}: skipped, over the time budget")
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = measure(model, tokenizer, variant, batch, args, engine)
            # kept with the row: e.g. the engine saying it decodes eagerly (no CUDA graph) and why
            row["notes"] = "; ".join(dict.fromkeys(str(w.message)[:300] for w in caught
                                                  if "StaticCacheEngine" in str(w.message)))  # fmt: skip
            rows.append(row)
            counts = "" if row["counts_exact"] is None else f", counts exact: {row['counts_exact']}"
            notes = f" [{row['notes']}]" if row["notes"] else ""
            log(f"{variant:>13} batch {batch:>4}: {row['new_tok_s']:9.0f} new tok/s ({row['wall_s']:.2f} s){counts}"
                f"{notes}")
    if engine is not None:
        engine.close()
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, header: str) -> str:
    """The rows as a markdown table, each recording row next to its recording-off twin (``x off``)."""
    lines = [header, "", "| variant | batch | new tok/s | x off | decode tok/s | wall s | 1st call s | counts exact | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    done = table[table["skipped"].isna()] if "skipped" in table else table
    speed = {(r.variant, r.batch): r.new_tok_s for r in done.itertuples()}
    for r in table.itertuples():
        if "skipped" in table and isinstance(r.skipped, str):
            lines.append(f"| {r.variant} | {r.batch} | skipped: {r.skipped} | | | | | | |")
            continue
        off = speed.get((r.variant.removesuffix("+rec"), r.batch)) if r.recording else None
        ratio = f"{r.new_tok_s / off:.3f}" if off else ""
        decode = f"{r.decode_tok_s:.0f}" if pd.notna(r.decode_tok_s) else ""
        exact = "" if r.counts_exact is None or pd.isna(r.counts_exact) else str(bool(r.counts_exact))
        lines.append(f"| {r.variant} | {r.batch} | {r.new_tok_s:.0f} | {ratio} | {decode} | {r.wall_s:.2f} | "
                     f"{r.first_call_s:.2f} | {exact} | {r.notes} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 48, the full model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="start no measurement after this many seconds of measuring (default 270)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU in float32: checks the script runs")
    args = parser.parse_args(argv)
    bad = [v for v in args.variants if v.endswith("+rec") and v.removesuffix("+rec") not in args.variants]
    if bad:
        parser.error(f"--variants {bad} need their recording-off twins for the comparison")
    return args


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_family_generate.py needs a CUDA device (or --tiny for a CPU check of the script)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, device, dtype = (TINY, "cpu", torch.float32) if args.tiny else (QWEN3_30B_A3B, "cuda", torch.bfloat16)
    start = time.perf_counter()
    model = build_model(config, layers=args.layers, device=device, dtype=dtype)
    be.sync(model.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    print(f"Qwen3-MoE, {model.config.num_hidden_layers} layers: {params / 1e9:.2f} B parameters, "
          f"{params * dtype.itemsize / 1e9:.1f} GB, built in {build_s:.1f} s on {device_name}", flush=True)  # fmt: skip
    table = run_benchmark(model, args, log=lambda line: print(line, flush=True))
    header = (f"# Qwen3-MoE generation, recording on vs off: {model.config.num_hidden_layers} layers, "
              f"{params / 1e9:.1f} B parameters, {dtype}, {device_name}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}; prompts {args.prompt_len}, new tokens {args.new_tokens}; "
              f"built in {build_s:.0f} s, total {time.perf_counter() - start:.0f} s")  # fmt: skip
    table.to_csv(out_dir / "family_generate.csv", index=False)
    text = markdown(table, header)
    (out_dir / "family_generate.md").write_text(text)
    print("\n" + text + f"written {out_dir / 'family_generate.csv'} and {out_dir / 'family_generate.md'}")
    exact = table["counts_exact"].dropna() if "counts_exact" in table else []
    return 0 if all(bool(x) for x in exact) else 1


if __name__ == "__main__":
    raise SystemExit(main())
