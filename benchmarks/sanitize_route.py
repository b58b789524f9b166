"""Launch the GPU routing kernels (Triton, and the CUDA kernel of ``csrc/route_cuda.cu`` where it builds), forward
and backward, with out-of-range group ids and ``validate=False``.

Meant to run under ``compute-sanitizer`` (``--tool memcheck`` and ``--tool racecheck``; see
benchmarks/run_gpu_suite.sh, stage ``sanitize``), with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is
its own allocation and an access past one is reported instead of landing in the allocator's pool. It also checks by
itself, so it is useful without the sanitizer: ``counts`` is a view into a larger buffer filled with a poison value,
and the buffer outside the view must stay poisoned; ids and counts must equal the PyTorch reference's, where group
ids outside ``[-1, G)`` count as -1.

Runs on CUDA when present, else on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` is set here then).
Exits non-zero on the first mismatch. ``--backends cuda`` (or ``triton``) restricts the run to one backend; the CUDA
backend also runs a case with more groups than its shared-memory histogram holds (global atomics), one with
logits at a storage offset that breaks 16-byte alignment (its scalar loads), the lane kernel's tournament top-k
(forward only: through its benchmark option, and the op's own instances on inputs large enough to take them), and the
router variants (GPT-OSS' softmax over the chosen experts; DeepSeek-V3's, GLM-4.5's and Kimi-K2's sigmoid routers on
the chunk kernel, the split kernel's sigmoid instances, and the sigmoid group limit's general form), and the chunk
kernel's softmax routers (Qwen3-Next's top-10 of 512 experts; forward only). The backward of every router variant
runs on CUDA's kernels too, up to 512 experts (the variants above, and 512- and 500-wide rows), the sigmoid routers'
from the chunk kernel's size on with the logits their forward saves.

Usage: ``python benchmarks/sanitize_route.py [--backends triton cuda]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_fastmask import route  # noqa: E402  (after TRITON_INTERPRET is set)
from moe_fastmask.ops import cuda_route, reference  # noqa: E402

POISON = 0x5A5A5A5A
OUT_OF_RANGE = (3, 1000, -2)


def check(num_experts: int, top_k: int, dtype: torch.dtype, group_dtype: torch.dtype, device: str,
          backend: str = "triton", num_groups: int = 2, misaligned: bool = False, backward: bool = True,
          lane_options: tuple[str, ...] | None = None, repeats: int = 4, variant: dict | None = None) -> None:
    """One call (forward, and backward unless told not to) against the reference, on ``repeats`` times a pattern of
    10 group ids; ``lane_options`` (CUDA only, forward only): the lane kernel's benchmark instance with those options
    instead of the op; ``variant``: route's router-variant arguments (``bias=True``: a random one)."""
    gen = torch.Generator().manual_seed(num_experts * 31 + top_k)
    variant = dict(variant or {})
    if variant.get("bias") is True:
        variant["bias"] = torch.randn(num_experts, generator=gen) * 0.1
    renormalize = variant.get("scoring") != "softmax_chosen"
    device_variant = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in variant.items()}
    group = torch.tensor([0, 1, -1, *OUT_OF_RANGE, 1, 0, num_groups - 1] * repeats, dtype=group_dtype)
    num_tokens = group.numel()
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(dtype)
    keep = torch.rand(num_groups, num_experts, generator=gen) < 0.5
    keep[:, :top_k] = True
    buffer = torch.full((num_groups + 2, num_experts), POISON, dtype=torch.int64, device=device)
    counts = buffer[1 : num_groups + 1]
    counts.zero_()

    if misaligned:  # the same values one element into a larger allocation: rows not 16-byte aligned
        storage = torch.empty(num_tokens * num_experts + 1, dtype=dtype, device=device)
        x = storage[1:].view(num_tokens, num_experts)
        x.copy_(logits.to(device))
        x.requires_grad_()
    else:
        x = logits.clone().to(device).requires_grad_()
    if lane_options is not None:
        weights, ids = cuda_route.route_forward(x.detach(), top_k, keep.to(device), group.to(device), counts, True,
                                                variant="lane", _lane_options=lane_options)
        backward = False
    else:
        weights, ids = route(x, top_k, keep.to(device), group.to(device), counts, renormalize, backend,
                             validate=False, **device_variant)
    if backward:
        weights.float().square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()

    where = (f"{backend}: E={num_experts} k={top_k} {dtype} group {group_dtype} G={num_groups}"
             + (" misaligned" if misaligned else "") + (f" lane options {lane_options}" if lane_options else "")
             + (f" {variant.get('scoring')} router, n_group {variant.get('n_group', 1)}" if variant else ""))
    buffer = buffer.cpu()
    if not ((buffer[0] == POISON).all() and (buffer[num_groups + 1] == POISON).all()):
        sys.exit(f"FAIL {where}: the kernel wrote outside counts: {buffer[[0, num_groups + 1]].tolist()}")
    as_minus_one = torch.where((group >= 0) & (group < num_groups), group, -1)
    ref_counts = torch.zeros(num_groups, num_experts, dtype=torch.int64)
    ref_x = logits.clone().requires_grad_()
    ref_weights, ref_ids = reference.route_reference(ref_x, top_k, keep, as_minus_one, ref_counts, renormalize,
                                                     **variant)
    ref_weights.float().square().sum().backward()
    if not torch.equal(ids.cpu(), ref_ids):
        # (sigmoid selection values come from each backend's own exp: a row may take experts of equal values
        # within rounding, and then counts them)
        if variant.get("scoring") != "sigmoid" or not sigmoid_ids_agree(ids.cpu(), ref_ids, logits, keep,
                                                                          as_minus_one, variant):
            sys.exit(f"FAIL {where}: ids differ from the reference")
        ref_counts = torch.zeros(num_groups, num_experts, dtype=torch.int64)
        reference.accumulate_counts(ref_counts, ids.cpu(), as_minus_one)
    if not torch.equal(buffer[1 : num_groups + 1], ref_counts):
        sys.exit(f"FAIL {where}: counts differ from the reference")
    same = (ids.cpu() == ref_ids).all(dim=1)
    torch.testing.assert_close(weights.detach().cpu().float()[same], ref_weights.detach().float()[same], atol=2e-2,
                               rtol=2e-2)
    if backward:
        if not torch.isfinite(x.grad).all():
            sys.exit(f"FAIL {where}: non-finite gradient")
        torch.testing.assert_close(x.grad.cpu().float()[same], ref_x.grad.float()[same], atol=2e-2, rtol=2e-2)
    print(f"ok  {where}: nothing written outside counts; ids, counts, weights{' and gradient' * backward} match the "
          "reference")


