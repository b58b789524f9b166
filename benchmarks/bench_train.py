"""Training-step benchmark: plain transformers expert training vs masked fine-tuning of selected expert slices.

Model: a randomly initialised OLMoE-1B-7B (16 layers, hidden 2048, 64 experts of intermediate 1024, top-8,
vocab 50304) in bf16 on CUDA; ``--tiny``: a 2-layer toy OLMoE in fp32 on CPU (a smoke test).
Batch: ``--batch-size`` x ``--seq-len`` random tokens; the first half of every sequence is the prompt (label -100),
the second half the response; the first half of the batch is safe (group 0), the second half unsafe (group 1).

Modes (each runs in its own process, so peak memory is per mode):

* ``plain`` — plain transformers: every parameter frozen except the fused expert tensors (``gate_up_proj``,
  ``down_proj``) of every layer, ``model(**batch).loss``, AdamW over the expert tensors;
* ``masked`` — the masked fine-tuning step of ``moe-fastmask train``: routers through the fused op with the
  unsafe-group mask, ``--selected`` experts as trainable slices (:mod:`moe_fastmask.integrations.expert_slices`),
  the loss of :class:`moe_fastmask.pipeline.train.ExpertMaskingTrainer` (response tokens, chunked frozen lm_head:
  :func:`moe_fastmask.ops.frozen_head_cross_entropy`), AdamW over the slices only. ``--loss-impl liger``: the same
  response tokens through Liger-Kernel's fused linear cross entropy instead (``pip install liger-kernel``; optional,
  for the comparison only).

The selection: ``top_k`` experts in each of ``selected / top_k`` evenly spaced layers (64 = 8 experts x 8 layers for
the full model), so every selected layer is masked for unsafe tokens.

Reported per mode: ms/step (median of ``--steps`` after ``--warmup``), peak memory (``torch.cuda.max_memory_allocated``
over a whole step) and its split: parameters, gradients, optimizer state, activations kept for backward (memory
after the forward minus what was there before it), and the extra peak of backward and of the optimizer step.

    python benchmarks/bench_train.py --out DIR                 # CUDA: both modes, full-size model
    python benchmarks/bench_train.py --out DIR --tiny          # CPU smoke test
    python benchmarks/bench_train.py --out DIR --modes masked --loss-impl liger   # the loss through Liger-Kernel
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
MODES = ("plain", "masked")
LOSS_IMPLS = ("ours", "liger")


def liger_response_loss(model, batch):
    """The masked mode's loss with Liger-Kernel's fused linear cross entropy on the response tokens (the rows that
    :func:`moe_fastmask.pipeline.train.response_lm_loss` feeds to its chunked frozen-head cross entropy)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
    ).last_hidden_state
    shift_labels = batch["labels"][:, 1:]
    keep = shift_labels != -100
    return liger_fused_linear_cross_entropy(
        hidden[:, :-1][keep], model.lm_head.weight.detach(), shift_labels[keep], reduction="mean"
    ).float()


def olmoe_1b_7b_config(tiny: bool, layers: int | None = None):
    """allenai/OLMoE-1B-7B-0125-Instruct's architecture (``layers``: fewer decoder layers), or a 2-layer toy."""
    from transformers import OlmoeConfig

    if tiny:
        return OlmoeConfig(
            vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=layers or 2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    return OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers or 16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, clip_qkv=None,
        tie_word_embeddings=False, output_router_logits=False,
    )


