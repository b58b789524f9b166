"""The training loss alone: cross entropy through a frozen output head, forward + backward to the hidden states.

Implementations compared on the same inputs (bf16 hidden states that need a gradient, a frozen bf16 head):

* ``ours`` — :func:`moe_fastmask.ops.frozen_head_cross_entropy` (chunks of ``--chunk-size`` rows, fp32 logits per
  chunk, the hidden gradient computed in the forward);
* ``liger`` — Liger-Kernel's fused linear cross entropy (``pip install liger-kernel``; skipped where it is missing);
* ``reference`` — :func:`moe_fastmask.ops.cross_entropy.cross_entropy_reference` (all ``[N, vocab]`` fp32 logits at
  once; plain PyTorch).

Reported per (implementation, rows): ms for forward + backward (median of ``triton.testing.do_bench`` where CUDA is
used, of wall-clock repeats on CPU), peak memory above the inputs (CUDA), and the largest difference of the loss and
of the hidden gradient from the reference.

    python benchmarks/bench_loss.py --out DIR                   # CUDA: OLMoE's head (2048 x 50304), 2k-32k rows
    python benchmarks/bench_loss.py --out DIR --tiny            # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

IMPLS = ("ours", "liger", "reference")


def loss_fn(impl: str, chunk_size: int):
    """``f(hidden, weight, targets) -> scalar loss`` of one implementation."""
    from moe_fastmask.ops import frozen_head_cross_entropy
    from moe_fastmask.ops.cross_entropy import cross_entropy_reference

    if impl == "ours":
        return lambda h, w, t: frozen_head_cross_entropy(h, w, t, chunk_size=chunk_size)
    if impl == "reference":
        return lambda h, w, t: cross_entropy_reference(h, w, t)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="mean").float()
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


def measure(impl: str, rows: int, hidden_size: int, vocab: int, device: str, dtype: torch.dtype, chunk_size: int,
            repeats: int) -> dict:
    """Time forward + backward of one implementation and compare its loss and gradient with the reference."""
    gen = torch.Generator(device="cpu").manual_seed(rows)
    hidden0 = (torch.randn(rows, hidden_size, generator=gen) * 0.5).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    fn = loss_fn(impl, chunk_size)

    def step():
        hidden = hidden0.detach().requires_grad_(True)
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss, hidden.grad

    ref_hidden = hidden0.detach().float().requires_grad_(True)
    ref_loss = loss_fn("reference", chunk_size)(ref_hidden, weight.float(), targets)
    ref_loss.backward()
    loss, grad = step()
    result = {
        "impl": impl, "rows": rows, "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
        "loss_abs_diff": abs(float(loss.detach()) - float(ref_loss.detach())),
        "grad_max_abs_diff": float((grad.float() - ref_hidden.grad).abs().max()),
    }
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / (1 << 30)
        result["ms"] = triton.testing.do_bench(step, warmup=5, rep=max(repeats, 1) * 10, return_mode="median")
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        result["ms"] = statistics.median(times)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_loss.json and bench_loss.md")
    parser.add_argument("--tiny", action="store_true", help="CPU, fp32, a toy head: a smoke test")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="response rows (default 2048 8192 32768)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of ours (the train default)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype, hidden_size, vocab, rows = "cpu", torch.float32, 32, 97, args.rows or [64, 300]
    else:
        if not torch.cuda.is_available():
            parser.error("CUDA is not available; use --tiny for the CPU smoke test")
        device, dtype, hidden_size, vocab, rows = "cuda", torch.bfloat16, 2048, 50304, args.rows or [2048, 8192, 32768]
    impls = [i for i in args.impls if i != "liger" or liger_available()]
    if len(impls) < len(args.impls):
        print("liger-kernel is not installed: its rows are skipped")
    results = []
    for n in rows:
        for impl in impls:
            results.append(measure(impl, n, hidden_size, vocab, device, dtype, args.chunk_size, args.repeats))
            r = results[-1]
            peak = f"+{r['peak_extra_gib']:.2f} GiB" if "peak_extra_gib" in r else "- (CPU)"
            print(f"{impl:10s} rows {n:6d}: {r['ms']:8.2f} ms  peak {peak}"
                  f"  |loss - ref| {r['loss_abs_diff']:.2e}  max|grad - ref| {r['grad_max_abs_diff']:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_loss.json").write_text(json.dumps(results, indent=1))
    lines = ["| rows | impl | ms fwd+bwd | peak extra GiB | abs loss diff | max abs grad diff |", "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        peak = f"{r['peak_extra_gib']:.2f}" if "peak_extra_gib" in r else "-"
        lines.append(f"| {r['rows']} | {r['impl']} | {r['ms']:.2f} | {peak} | {r['loss_abs_diff']:.1e} | "
                     f"{r['grad_max_abs_diff']:.1e} |")
    (args.out / "bench_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