def sigmoid_ids_agree(ids, ref_ids, logits, keep, group, variant) -> bool:
    """Whether every row's picks have the reference's picks' selection values (float64) within 1e-5, all allowed."""
    allowed = reference.allowed_experts(logits.shape[0], keep, group)
    values = reference.selection_values(logits.double(), allowed, "sigmoid", variant.get("bias"),
                                        variant.get("n_group", 1), variant.get("topk_group", 1))
    mine, theirs = values.gather(1, ids).sort(dim=1).values, values.gather(1, ref_ids).sort(dim=1).values
    picks_allowed = allowed is None or bool(allowed.gather(1, ids).all())
    return picks_allowed and bool(((mine - theirs).abs() <= 1e-5).all())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=["triton", "cuda"], default=["triton", "cuda"])
    parser.add_argument("--forward-only", action="store_true", help="skip the backward")
    args = parser.parse_args(argv)
    backward = not args.forward_only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, out-of-range group ids {OUT_OF_RANGE}, validate=False")
    cases = [
        (64, 8, torch.bfloat16, torch.int64),
        (60, 8, torch.float16, torch.int32),
        (64, 2, torch.float32, torch.int64),
        (8, 1, torch.float32, torch.int32),
    ]
    if "triton" in args.backends:
        for case in cases:
            check(*case, device, backward=backward)
    if "cuda" in args.backends:
        if device != "cuda" or not cuda_route.is_available():
            print(f"cuda backend skipped: {cuda_route.load_error()[:300]}")
            if args.backends == ["cuda"]:
                sys.exit("FAIL: the CUDA kernel is not available")
            return
        cases += [(128, 16, torch.bfloat16, torch.int64), (256, 8, torch.float32, torch.int32),
                  (16, 16, torch.float16, torch.int64), (32, 8, torch.float16, torch.int32),
                  (128, 8, torch.bfloat16, torch.int64),
                  # (the lane kernel's padded rows at E_PAD = 32 and 128; E = 60 above is E_PAD = 64)
                  (24, 4, torch.bfloat16, torch.int64), (120, 8, torch.float16, torch.int32),
                  # (the split kernel's row-per-lane instances: top-2, and ids staged in shared memory for top-4 up)
                  (8, 2, torch.bfloat16, torch.int64), (12, 3, torch.bfloat16, torch.int32),
                  (7, 5, torch.float32, torch.int64),
                  # (the backward's rows over a whole warp: E_PAD = 512)
                  (512, 10, torch.bfloat16, torch.int64)]
        for case in cases:
            check(*case, device, backend="cuda", backward=backward)
        # more groups than the shared histogram holds: counts through global atomics
        check(64, 8, torch.bfloat16, torch.int64, device, backend="cuda", num_groups=200, backward=backward)
        check(64, 8, torch.bfloat16, torch.int32, device, backend="cuda", misaligned=True, backward=backward)
        check(100, 8, torch.float32, torch.int64, device, backend="cuda", misaligned=True, backward=backward)
        # (float32 rows of 500 experts: the forward on Triton, the backward on CUDA's checked 512-wide instance)
        check(500, 10, torch.float32, torch.int32, device, backend="cuda", misaligned=True, backward=backward)
        # the tournament top-k (the op's from about a hundred thousand rows on), at a size the sanitizer runs quickly
        for options in (("topk8", "tournament", "stage_ids"), ("tournament",)):
            check(64, 8, torch.bfloat16, torch.int64, device, backend="cuda", lane_options=options)
        # and the op's own tournament instances (top-8 at E = 64 and 128, both 16-bit dtypes), at a size that takes
        # them: as many 32-row tiles as a full wave has warps (at most 24 a multiprocessor), forward only
        rows = 32 * 24 * torch.cuda.get_device_properties(0).multi_processor_count + 37
        for num_experts, dtype in ((64, torch.float16), (128, torch.bfloat16), (128, torch.float16)):
            check(num_experts, 8, dtype, torch.int32, device, backend="cuda", backward=False, repeats=-(-rows // 10))
        # the router variants: GPT-OSS' (the lane kernel), DeepSeek-V3's, GLM-4.5's and Kimi-K2's sigmoid routers
        # (at these 40 rows the chunk kernel takes those the split kernel cannot: Kimi-K2's 384 float32 experts, 512
        # in groups of four columns; DeepSeek-V3's and GLM-4.5's run on the split kernel), the split kernel's
        # sigmoid instances (top-16: the group limit by shuffles; groups of 15 experts: its general form, through
        # shared memory)
        for num_experts, top_k, dtype, group_dtype, variant in (
            (128, 4, torch.bfloat16, torch.int32, dict(scoring="softmax_chosen")),
            (256, 8, torch.float32, torch.int64, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4,
                                                      scale=2.5)),
            (160, 8, torch.float32, torch.int32, dict(scoring="sigmoid", bias=True, scale=2.5)),
            (384, 8, torch.float32, torch.int64, dict(scoring="sigmoid", bias=True, scale=2.827)),
            (512, 6, torch.bfloat16, torch.int32, dict(scoring="sigmoid", n_group=4, topk_group=2)),
            (256, 16, torch.float32, torch.int64, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4)),
            (60, 4, torch.bfloat16, torch.int64, dict(scoring="sigmoid", n_group=4, topk_group=2)),
            (96, 8, torch.float16, torch.int32, dict(scale=0.5)),
        ):
            check(num_experts, top_k, dtype, group_dtype, device, backend="cuda", backward=backward, variant=variant)
        check(160, 8, torch.bfloat16, torch.int64, device, backend="cuda", misaligned=True, backward=backward,
              variant=dict(scoring="sigmoid", bias=True))
        # the chunk kernel's softmax routers (16-bit logits from 160 experts, its default from CHUNK_MIN_TOKENS rows
        # on): Qwen3-Next's top-10 of 512 (lists of 16), top-8 of 256 with a scale (lists of 8), misaligned rows
        chunk_repeats = -(-cuda_route.CHUNK_MIN_TOKENS // 10)
        for num_experts, top_k, dtype, group_dtype, variant, misaligned in (
            (512, 10, torch.bfloat16, torch.int32, {}, False),
            (256, 8, torch.float16, torch.int64, dict(scale=2.5), False),
            (256, 16, torch.bfloat16, torch.int64, dict(scoring="softmax_chosen"), True),
        ):
            check(num_experts, top_k, dtype, group_dtype, device, backend="cuda", backward=False, variant=variant,
                  misaligned=misaligned, repeats=chunk_repeats)
        # DeepSeek-V3's and GLM-4.5's sigmoid routers from the chunk kernel's size on, forward and backward: the
        # forward saves the chosen experts' logits, which the backward reads in place of gathering them
        for num_experts, dtype, group_dtype, variant, misaligned in (
            (256, torch.float32, torch.int64, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4, scale=2.5),
             False),
            (160, torch.bfloat16, torch.int32, dict(scoring="sigmoid", bias=True, scale=2.5), True),
        ):
            check(num_experts, 8, dtype, group_dtype, device, backend="cuda", backward=backward, variant=variant,
                  misaligned=misaligned, repeats=chunk_repeats)


if __name__ == "__main__":
    main()