def bench_selection(config, selected: int):
    from moe_fastmask.pipeline.selection import ExpertSelection

    layers, experts, top_k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    n_layers = max(1, min(layers, selected // top_k))
    chosen_layers = sorted({round(i * layers / n_layers) for i in range(n_layers)})
    pairs = [(layer, (layer * 7 + 3 * j) % experts) for layer in chosen_layers for j in range(top_k)]
    pairs = list(dict.fromkeys(pairs))
    return ExpertSelection(
        num_layers=layers, num_experts=experts, top_k=top_k, experts=pairs,
        masked_layers=[layer for layer in chosen_layers if sum(1 for l, _ in pairs if l == layer) >= top_k],
        method={"mode": "benchmark", "selected": len(pairs)},
    )


def make_batch(config, batch_size: int, seq_len: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100
    groups = torch.tensor([0] * (batch_size // 2) + [1] * (batch_size - batch_size // 2))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, groups.to(device)


def tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run_mode(args) -> dict:
    import torch
    from transformers import OlmoeForCausalLM

    import moe_fastmask as mf
    from moe_fastmask.pipeline.train import enable_gradient_checkpointing, prepare_model, response_lm_loss

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = olmoe_1b_7b_config(args.tiny, args.layers)
    torch.manual_seed(0)
    with device:
        model = OlmoeForCausalLM(config).to(dtype)
    model.config.use_cache = False
    model.train()
    batch, groups = make_batch(config, args.batch_size, args.seq_len, device)
    selection = None
    if args.mode == "plain":
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.requires_grad_(True)
                params.append(p)

        def loss_fn():
            return model(**batch).loss

    else:
        selection = bench_selection(config, args.selected)
        slice_dtype = None if args.slice_dtype == "auto" else getattr(torch, args.slice_dtype)
        params = prepare_model(model, selection, slice_dtype=slice_dtype, memory_efficient=not args.stock_experts)
        if args.checkpoint_layers is not None:
            first = min(selection.by_layer())
            enable_gradient_checkpointing(model, None if args.checkpoint_layers < 0 else args.checkpoint_layers, first)

        def loss_fn():
            with mf.token_groups(model, groups):
                if args.loss_impl == "liger":
                    return liger_response_loss(model, batch)
                if args.loss_chunk_size > 0:
                    return response_lm_loss(model, batch, chunk_size=args.loss_chunk_size)
                return model(**batch).loss

    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0

    times, split = [], {}
    for step in range(args.warmup + args.steps):
        measure = step == args.warmup  # memory split on the first timed step (optimizer state exists by then)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = allocated()
        start = time.perf_counter()
        loss = loss_fn()
        if measure:
            sync()
            after_forward = allocated()
        loss.backward()
        if measure:
            sync()
            peak_backward = peak()
            grads = tensor_bytes(p.grad for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed * 1e3)
        if measure:
            state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
            weights = tensor_bytes(model.parameters())
            split = {
                "peak_gib": peak() / GIB,
                "params_gib": weights / GIB,
                "grads_gib": grads / GIB,
                "optimizer_state_gib": state / GIB,
                "activations_gib": (after_forward - before) / GIB,
                "backward_peak_extra_gib": (peak_backward - after_forward) / GIB,
                "other_at_start_gib": (before - weights - state) / GIB,
            }
        del loss
    result = {
        "mode": args.mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": [args.batch_size, args.seq_len],
        "trainable_parameters": sum(p.numel() for p in params),
        "ms_per_step_median": statistics.median(times),
        "ms_per_step_all": times,
        **split,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    if selection is not None:
        result.update(
            selected_experts=len(selection), masked_layers=selection.masked_layers,
            memory_efficient_experts=not args.stock_experts, loss_chunk_size=args.loss_chunk_size,
            loss_impl=args.loss_impl,
            checkpoint_layers=args.checkpoint_layers, slice_dtype=args.slice_dtype,
        )
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| mode | ms/step (median) | peak GiB | params | grads | optimizer state | activations | backward extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = r["mode"] + (" (liger loss)" if r.get("loss_impl") == "liger" else "")
        cells = [label, f"{r['ms_per_step_median']:.1f}"] + [
            f"{r.get(key, 0.0):.2f}"
            for key in ("peak_gib", "params_gib", "grads_gib", "optimizer_state_gib", "activations_gib", "backward_peak_extra_gib")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench_train.json and bench_train.md")
    parser.add_argument("--tiny", action="store_true", help="2-layer toy model on CPU (smoke test)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: plain, masked")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny: 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (tiny: 32)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (quick checks; not the benchmark)")
    parser.add_argument("--selected", type=int, default=None, help="selected experts (default 64; tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="masked: 0 = the model's own loss")
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, default="ours",
                        help="masked: the response-token loss: ours (chunked frozen head) or liger (Liger-Kernel's "
                        "fused linear cross entropy; needs liger-kernel installed)")
    parser.add_argument("--stock-experts", action="store_true", help="masked: stock frozen-experts implementation")
    parser.add_argument("--checkpoint-layers", type=int, default=None,
                        help="masked: gradient checkpointing on N decoder layers (-1: all)")
    parser.add_argument("--slice-dtype", default="auto", help="masked: dtype of the trainable slices")
    args = parser.parse_args(argv)
    defaults = {"batch_size": (16, 4), "seq_len": (256, 32), "selected": (64, 4), "steps": (10, 2), "warmup": (3, 1)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device (--tiny runs a CPU check of the script)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (out / "bench_train.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "bench_train.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
