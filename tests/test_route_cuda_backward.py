"""The CUDA backward of ``route`` (``backend="cuda"``, ``csrc/route_cuda_backward.cu``) against the closed-form
reference (``reference.route_backward_reference`` in float64) and the reference's autograd.

GPU tests (marked ``gpu``) skip without a CUDA device or without ``nvcc``; a build that fails where both exist fails
them with the compiler's message. Outputs are poisoned before every launch (a value no gradient here comes near), so
an element the kernel does not write shows. The scenarios (random shapes, adversarial values, hand-made rows,
out-of-range group ids, strides and alignments, ids in any order) also run on CPU against the kernel source compiled
for the host with ``g++``, its warps emulated by threads, under AddressSanitizer. The other CPU tests check, where
``nvcc`` exists, that the library compiles for sm_90 without spills and that the backward launcher refuses calls it
does not take before touching a device, and that the Python mirror of the launch arguments matches the C struct.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import cuda_emulation
from conftest import SESSION_SEED, start_sm90_build
from route_cases import adversarial_logits, tolerance

from moe_fastmask import route
from moe_fastmask.ops import cuda_route, reference, triton_route

route_module = importlib.import_module("moe_fastmask.ops.route")

INF = math.inf
NAN = math.nan
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
POISON = 1e4  # |grad_logits| <= 2 max|grad_weights|, far below this for the gradients drawn here
CUDA_ERROR_INVALID_VALUE = 1

gpu = pytest.mark.gpu


# --------------------------------------------------------------------------------------------------------------
# Cases and checks
# --------------------------------------------------------------------------------------------------------------


KINDS = ("distinct", "normal", "ties", "wide", "neg_inf", "nan_inf", "signed_zeros", "subnormal")


def make_keep(G: int, E: int, allowed: int | None, gen: torch.Generator) -> torch.Tensor:
    """Bool [G, E]: each group keeps exactly ``allowed`` experts (None: a random number, at least 1)."""
    keep = torch.zeros(G, E, dtype=torch.bool)
    for g in range(G):
        n = int(torch.randint(1, E + 1, (1,), generator=gen)) if allowed is None else allowed
        keep[g, torch.randperm(E, generator=gen)[:n]] = True
    return keep


def forward_ids(logits, k, keep, group) -> torch.Tensor:
    """The chosen ids as the forward gives them (the tie rule; masked experts last when fewer than k are allowed)."""
    return reference.route_reference(logits, k, keep, group, None, False)[1]


def scaled_tolerance(dtype: torch.dtype, scale: float) -> tuple[float, float]:
    """(atol, rtol) of ``dtype`` for a gradient of weights times ``scale`` (it, and its rounding, scale with it)."""
    atol, rtol = tolerance(dtype)
    return atol * max(1.0, abs(scale)), rtol


def run_cuda(grad, logits, keep, group, ids, renormalize, out, variant="lane", scoring="softmax", scale=1.0) -> None:
    """The CUDA backward, writing into ``out`` (``variant``: see ``cuda_route.BACKWARD_VARIANTS``; ``scoring`` and
    ``scale``: the router variant's)."""
    got = cuda_route.route_backward(grad, logits, keep, group, ids, renormalize, scoring=scoring, scale=scale,
                                    out=out, variant=variant)
    assert got is out
    torch.cuda.synchronize()


def cuda_variant_run(scoring: str, scale: float):
    """A launcher (as ``run_cuda``) for the router variant ``scoring`` / ``scale``."""
    def run(grad, logits, keep, group, ids, renormalize, out):
        run_cuda(grad, logits, keep, group, ids, renormalize, out, scoring=scoring, scale=scale)
    return run


def saved_logits_run(launch, scoring: str, scale: float):
    """A launcher (as ``run_cuda``) of the sigmoid router's backward given the forward's saved logits
    (``chosen_logits``, from reference.chosen_logits_reference on the call's logits) and rows of NaN in place of the
    logits, so that a single logit read shows; ``launch(grad, logits, keep, group, ids, renormalize, out,
    chosen_logits)`` runs the kernel."""
    assert scoring == "sigmoid"

    def run(grad, logits, keep, group, ids, renormalize, out):
        chosen = reference.chosen_logits_reference(logits, ids, keep, group)
        launch(grad, torch.full_like(logits, NAN), keep, group, ids, renormalize, out, chosen)

    return run


def cuda_saved_run(scoring: str, scale: float):
    """A launcher (as ``cuda_variant_run``) for the router variant ``scoring`` / ``scale``: the sigmoid router's
    backward given the saved logits (saved_logits_run), the other variants as cuda_variant_run."""
    if scoring != "sigmoid":
        return cuda_variant_run(scoring, scale)

    def launch(grad, logits, keep, group, ids, renormalize, out, chosen_logits):
        got = cuda_route.route_backward(grad, logits, keep, group, ids, renormalize, scoring=scoring, scale=scale,
                                        out=out, chosen_logits=chosen_logits)
        assert got is out
        torch.cuda.synchronize()

    return saved_logits_run(launch, scoring, scale)


def run_cuda_ids8(grad, logits, keep, group, ids, renormalize, out) -> None:
    """The lane kernel reading the ids a byte each (as the forward writes them for it under autograd)."""
    got = cuda_route.route_backward(grad, logits, keep, group, ids, renormalize, out=out, ids8=ids.to(torch.uint8))
    assert got is out
    torch.cuda.synchronize()


def run_cuda_split(grad, logits, keep, group, ids, renormalize, out) -> None:
    """The row-over-lanes kernel on every call (the lane kernel takes 16-bit E = 32 / 64, k = 8 by default)."""
    run_cuda(grad, logits, keep, group, ids, renormalize, out, variant="split")


def check_against_reference(run, grad, logits, keep, group, ids, renormalize, where="", out=None, scoring="softmax",
                            scale=1.0):
    """``run`` (a launcher: ``run_cuda``, or the host emulation, for the router variant ``scoring`` / ``scale``)
    writes grad_logits into a poisoned output (``out``, or a new contiguous tensor). It must be within the dtype's
    tolerance of the float64 reference, NaN exactly where that is NaN, and exactly 0 on masked experts (renormalised,
    and for the other variants, on unchosen ones too) in rows without NaN."""
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    out.fill_(POISON)
    run(grad, logits, keep, group, ids, renormalize, out)
    exact = reference.route_backward_reference(grad.double(), logits.double(), keep, group, ids, renormalize,
                                               scoring=scoring, scale=scale)
    atol, rtol = scaled_tolerance(logits.dtype, scale)
    torch.testing.assert_close(out.double(), exact, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{where}\n{m}")
    T, E = logits.shape
    zero = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    allowed = reference.allowed_experts(T, keep, group)
    if allowed is not None:
        zero |= ~allowed
    if renormalize or scoring != "softmax":
        zero |= ~torch.zeros_like(zero).scatter_(1, ids, True)
    clean = ~exact.isnan().any(dim=1, keepdim=True)
    assert bool((out[zero & clean] == 0).all()), f"nonzero gradient on a masked or unchosen expert; {where}"
    return out


def adversarial_keep(E: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Bool [4, E]: groups allowing exactly k experts, fewer than k (masked experts chosen), a random number, none."""
    return torch.stack([make_keep(1, E, k, gen)[0], make_keep(1, E, max(1, k // 2), gen)[0],
                        make_keep(1, E, None, gen)[0], torch.zeros(E, dtype=torch.bool)])


def random_group(T: int, G: int, kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    group = torch.randint(-1, G, (T,), generator=gen)
    return group.to(torch.int32) if kind == "int32" else group


# --------------------------------------------------------------------------------------------------------------
# Scenarios: each checks one launcher (``run``) on tensors of ``device`` against the reference. The GPU tests run
# them on the CUDA kernel; test_kernel_source_emulated_on_the_host runs them (smaller) on the same source compiled
# for the host.
# --------------------------------------------------------------------------------------------------------------

SHAPES = [(E, k) for E in (8, 60, 64, 128, 256) for k in (1, 2, 8, 16) if k <= E] + [(32, 8), (384, 10), (512, 10),
                                                                                      (512, 16)]
LANE_SHAPES = [(32, 8), (64, 8)]  # (16-bit logits) the lane kernel's calls


def scenario_random_shapes(run, device, E, k, dtype, sizes, seed):
    """Random logits, masks (none, at least k allowed, exactly k), group ids (none, int32, int64, with -1)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for T in sizes:
        for renorm in (False, True):
            G = rng.choice([1, 2, 5])
            mask = rng.choice(["none", "loose", "tight"])
            keep = None if mask == "none" else make_keep(G, E, k if mask == "tight" else None, gen)
            if mask == "loose":
                keep[:, :k] = True  # at least k allowed
            group = random_group(T, G, rng.choice(["none", "int32", "int64"]), gen)
            logits = adversarial_logits(rng.choice(["distinct", "normal"]), T, E, dtype, gen).to(device)
            keep = None if keep is None else keep.to(device)
            group = None if group is None else group.to(device)
            ids = forward_ids(logits, k, keep, group)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            check_against_reference(run, grad, logits, keep, group, ids, renorm,
                                    where=f"T={T} E={E} k={k} {dtype} mask={mask} renorm={renorm}")


ADVERSARIAL_SHAPES = ((64, 8), (60, 8), (8, 2), (128, 16), (16, 16), (256, 8), (32, 4), (32, 8), (128, 8), (512, 10))


def scenario_adversarial(run, device, kind, dtype, T, shapes, seed):
    """Values of ``kind``; masks allowing exactly k, fewer than k (masked experts chosen) or no expert (all-masked
    rows); group ids -2, G and G + 1 (no mask); also without a mask."""
    gen = torch.Generator().manual_seed(seed)
    G = 4
    for E, k in shapes:
        keep = adversarial_keep(E, k, gen).to(device)
        group = torch.randint(-2, G + 2, (T,), generator=gen).to(device)
        logits = adversarial_logits(kind, T, E, dtype, gen).to(device)
        ids = forward_ids(logits, k, keep, group)
        grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
        for renorm in (False, True):
            check_against_reference(run, grad, logits, keep, group, ids, renorm,
                                    where=f"{kind} E={E} k={k} {dtype} renorm={renorm}")
            check_against_reference(run, grad, logits, None, None, forward_ids(logits, k, None, None), renorm,
                                    where=f"{kind} E={E} k={k} {dtype} renorm={renorm} no mask")


# (scoring, renormalize, scale) of the router variants other than the default: the sigmoid routers (DeepSeek-V3's:
# renormalised, scaled), GPT-OSS' softmax over the chosen experts, scaled softmax routers
ROUTER_VARIANTS = (("sigmoid", True, 2.5), ("sigmoid", False, 1.0), ("softmax_chosen", False, 1.0),
                   ("softmax", True, 0.5), ("softmax", False, -3.0))
VARIANT_SHAPES = ((256, 8), (160, 8), (384, 8), (512, 10), (64, 8), (60, 4), (128, 16), (8, 2))


def scenario_router_variants(make_run, device, dtype, kinds, T, shapes, seed):
    """The other router variants' gradients (``make_run(scoring, scale)`` gives the launcher): ids as their forward
    chooses them (the sigmoid router with a selection bias, and DeepSeek-V3's group limit where E allows it), keep
    masks allowing exactly k, fewer than k (masked experts chosen) or none, group ids in and out of range."""
    gen = torch.Generator().manual_seed(seed)
    G = 4
    for E, k in shapes:
        keep = adversarial_keep(E, k, gen).to(device)
        for kind in kinds:
            logits = adversarial_logits(kind, T, E, dtype, gen).to(device)
            group = torch.randint(-2, G + 2, (T,), generator=gen).to(device)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            for scoring, renorm, scale in ROUTER_VARIANTS:
                choice = {}
                if scoring == "sigmoid":
                    choice = dict(bias=(torch.randn(E, generator=gen) * 0.1).to(device))
                    if E % 8 == 0 and E // 8 >= 2 and k <= 4 * (E // 8):
                        choice.update(n_group=8, topk_group=4)
                for masked in (True, False):
                    kg = (keep, group) if masked else (None, None)
                    ids = reference.route_reference(logits, k, *kg, None, renorm, scoring=scoring, scale=scale,
                                                    **choice)[1]
                    check_against_reference(make_run(scoring, scale), grad, logits, *kg, ids, renorm,
                                            where=f"{scoring} renorm={renorm} scale={scale} {kind} E={E} k={k} "
                                                  f"{dtype} mask={masked}",
                                            scoring=scoring, scale=scale)


# (E, top_k) of the sigmoid router's own kernel: every lane layout (1, 3, 5, 8, 10 and 16 entries a row take 32, 8,
# 4, 4, 2 and 2 rows a warp step), rows that are not whole 16-byte chunks (7, 13, 33 experts of 16-bit logits)
SIGMOID_ROW_SHAPES = ((7, 1), (13, 3), (33, 5), (100, 16), (384, 8), (160, 8), (512, 10))


def scenario_sigmoid_rows(make_run, device, T, seed):
    """The sigmoid router's backward on every lane layout, renormalised or not, masked or not, into outputs that start
    on and off a 16-byte boundary (a step's zeros then start and end with element stores): within tolerance of the
    reference, 0 off the chosen experts, and nothing written outside the output."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.5
    for dtype in DTYPES:
        for E, k in SIGMOID_ROW_SHAPES:
            logits = (torch.randn(T, E, generator=gen) * 3).to(dtype).to(device)
            keep = adversarial_keep(E, k, gen).to(device)
            group = torch.randint(-1, 5, (T,), generator=gen).to(device)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            for renorm in (False, True):
                for masked in (True, False):
                    kg = (keep, group) if masked else (None, None)
                    ids = reference.route_reference(logits, k, *kg, None, renorm, scoring="sigmoid", scale=scale)[1]
                    for offset in (0, 1):
                        buffer = torch.full((T * E + 2 * offset,), POISON, dtype=dtype, device=device)
                        out = buffer[offset : offset + T * E].view(T, E)
                        where = f"sigmoid rows E={E} k={k} {dtype} renorm={renorm} mask={masked} offset={offset}"
                        check_against_reference(make_run("sigmoid", scale), grad, logits, *kg, ids, renorm,
                                                where=where, out=out, scoring="sigmoid", scale=scale)
                        outside = torch.cat([buffer[:offset], buffer[offset + T * E :]])
                        assert bool((outside == torch.tensor(POISON, dtype=dtype)).all()), f"written outside; {where}"


def scenario_examples(run, device):
    """Hand-made rows: a NaN on a masked expert does not reach the row; NaN / +inf / all--inf rows are NaN (with
    renormalisation only on the chosen experts); a chosen masked expert gets 0."""
    keep = torch.tensor([[True, True, False, True], [False, False, False, False]], device=device)
    for dtype in DTYPES:
        logits = torch.tensor([[1.0, 2.0, NAN, 0.5],     # group 0: the NaN is masked
                               [1.0, NAN, 0.0, 0.5],     # group 0: NaN allowed
                               [INF, 0.0, 1.0, 2.0],     # group 0: +inf allowed
                               [-INF, -INF, 3.0, -INF],  # group 0: allowed all -inf
                               [1.0, 2.0, 3.0, 4.0],     # group 1: everything masked
                               [4.0, -1.0, 9.0, 0.0]],   # group 0, k = 4 chooses the masked expert 2
                              dtype=dtype, device=device)
        group = torch.tensor([0, 0, 0, 0, 1, 0], device=device)
        ids = forward_ids(logits, 3, keep, group)
        ids4 = forward_ids(logits, 4, keep, group)
        assert ids4[5].tolist() == [0, 3, 1, 2]
        grad = torch.tensor([[0.5, -1.0, 2.0]] * 6, dtype=dtype, device=device)
        grad4 = torch.tensor([[0.5, -1.0, 2.0, 3.0]] * 6, dtype=dtype, device=device)
        for renorm in (False, True):
            got = check_against_reference(run, grad, logits, keep, group, ids, renorm, where=f"{dtype} {renorm}")
            assert not got[0].isnan().any() and got[0, 2] == 0
            for row in (1, 2, 3, 4):
                nan = got[row].isnan()
                assert bool(nan.all()) if not renorm else nan.tolist() == [e in ids[row] for e in range(4)]
            got = check_against_reference(run, grad4, logits, keep, group, ids4, renorm, where=f"{dtype} {renorm} k=4")
            assert got[5, 2] == 0


def scenario_out_of_range_groups(run, device, group_dtype, repeat, seed):
    """Ids outside [0, G) mean no mask; keep is a view into a buffer whose rows before and after mask everything,
    so a read outside keep would turn the row into NaN."""
    G, k = 3, 8
    bad = [3, 4, 1000, -2, 2**31 - 1, -(2**31)] + ([2**32 + 1, -(2**40), 2**32] if group_dtype == torch.int64 else [])
    gen = torch.Generator().manual_seed(seed)
    for E in (64, 60, 256, 500):
        group = torch.tensor(([0, 1, 2, -1] + bad) * repeat, dtype=group_dtype, device=device)
        T = group.numel()
        buffer = torch.zeros(G + 2, E, dtype=torch.bool)
        buffer[1 : G + 1] = make_keep(G, E, None, gen) | (torch.arange(E) < k)
        keep = buffer.to(device)[1 : G + 1]
        assert keep.is_contiguous()
        for dtype in DTYPES:
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device)
            ids = forward_ids(logits, k, keep, group)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            for renorm in (False, True):
                got = check_against_reference(run, grad, logits, keep, group, ids, renorm, where=f"E={E} {dtype}")
                assert not got.isnan().any()


LAYOUTS = ["transposed", "sliced", "offset", "offset_8_bytes", "padded_rows", "partial_chunks", "misaligned_keep",
           "misaligned_out", "out_offset_8_bytes", "wide_padded_rows", "wide_partial_chunks"]


def scenario_layout(run, device, layout, T, seed):
    """Any logits strides and alignments (16- and 8-byte accesses only where they are whole and aligned), a keep mask
    that is not 4-byte aligned, an output that is not 16-byte aligned (8-byte, or not even that)."""
    gen = torch.Generator().manual_seed(seed)
    E, k, G = 64, 8, 3
    for dtype in DTYPES:
        if layout == "transposed":
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device).t().contiguous().t()
        elif layout == "sliced":
            logits = torch.randn(T, E + 1, generator=gen).to(dtype).to(device)[:, :E]
        elif layout == "offset":
            logits = torch.randn(T * E + 1, generator=gen).to(dtype).to(device)[1:].view(T, E)
        elif layout == "offset_8_bytes":  # 8-byte loads, not 16
            n = 8 // dtype.itemsize
            logits = torch.randn(T * E + n, generator=gen).to(dtype).to(device)[n:].view(T, E)
            assert logits.data_ptr() % 16 == 8
        elif layout == "padded_rows":  # rows 16-byte aligned, 144 / 288 bytes apart
            logits = torch.randn(T, 72, generator=gen).to(dtype).to(device)[:, :E]
        elif layout == "partial_chunks":  # E = 60 of aligned 64-wide rows: whole chunks vectorised, the last not
            logits = torch.randn(T, 64, generator=gen).to(dtype).to(device)[:, :60]
        elif layout == "wide_padded_rows":  # a row over a whole warp (E = 512), rows 16-byte aligned, 520 apart
            logits = torch.randn(T, 520, generator=gen).to(dtype).to(device)[:, :512]
        elif layout == "wide_partial_chunks":  # E = 500 of 512-wide rows: the checked instance of the widest rows
            logits = torch.randn(T, 512, generator=gen).to(dtype).to(device)[:, :500]
        else:
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device)
        E_here = logits.shape[1]
        keep = make_keep(G, E_here, None, gen)
        keep[:, :k] = True
        keep = keep.to(device)
        if layout == "misaligned_keep":
            keep = torch.zeros(G * E_here + 1, dtype=torch.bool, device=device)[1:].view(G, E_here).copy_(keep)
            assert keep.data_ptr() % 4 != 0
        out = None
        if layout in ("misaligned_out", "out_offset_8_bytes"):
            n = 1 if layout == "misaligned_out" else 8 // dtype.itemsize
            out = torch.empty(T * E_here + n, dtype=dtype, device=device)[n:].view(T, E_here)
            assert out.data_ptr() % 16 == (n * dtype.itemsize) % 16
        group = torch.randint(-1, G, (T,), generator=gen).to(device)
        ids = forward_ids(logits, k, keep, group)
        grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
        for renorm in (False, True):
            check_against_reference(run, grad, logits, keep, group, ids, renorm, where=f"{layout} {dtype} {renorm}",
                                    out=out)


def scenario_any_ids(run, device, T, seed):
    """Chosen ids in any order (not the top-k)."""
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        for E, k in ((64, 8), (8, 3), (256, 16), (512, 10)):
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device)
            ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :k].to(device)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            for renorm in (False, True):
                check_against_reference(run, grad, logits, None, None, ids, renorm, where=f"any ids {dtype} E={E}")


def scenario_load_store(run_ablation, device, seed):
    """The loads-and-stores-only instance (``_ablation="load_store"``, benchmarking): every element of the output,
    poisoned before, holds its logit bit for bit, on row counts with a partial last tile and several tiles per warp,
    with group ids in and out of range. ``run_ablation(grad, logits, keep, group, ids8, out)`` launches it."""
    gen = torch.Generator().manual_seed(seed)
    for T in (1, 37, 70, 32 * 9, 32 * 9 + 5):
        logits = adversarial_logits("normal", T, 64, torch.bfloat16, gen).to(device)
        keep = make_keep(3, 64, 8, gen).to(device)
        group = torch.randint(-1, 4, (T,), generator=gen).to(device)
        ids8 = forward_ids(logits, 8, keep, group).to(torch.uint8)
        grad = torch.randn(T, 8, generator=gen).to(torch.bfloat16).to(device)
        out = torch.full_like(logits, POISON)
        run_ablation(grad, logits, keep, group, ids8, out)
        assert torch.equal(out.view(torch.int16), logits.view(torch.int16)), f"load_store T={T}"


def scenario_invalid_ids(run, device, T, seed, scoring="softmax", scale=1.0):
    """Ids outside [0, E) (negative, E, far above) contribute nothing: each row equals the reference on its valid
    entries alone (renormalised: over those only); ``run`` runs the router variant ``scoring`` / ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        for E, k in ((64, 8), (32, 8), (60, 8)):
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device)
            keep = make_keep(2, E, None, gen)
            keep[:, :k] = True
            keep = keep.to(device)
            group = torch.randint(-1, 2, (T,), generator=gen).to(device)
            ids = forward_ids(logits, k, keep, group).cpu()
            bad = torch.rand(T, k, generator=gen) < 0.3
            bad[0] = True  # a row without a valid id
            ids[bad] = torch.tensor([-1, E, 2**40, -(2**33)])[torch.randint(0, 4, (int(bad.sum()),), generator=gen)]
            ids = ids.to(device)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            for renorm in (False, True):
                out = torch.full((T, E), POISON, dtype=dtype, device=device)
                run(grad, logits, keep, group, ids, renorm, out)
                atol, rtol = scaled_tolerance(dtype, scale)
                for row in range(T):
                    valid = ~bad[row].to(device)
                    exact = reference.route_backward_reference(
                        grad[row : row + 1, valid].double(), logits[row : row + 1].double(), keep,
                        group[row : row + 1], ids[row : row + 1, valid], renorm, scoring=scoring, scale=scale)
                    torch.testing.assert_close(out[row : row + 1].double(), exact, atol=atol, rtol=rtol,
                                               equal_nan=True, msg=lambda m: f"invalid ids: row {row} E={E}\n{m}")


def scenario_extreme_grads(run, device, T, seed):
    """Incoming grads of +-inf, NaN, near the dtype's largest and smallest values, and zeros among normal ones (the
    lane kernel's bfloat16 products change form for a scale beyond bfloat16's range), and a row of grads near the
    largest value with opposite signs, whose g - dot overflows float32 (the kernels take w g - w dot)."""
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        extremes = torch.tensor([INF, -INF, NAN, big * 0.9, -big * 0.3, big * 0.05, 1e-30, 0.0])
        for E, k in LANE_SHAPES + [(60, 8)]:
            logits = torch.randn(T, E, generator=gen).to(dtype).to(device)
            keep = make_keep(2, E, None, gen)
            keep[:, :k] = True  # (the reference logit of the lane kernel's one-pass sum is allowed: the sum is >= 1)
            keep = keep.to(device)
            group = torch.randint(-1, 2, (T,), generator=gen).to(device)
            ids = forward_ids(logits, k, keep, group)
            grad = torch.randn(T, k, generator=gen)
            pick = torch.rand(T, k, generator=gen) < 0.15
            grad[pick] = extremes[torch.randint(0, len(extremes), (int(pick.sum()),), generator=gen)]
            # a row whose g - dot lies beyond float32's range while every dz lies within it (bfloat16)
            grad[1] = -big * 0.9
            grad[1, k - 1] = big * 0.9
            grad = grad.to(dtype).to(device)
            for renorm in (False, True):
                check_against_reference(run, grad, logits, keep, group, ids, renorm,
                                        where=f"extreme grads E={E} {dtype} renorm={renorm}")
            # whole rows near the largest value: a finite dot (and scale) beyond half of bfloat16's range. Without
            # renormalisation or a mask: where the chosen experts hold all of a row's probability, equal grads cancel
            # (g - dot = 0 up to fp32's rounding of dot, far above atol)
            # (expert 0 ahead in those rows: sum ~ 2, so |dot| / sum exceeds 2^126 in bfloat16)
            grad[::7] = big * 0.95
            logits[::7, 0] = 4.0
            ids = forward_ids(logits, k, None, None)
            check_against_reference(run, grad, logits, None, None, ids, False, where=f"large rows E={E} {dtype}")


def scenario_rounding(run, device, T, seed, ulps):
    """Without renormalisation each unchosen expert's dz = -p dot is within ``ulps`` times the dtype's unit roundoff
    (2^-8 relative for bfloat16, 2^-11 for float16) of the exact value, up to fp32's rounding of dot: 1 for a kernel
    that rounds each dz once, 2 for the lane kernel's bfloat16 rows (their softmax terms kept as bfloat16 between the
    passes). (A chosen expert's dz = p (g - dot) can cancel, so its error has no such relative bound; the tolerance
    scenarios cover it.)"""
    gen = torch.Generator().manual_seed(seed)
    for dtype, unit in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        for E, k in LANE_SHAPES:
            logits = torch.randn(T, E, generator=gen).mul(2).to(dtype).to(device)
            ids = forward_ids(logits, k, None, None)
            grad = torch.randn(T, k, generator=gen).to(dtype).to(device)
            out = torch.full((T, E), POISON, dtype=dtype, device=device)
            run(grad, logits, None, None, ids, False, out)
            exact = reference.route_backward_reference(grad.double(), logits.double(), None, None, ids, False)
            prob = torch.softmax(logits.double(), dim=1)
            # fp32's error in dot = sum_s g_s p_s: at most a few units of 2^-24 of sum_s |g_s| p_s
            dot_slack = 2.0**-20 * (grad.double().abs() * prob.gather(1, ids)).sum(dim=1, keepdim=True)
            bound = ulps[dtype] * unit * (1.02 * exact.abs() + torch.finfo(dtype).tiny) + prob * dot_slack
            unchosen = torch.ones_like(exact, dtype=torch.bool).scatter_(1, ids, False)
            worst = ((out.double() - exact).abs() / bound)[unchosen].max().item()
            assert worst <= 1.0, f"E={E} {dtype}: error {worst:.3f} x the bound of {ulps[dtype]} roundings"


# --------------------------------------------------------------------------------------------------------------
# GPU: the kernel against the reference
# --------------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E, k", SHAPES, ids=[f"E{e}-k{k}" for e, k in SHAPES])
def test_random_shapes_against_reference(cuda_kernel, E, k, dtype):
    scenario_random_shapes(run_cuda, "cuda", E, k, dtype, (1, 31, 1000, 4099), SESSION_SEED + E * 131 + k)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_values_against_reference(cuda_kernel, kind, dtype):
    scenario_adversarial(run_cuda, "cuda", kind, dtype, 517, ADVERSARIAL_SHAPES, SESSION_SEED + sum(map(ord, kind)))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_variants_against_reference(cuda_kernel, dtype):
    """The sigmoid routers, the softmax over the chosen experts and scaled softmax routers (the row-over-lanes kernel,
    also on the lane kernel's shapes, which it leaves to the other)."""
    kinds = ("normal", "wide", "nan_inf", "ties", "neg_inf")
    scenario_router_variants(cuda_variant_run, "cuda", dtype, kinds, 517, VARIANT_SHAPES, SESSION_SEED + 61)
    # the sigmoid router given the forward's saved logits (the other variants as above)
    scenario_router_variants(cuda_saved_run, "cuda", dtype, kinds, 517, VARIANT_SHAPES, SESSION_SEED + 62)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_split_kernel_on_the_lane_kernels_calls(cuda_kernel, dtype):
    """variant="split" keeps the row-over-lanes kernel tested on the calls the lane kernel takes by default."""
    for E, k in LANE_SHAPES:
        scenario_random_shapes(run_cuda_split, "cuda", E, k, dtype, (1, 31, 1000), SESSION_SEED + E * 17)
    for kind in KINDS:
        scenario_adversarial(run_cuda_split, "cuda", kind, dtype, 517, LANE_SHAPES, SESSION_SEED + sum(map(ord, kind)))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lane_kernel_with_one_byte_ids(cuda_kernel, dtype):
    """ids8 (the forward's one-byte copy of the ids) gives the same gradient as the int64 ids."""
    for E, k in LANE_SHAPES:
        scenario_random_shapes(run_cuda_ids8, "cuda", E, k, dtype, (1, 31, 1000, 4099), SESSION_SEED + E * 23)
    for kind in KINDS:
        scenario_adversarial(run_cuda_ids8, "cuda", kind, dtype, 517, LANE_SHAPES, SESSION_SEED + sum(map(ord, kind)))
    logits = torch.randn(9, 64, device="cuda", dtype=dtype)
    ids = forward_ids(logits, 8, None, None)
    grad = torch.randn(9, 8, device="cuda", dtype=dtype)
    with pytest.raises(ValueError, match="ids8"):
        cuda_route.route_backward(grad, logits, None, None, ids, False, ids8=ids.to(torch.int32))
    with pytest.raises(ValueError, match="ids8"):
        cuda_route.route_backward(grad, logits, None, None, ids, False, ids8=ids[:, :4].to(torch.uint8))


@gpu
def test_load_store_ablation_copies_the_logits(cuda_kernel):
    """The benchmark's loads-and-stores-only backward writes the logits back out as the gradient."""

    def run_ablation(grad, logits, keep, group, ids8, out):
        cuda_route.route_backward(grad, logits, keep, group, ids8.to(torch.int64), False, out=out, ids8=ids8,
                                  _ablation="load_store")

    scenario_load_store(run_ablation, "cuda", SESSION_SEED + 9)


def test_load_store_ablation_refuses_other_calls():
    """The loads-and-stores-only backward takes the lane kernel's bf16, E=64, masked, one-byte-id calls only, and
    names its argument otherwise (before looking for the kernel, so on any machine)."""
    logits = torch.randn(64, 64).to(torch.bfloat16)
    keep = torch.ones(2, 64, dtype=torch.bool)
    ids = torch.arange(8).expand(64, 8).contiguous()
    grad = torch.ones(64, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="_ablation must be one of"):
        cuda_route.route_backward(grad, logits, keep, None, ids, False, ids8=ids.to(torch.uint8), _ablation="topk")
    good = dict(grad=grad, logits=logits, keep=keep, ids8=ids.to(torch.uint8), variant="lane")
    for bad in (dict(ids8=None), dict(keep=None), dict(logits=logits.half(), grad=grad.half()),
                dict(logits=torch.randn(64, 32).to(torch.bfloat16)), dict(variant="split")):
        args = good | bad
        with pytest.raises(ValueError, match="_ablation 'load_store'"):
            cuda_route.route_backward(args["grad"], args["logits"], args["keep"], None, ids, False,
                                      ids8=args["ids8"], variant=args["variant"], _ablation="load_store")


@gpu
def test_sigmoid_rows_on_every_lane_layout(cuda_kernel):
    """The sigmoid router's own kernel: every rows-a-warp-step layout, outputs off a 16-byte boundary."""
    for T in (1, 37, 4099):
        scenario_sigmoid_rows(cuda_variant_run, "cuda", T, SESSION_SEED + 71 + T)
        scenario_sigmoid_rows(cuda_saved_run, "cuda", T, SESSION_SEED + 72 + T)  # (given the saved logits)


@gpu
def test_invalid_ids_contribute_nothing(cuda_kernel):
    scenario_invalid_ids(run_cuda, "cuda", 67, SESSION_SEED + 15)
    scenario_invalid_ids(run_cuda_split, "cuda", 67, SESSION_SEED + 16)
    scenario_invalid_ids(cuda_variant_run("sigmoid", 2.5), "cuda", 67, SESSION_SEED + 17, scoring="sigmoid", scale=2.5)
    scenario_invalid_ids(cuda_saved_run("sigmoid", 2.5), "cuda", 67, SESSION_SEED + 18, scoring="sigmoid", scale=2.5)


@gpu
def test_saved_logits_are_the_sigmoid_routers_and_checked(cuda_kernel):
    """route_backward's chosen_logits: the sigmoid router's alone, float32 of the ids' shape on the logits' device
    (ValueError naming it); route_forward writes them for the calls saves_chosen_logits accepts only."""
    T, E, k = 64, 160, 8
    logits = torch.randn(T, E, device="cuda")
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).cuda()
    grad = torch.randn(T, k, device="cuda")
    chosen = torch.randn(T, k, device="cuda")
    with pytest.raises(ValueError, match="chosen_logits is the sigmoid router's"):
        cuda_route.route_backward(grad, logits, None, None, ids, False, chosen_logits=chosen)
    for bad in (chosen.double(), chosen[:, :4], chosen.cpu()):
        with pytest.raises(ValueError, match="chosen_logits must be"):
            cuda_route.route_backward(grad, logits, None, None, ids, False, scoring="sigmoid", chosen_logits=bad)
    big = torch.randn(cuda_route.CHUNK_MIN_TOKENS, E, device="cuda")
    assert cuda_route.saves_chosen_logits(big, k, scoring="sigmoid")
    saved = torch.full((big.shape[0], k), NAN, device="cuda")
    _, big_ids = cuda_route.route_forward(big, k, None, None, None, True, scoring="sigmoid", chosen_logits=saved)
    torch.testing.assert_close(saved, reference.chosen_logits_reference(big, big_ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="chosen_logits must be"):
        cuda_route.route_forward(big, k, None, None, None, True, scoring="sigmoid", chosen_logits=saved[:, :4])
    for args, kwargs in (((logits, k), dict(scoring="sigmoid")),  # (under the chunk kernel's size: split)
                         ((big, k), dict(scoring="sigmoid", variant="chunk")),  # (not the default variant)
                         ((big.bfloat16(), k), dict(scoring="softmax"))):
        with pytest.raises(ValueError, match="written by the chunk kernel's sigmoid router alone"):
            cuda_route.route_forward(*args, None, None, None, True, chosen_logits=saved[: args[0].shape[0]],
                                     **kwargs)


@gpu
def test_extreme_incoming_grads(cuda_kernel):
    for seed, run in enumerate((run_cuda, run_cuda_ids8, run_cuda_split)):
        scenario_extreme_grads(run, "cuda", 1000, SESSION_SEED + 31 + seed)


@gpu
def test_each_gradient_rounded_at_most_twice(cuda_kernel):
    """The lane kernel's bfloat16 rows round an unchosen expert's dz twice (the kept term, then dz); everything else
    once."""
    scenario_rounding(run_cuda, "cuda", 4099, SESSION_SEED + 41, {torch.bfloat16: 2, torch.float16: 1})
    scenario_rounding(run_cuda_split, "cuda", 4099, SESSION_SEED + 42, {torch.bfloat16: 1, torch.float16: 1})


@gpu
def test_nan_and_masked_examples(cuda_kernel):
    scenario_examples(run_cuda, "cuda")


@gpu
@pytest.mark.parametrize("group_dtype", [torch.int64, torch.int32], ids=str)
def test_out_of_range_groups_never_read_outside_keep(cuda_kernel, group_dtype):
    scenario_out_of_range_groups(run_cuda, "cuda", group_dtype, 41, SESSION_SEED + 3)


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_and_misaligned_tensors(cuda_kernel, layout):
    scenario_layout(run_cuda, "cuda", layout, 301, SESSION_SEED + 5)


@gpu
def test_any_ids_and_many_rows(cuda_kernel):
    """Ids in any order, and more rows than one resident wave of blocks covers (the grid-stride loop)."""
    scenario_any_ids(run_cuda, "cuda", 1000, SESSION_SEED + 7)
    gen = torch.Generator().manual_seed(SESSION_SEED + 8)
    T, E, k = 300_001, 64, 8
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(T, E, generator=gen).to(dtype).cuda()
        keep = (torch.rand(4, E, generator=gen) < 0.7).cuda()
        keep[:, :k] = True
        group = torch.randint(-1, 4, (T,), generator=gen).cuda()
        grad = torch.randn(T, k, generator=gen).to(dtype).cuda()
        ids = forward_ids(logits, k, keep, group)
        for renorm in (False, True):
            check_against_reference(run_cuda, grad, logits, keep, group, ids, renorm,
                                    where=f"T={T} {dtype} renorm={renorm}")


@gpu
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_route_gradient_end_to_end(cuda_kernel, monkeypatch, dtype, renorm):
    """(weights * g).sum().backward() through route(backend="cuda") runs the CUDA backward (Triton's is made to fail;
    the size below which route prefers Triton's backward set to 0, so that these small calls take the CUDA one) and
    equals the reference's autograd in float64."""
    def no_triton(*args, **kwargs):
        raise AssertionError("the cuda backend ran the Triton backward")

    monkeypatch.setattr(triton_route, "route_backward", no_triton)
    monkeypatch.setattr(cuda_route, "BACKWARD_MIN_TOKENS", 0)
    gen = torch.Generator().manual_seed(SESSION_SEED + 9)
    for T, E, k in ((77, 64, 8), (1000, 60, 4), (33, 256, 16), (5, 8, 8), (40, 512, 10)):
        logits = torch.randn(T, E, generator=gen).to(dtype).cuda()
        keep = (torch.rand(2, E, generator=gen) < 0.6).cuda()
        keep[:, :k] = True
        group = torch.randint(-1, 2, (T,), generator=gen).cuda()
        grad_out = torch.randn(T, k, generator=gen).cuda()
        x = logits.clone().requires_grad_()
        weights, ids = route(x, k, keep, group, None, renorm, "cuda")
        (weights * grad_out.to(dtype)).sum().backward()
        ref_x = logits.double().requires_grad_()
        ref_w, ref_ids = reference.route_reference(ref_x, k, keep, group, None, renorm)
        (ref_w * grad_out.to(dtype).double()).sum().backward()
        assert torch.equal(ids, ref_ids)
        assert x.grad.dtype == dtype and x.grad.shape == logits.shape
        atol, rtol = tolerance(dtype)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=atol, rtol=rtol)
        # the registered op (torch.compile's path) takes the same backward
        x.grad = None
        weights, _ = torch.ops.moe_fastmask.route(x, k, keep, group, None, renorm, "cuda")
        (weights * grad_out.to(dtype)).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=atol, rtol=rtol)


# the families' router variants (route's keyword arguments; logits dtype, E, top-k)
FAMILY_VARIANTS = (
    ("DeepSeek-V3", torch.float32, 256, 8, dict(scoring="sigmoid", n_group=8, topk_group=4, scale=2.5), True),
    ("GLM-4.5", torch.bfloat16, 160, 8, dict(scoring="sigmoid", scale=2.5), True),
    ("Kimi-K2", torch.float32, 384, 8, dict(scoring="sigmoid", scale=2.827), True),
    ("GPT-OSS", torch.bfloat16, 128, 4, dict(scoring="softmax_chosen"), False),
    ("scaled softmax", torch.float16, 64, 8, dict(scale=0.5), False),
)


@gpu
@pytest.mark.parametrize("family, dtype, E, k, variant, renorm", FAMILY_VARIANTS, ids=[f[0] for f in FAMILY_VARIANTS])
def test_router_variants_gradient_end_to_end(cuda_kernel, monkeypatch, family, dtype, E, k, variant, renorm):
    """route(backend="cuda") with a family's router variant (a selection bias for the sigmoid routers) runs the CUDA
    backward (Triton's made to fail; the size below which route prefers Triton's backward set to 0) and equals
    the reference's autograd in float64, eager and through the op. (The sigmoid routers' ids may differ from the
    reference's on a row whose selection values tie within rounding: the reference gradient is then taken at the
    op's ids, and such rows must stay rare.)"""
    def no_triton(*args, **kwargs):
        raise AssertionError("the cuda backend ran the Triton backward")

    monkeypatch.setattr(triton_route, "route_backward", no_triton)
    monkeypatch.setattr(cuda_route, "BACKWARD_MIN_TOKENS", 0)  # (small calls of the lane kernel's shapes: Triton's)
    saved = []
    cuda_backward = cuda_route.route_backward

    def spy(*args, **kwargs):
        saved.append(kwargs.get("chosen_logits") is not None)
        return cuda_backward(*args, **kwargs)

    monkeypatch.setattr(cuda_route, "route_backward", spy)
    gen = torch.Generator().manual_seed(SESSION_SEED + 10)
    for T in (37, 9000):
        logits = torch.randn(T, E, generator=gen).to(dtype).cuda()
        keep = (torch.rand(2, E, generator=gen) < 0.6).cuda()
        keep[:, :2 * k] = True
        group = torch.randint(-1, 2, (T,), generator=gen).cuda()
        grad_out = torch.randn(T, k, generator=gen).cuda()
        choice = dict(variant)
        sigmoid = variant.get("scoring") == "sigmoid"
        if sigmoid:
            choice["bias"] = (torch.randn(E, generator=gen) * 0.1).cuda()
        x = logits.clone().requires_grad_()
        weights, ids = route(x, k, keep, group, None, renorm, "cuda", **choice)
        saved.clear()
        (weights * grad_out.to(dtype)).sum().backward()
        # the sigmoid routers' eager backward reads the logits their chunk kernel saved (from its size on, and at
        # any size for the routers only it takes: E over 256)
        chunk = T >= cuda_route.CHUNK_MIN_TOKENS or E > cuda_route.MAX_SIGMOID_EXPERTS
        assert saved == [sigmoid and chunk], (family, T, saved)
        ref_x = logits.double().requires_grad_()
        ref_w, ref_ids = reference.route_reference(ref_x, k, keep, group, None, renorm, **choice)
        if sigmoid:
            assert (ids != ref_ids).any(dim=1).sum() <= max(1, T // 1000), family
            ref_w = reference.chosen_weights(ref_x, reference.allowed_experts(T, keep, group), ids, "sigmoid", renorm,
                                             choice["scale"])
        else:
            assert torch.equal(ids, ref_ids), family
        (ref_w * grad_out.to(dtype).double()).sum().backward()
        atol, rtol = scaled_tolerance(dtype, choice.get("scale", 1.0))
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=atol, rtol=rtol, msg=lambda m: f"{family}\n{m}")
        x.grad = None
        weights, op_ids = torch.ops.moe_fastmask.route(x, k, keep, group, None, renorm, "cuda", **choice)
        assert torch.equal(op_ids, ids), family
        (weights * grad_out.to(dtype)).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=atol, rtol=rtol, msg=lambda m: f"{family}\n{m}")


@gpu
def test_route_backward_below_its_size_runs_triton_and_above_it_cuda(cuda_kernel, monkeypatch):
    """route(backend="cuda")'s backward: below cuda_route.BACKWARD_MIN_TOKENS rows Triton's kernel (the CUDA one made
    to fail, and the forward writes no one-byte ids), from it on the CUDA one with the one-byte ids (Triton's made to
    fail); both equal the reference's autograd, eager and through the registered op."""
    def fail(name):
        def run(*args, **kwargs):
            raise AssertionError(f"the {name} backward ran")
        return run

    gen = torch.Generator().manual_seed(SESSION_SEED + 13)
    threshold = cuda_route.BACKWARD_MIN_TOKENS
    for T, failing in ((threshold - 1, (cuda_route, "cuda")), (threshold, (triton_route, "triton"))):
        logits = torch.randn(T, 64, generator=gen).to(torch.bfloat16).cuda()
        keep = (torch.rand(2, 64, generator=gen) < 0.7).cuda()
        keep[:, :8] = True
        group = torch.randint(-1, 2, (T,), generator=gen).cuda()
        grad_out = torch.randn(T, 8, generator=gen).to(torch.bfloat16).cuda()
        ref_x = logits.double().requires_grad_()
        ref_w, ref_ids = reference.route_reference(ref_x, 8, keep, group, None, False)
        (ref_w * grad_out.double()).sum().backward()
        forward = cuda_route.route_forward
        seen_ids8 = []

        def forward_spy(*args, **kwargs):
            seen_ids8.append(kwargs.get("ids8") is not None)
            return forward(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(failing[0], "route_backward", fail(failing[1]))
            m.setattr(cuda_route, "route_forward", forward_spy)
            for call in (route, torch.ops.moe_fastmask.route):
                x = logits.clone().requires_grad_()
                weights, ids = call(x, 8, keep, group, None, False, "cuda")
                (weights * grad_out).sum().backward()
                assert torch.equal(ids, ref_ids)
                atol, rtol = tolerance(torch.bfloat16)
                torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=atol, rtol=rtol)
        # the eager autograd's forward writes the one-byte ids only where the CUDA backward will read them
        assert seen_ids8 and seen_ids8[0] == (T >= threshold), (T, seen_ids8)


def test_backward_prefers_triton_only_on_small_calls_of_the_lane_shapes():
    """The size rule of route's backward covers the CUDA lane backward's shapes (16-bit logits, E of 32 or 64,
    top-8) under BACKWARD_MIN_TOKENS rows, where Triton's kernel was measured faster, and nothing else."""
    small = cuda_route.BACKWARD_MIN_TOKENS - 1
    for dtype in (torch.bfloat16, torch.float16):
        for E in cuda_route.LANE_BACKWARD_EXPERTS:
            for T in (1, small):
                assert cuda_route.backward_prefers_triton(torch.empty(T, E, dtype=dtype), 8), (dtype, E, T)
    not_covered = [
        (torch.empty(cuda_route.BACKWARD_MIN_TOKENS, 64, dtype=torch.bfloat16), 8),  # large enough
        (torch.empty(small, 64, dtype=torch.float32), 8),  # float32
        (torch.empty(small, 128, dtype=torch.bfloat16), 8),  # E outside the lane backward's
        (torch.empty(small, 60, dtype=torch.bfloat16), 8),
        (torch.empty(small, 64, dtype=torch.bfloat16), 4),  # top-k other than 8
    ]
    for logits, k in not_covered:
        assert not cuda_route.backward_prefers_triton(logits, k), (logits.shape, logits.dtype, k)


@gpu
def test_opcheck_and_cuda_graph(cuda_kernel):
    gen = torch.Generator().manual_seed(SESSION_SEED + 11)
    logits = torch.randn(6, 8, generator=gen).cuda()
    keep = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    keep[1, :3] = False
    group = torch.tensor([0, 1, -1, 1, 0, 1], device="cuda")
    ids = forward_ids(logits, 3, keep, group)
    grad = torch.randn(6, 3, generator=gen).cuda()
    for renorm in (False, True):
        torch.library.opcheck(torch.ops.moe_fastmask.route_backward.default,
                              (grad, logits, keep, group, ids, renorm, "cuda"))

    x = torch.randn(4099, 64, device="cuda", dtype=torch.bfloat16)
    ids = forward_ids(x, 8, None, None)
    grad = torch.randn(4099, 8, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    cuda_route.route_backward(grad, x, None, None, ids, True, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_route.route_backward(grad, x, None, None, ids, True, out=out)

    def replay(*args):
        graph.replay()
        torch.cuda.synchronize()

    check_against_reference(replay, grad, x, None, None, ids, True, where="graph", out=out)


@gpu
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_dependent_launches_wait_for_the_kernel_before(cuda_kernel, mode):
    """As programmatic dependent launches (the default on GPUs that have them), each kernel's blocks start while the
    kernel before it ends, and wait for it before touching memory. A chain of forwards and backwards with nothing in
    between, sharing one buffer of one-byte ids (each backward reads what its forward wrote; each forward overwrites
    what the backward before it read) and one counts tensor, gives what the same calls give launched plainly with a
    synchronization after each: bit for bit, in a stream and replayed as a CUDA graph."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator(device="cuda").manual_seed(SESSION_SEED + 29)
    steps, T, E, k = 6, 65536 + 77, 64, 8
    xs = [torch.randn(T, E, device="cuda", generator=gen).to(torch.bfloat16) * (1 + i) for i in range(steps)]
    grads = [torch.randn(T, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(steps)]
    keep = torch.rand(4, E, device="cuda", generator=gen) < 0.75
    keep[:, :k] = True
    group = torch.randint(-1, 4, (T,), device="cuda", generator=gen)
    assert cuda_route.compact_ids_apply(xs[0], k, keep)

    def chain(dependent: bool, sync: bool):
        ids8 = torch.full((T, k), 255, dtype=torch.uint8, device="cuda")
        counts = torch.zeros(4, E, dtype=torch.int64, device="cuda")
        outs = [(torch.full((T, k), POISON, dtype=torch.bfloat16, device="cuda"),
                 torch.full((T, k), -7, dtype=torch.int64, device="cuda"),
                 torch.full((T, E), POISON, dtype=torch.bfloat16, device="cuda")) for _ in range(steps)]

        def run():
            for x, grad, (w, ids, g) in zip(xs, grads, outs):
                cuda_route.route_forward(x, k, keep, group, counts, False, out=(w, ids), ids8=ids8,
                                         dependent_launch=dependent)
                if sync:
                    torch.cuda.synchronize()
                cuda_route.route_backward(grad, x, keep, group, ids, False, out=g, ids8=ids8,
                                          dependent_launch=dependent)
                if sync:
                    torch.cuda.synchronize()

        if mode == "graph" and not sync:
            run()  # (warm-up outside the capture)
            counts.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            counts.zero_()
            ids8.fill_(255)
            for w, ids, g in outs:  # (poisoned again: the warm-up wrote them)
                w.fill_(POISON)
                ids.fill_(-7)
                g.fill_(POISON)
            graph.replay()
        else:
            run()
        torch.cuda.synchronize()
        return outs, counts

    expected, expected_counts = chain(dependent=False, sync=True)
    got, got_counts = chain(dependent=True, sync=False)
    for step, ((w, ids, g), (w_ref, ids_ref, g_ref)) in enumerate(zip(got, expected)):
        assert torch.equal(ids, ids_ref), f"step {step}: ids"
        assert torch.equal(w, w_ref), f"step {step}: weights"
        assert torch.equal(g, g_ref), f"step {step}: gradient"
    assert torch.equal(got_counts, expected_counts)
    assert int(expected_counts.sum()) == steps * k * int(((group >= 0) & (group < 4)).sum())


def test_dependent_launch_setting(monkeypatch):
    """MOE_FASTMASK_CUDA_PDL: on by default, "0" launches plainly, anything else is refused by name;
    dependent_launches() and an explicit argument win over it in both launchers' parameters."""
    logits = torch.zeros(4, 64, dtype=torch.bfloat16)
    ids = torch.zeros(4, 8, dtype=torch.int64)
    weights = torch.zeros(4, 8, dtype=torch.bfloat16)
    for value, expected in ((None, 1), ("1", 1), ("0", 0)):
        if value is None:
            monkeypatch.delenv(cuda_route.DEPENDENT_LAUNCH_ENV, raising=False)
        else:
            monkeypatch.setenv(cuda_route.DEPENDENT_LAUNCH_ENV, value)
        cuda_route._dependent_launch_env.cache_clear()
        forward = cuda_route.forward_params(weights, ids, logits, 8, None, None, None, False)
        backward = cuda_route.backward_params(logits, weights, logits, None, None, ids, False)
        assert (forward.dependent_launch, backward.dependent_launch) == (expected, expected)
        explicit = cuda_route.forward_params(weights, ids, logits, 8, None, None, None, False,
                                             dependent_launch=not expected)
        assert explicit.dependent_launch == 1 - expected
        assert cuda_route.backward_params(logits, weights, logits, None, None, ids, False,
                                          dependent_launch=not expected).dependent_launch == 1 - expected
    monkeypatch.setenv(cuda_route.DEPENDENT_LAUNCH_ENV, "yes")
    cuda_route._dependent_launch_env.cache_clear()
    with pytest.raises(ValueError, match=cuda_route.DEPENDENT_LAUNCH_ENV):
        cuda_route.dependent_launch_default()
    with cuda_route.dependent_launches(False):  # (wins over the environment, and nests)
        assert cuda_route.forward_params(weights, ids, logits, 8, None, None, None, False).dependent_launch == 0
        with cuda_route.dependent_launches(True):
            assert cuda_route.backward_params(logits, weights, logits, None, None, ids, False).dependent_launch == 1
        assert not cuda_route.dependent_launch_default()
    monkeypatch.delenv(cuda_route.DEPENDENT_LAUNCH_ENV)
    cuda_route._dependent_launch_env.cache_clear()
    assert cuda_route.dependent_launch_default()


@gpu
def test_uncovered_calls_fall_back_and_the_launcher_refuses_bad_shapes(cuda_kernel):
    """Shapes the CUDA backward does not take run Triton's backward under backend="cuda" (every router variant with a
    finite scale runs CUDA's); the launcher itself refuses bad shapes."""
    gen = torch.Generator().manual_seed(SESSION_SEED + 13)
    logits = torch.randn(65, 64, generator=gen).cuda()
    ids = forward_ids(logits, 4, None, None)
    grad = torch.randn(65, 4, generator=gen).cuda()
    assert cuda_route.supports_backward(grad, logits, ids)
    for kwargs in (dict(scoring="sigmoid"), dict(scoring="softmax_chosen"), dict(scale=2.0)):
        assert cuda_route.supports_backward(grad, logits, ids, **kwargs), kwargs
    for kwargs in (dict(scale=math.inf), dict(scale=math.nan), dict(scale=1e39), dict(scoring="bogus")):
        assert not cuda_route.supports_backward(grad, logits, ids, **kwargs), kwargs
    got = route_module._route_backward_impl(grad, logits, None, None, ids, True, "cuda", scale=math.inf)
    expected = triton_route.route_backward(grad, logits, None, None, ids, True, scale=math.inf)
    torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)
    with pytest.raises(ValueError, match="scale"):
        cuda_route.route_backward(grad, logits, None, None, ids, False, scale=math.nan)
    with pytest.raises(ValueError, match="scoring"):
        cuda_route.route_backward(grad, logits, None, None, ids, False, scoring="bogus")
    assert not cuda_route.supports_backward(grad.half(), logits, ids)  # grad of another dtype
    assert not cuda_route.supports_backward(grad, logits, ids.int())
    assert not cuda_route.supports_backward(grad, logits.double(), ids)
    wide = torch.randn(9, 640, generator=gen).cuda()  # (more experts than the kernel takes)
    wide_ids = forward_ids(wide, 8, None, None)
    assert not cuda_route.supports_backward(torch.ones(9, 8, device="cuda"), wide, wide_ids)
    got = route_module._route_backward_impl(torch.ones(9, 8, device="cuda"), wide, None, None, wide_ids, False, "cuda")
    torch.testing.assert_close(got, reference.route_backward_reference(torch.ones(9, 8, device="cuda"), wide, None,
                                                                       None, wide_ids, False), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="grad_weights"):
        cuda_route.route_backward(grad.half(), logits, None, None, ids, False)
    with pytest.raises(ValueError, match="ids"):
        cuda_route.route_backward(grad, logits, None, None, ids.int(), False)
    lib = cuda_route._load()[0]
    for fields in bad_shapes():
        params = cuda_route.RouteBackwardParams(**fields)
        code = lib.moe_fastmask_route_cuda_backward(ctypes.byref(params), 2, 0, None)
        assert code == CUDA_ERROR_INVALID_VALUE, fields


def bad_shapes() -> list[dict]:
    """Launch arguments the backward launcher must refuse with cudaErrorInvalidValue (pointers are never read)."""
    good = dict(grad_logits=64, grad_weights=64, logits=64, ids=64, stride_t=64, stride_e=1, num_tokens=4,
                num_experts=64, num_groups=1, top_k=8, scale=1.0)
    return [
        dict(good, num_experts=513),
        dict(good, num_experts=0),
        dict(good, top_k=17),
        dict(good, top_k=0),
        dict(good, num_experts=4, top_k=5),
        dict(good, num_tokens=-1),
        dict(good, stride_e=-1),
        dict(good, grad_logits=None),
        dict(good, ids=None),
        dict(good, keep=64, num_groups=0),
        dict(good, group_is_int64=2),
        dict(good, variant=3),
        dict(good, variant=-1),
        dict(good, variant=2),  # (the loads-and-stores-only instance: no keep, no one-byte ids)
        dict(good, variant=2, keep=64, ids8=64, num_experts=32, stride_t=32),
        dict(good, variant=2, keep=64, ids8=64, scale=2.0),  # (the default router only)
        dict(good, variant=2, keep=64, ids8=64, scoring=1),
        dict(good, scoring=2),
        dict(good, scoring=-1),
        dict(good, scale=math.inf),
        dict(good, scale=math.nan),
        dict(good, chosen_logits=64),  # (the sigmoid router's saved logits, with the softmax router)
    ]


# --------------------------------------------------------------------------------------------------------------
# CPU: the build, the launcher's refusals, the argument mirror
# --------------------------------------------------------------------------------------------------------------


def test_params_mirror_the_c_struct():
    """RouteBackwardParams lists the C struct's fields in order, with the same widths (the libraries report the C
    struct's size, checked against ctypes' where they are built)."""
    source = cuda_route.backward_source_path().read_text()
    body = re.search(r"struct RouteBackwardParams \{(.*?)\};", source, re.S).group(1)
    c_fields = re.findall(r"^\s*(?:const\s+)?(\w+)\*?\s+\*?(\w+);", body, re.M)
    py_fields = cuda_route.RouteBackwardParams._fields_
    assert [name for _, name in c_fields] == [name for name, _ in py_fields]
    widths = {"void": 8, "int64_t": 8, "uint8_t": 8, "int32_t": 4, "float": 4}
    for (c_type, name), (_, py_type) in zip(c_fields, py_fields):
        is_pointer = re.search(rf"\*\s*{name};", body) is not None
        assert ctypes.sizeof(py_type) == (8 if is_pointer else widths[c_type]), name
    assert ctypes.sizeof(cuda_route.RouteBackwardParams) == 128  # (no padding, as in C)


def test_build_key_and_command_cover_the_backward_source(tmp_path):
    forward, backward = cuda_route.source_path(), cuda_route.backward_source_path()
    assert backward.name == "route_cuda_backward.cu" and backward.is_file() and backward.parent == forward.parent
    command = cuda_route.nvcc_command("nvcc", forward, Path("out.so"), ("90",))
    assert command[-2:] == [str(backward), str(forward)]
    for source in (forward, backward):
        shutil.copy(source, tmp_path / source.name)
    key = cuda_route.build_key(tmp_path / forward.name, "/usr/bin/nvcc", ("90",))
    (tmp_path / backward.name).write_text(backward.read_text() + "\n// changed\n")
    changed = cuda_route.build_key(tmp_path / forward.name, "/usr/bin/nvcc", ("90",))
    assert changed != key
    # the shared header of the lane kernels, next to the sources, is part of the key too
    header = forward.with_name("route_lane16.cuh")
    assert header.is_file() and f'#include "{header.name}"' in forward.read_text()
    assert f'#include "{header.name}"' in backward.read_text()
    (tmp_path / header.name).write_text(header.read_text())
    with_header = cuda_route.build_key(tmp_path / forward.name, "/usr/bin/nvcc", ("90",))
    assert with_header != changed
    (tmp_path / header.name).write_text(header.read_text() + "\n// changed\n")
    assert cuda_route.build_key(tmp_path / forward.name, "/usr/bin/nvcc", ("90",)) != with_header


def test_kernels_take_the_scales_that_are_finite_as_float32():
    """The kernels receive the scale as a float32 and refuse an infinite one: scales beyond float32's range go to
    Triton (supports / supports_backward say no)."""
    for scale in (1.0, -2.5, 0.0, 1e-30, 3e38, -3e38):
        assert cuda_route.scale_in_range(scale), scale
    for scale in (math.inf, -math.inf, math.nan, 1e39, -1e39):
        assert not cuda_route.scale_in_range(scale), scale


def test_supports_backward_needs_cuda_tensors():
    logits = torch.randn(4, 64)
    ids = torch.zeros(4, 8, dtype=torch.int64)
    assert not cuda_route.supports_backward(torch.randn(4, 8), logits, ids)
    meta = torch.empty(4, 64, device="meta")
    assert not cuda_route.supports_backward(torch.empty(4, 8, device="meta"), meta, ids.to("meta"))


@pytest.mark.skipif(cuda_route.find_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests build and run the kernel")
@pytest.mark.prebuild.with_args(start_sm90_build)
def test_backward_compiles_without_spills_and_refuses_bad_shapes(sm90_build_cache):
    """Compile for sm_90 in a fresh process (no device needed): every backward kernel instance without spills, and
    the launcher refuses the shapes it does not take before touching a device (and reports a CUDA error, not a
    crash, for a valid call without a device)."""
    code = (
        "import ctypes, torch\n"
        "from moe_fastmask.ops import cuda_route as c\n"
        "import test_route_cuda_backward as t\n"
        "lib = c._bind(c._build())\n"
        "size = lib.moe_fastmask_route_cuda_backward_params_size()\n"
        "print('params size', size, ctypes.sizeof(c.RouteBackwardParams))\n"
        "for fields in t.bad_shapes():\n"
        "    p = c.RouteBackwardParams(**fields)\n"
        "    print('refused', lib.moe_fastmask_route_cuda_backward(ctypes.byref(p), 2, 0, None))\n"
        "p = c.RouteBackwardParams(**dict(t.bad_shapes()[0], num_experts=64))\n"
        "print('bad dtype', lib.moe_fastmask_route_cuda_backward(ctypes.byref(p), 3, 0, None))\n"
        "print('null params', lib.moe_fastmask_route_cuda_backward(None, 2, 0, None))\n"
        "p = c.RouteBackwardParams(**dict(t.bad_shapes()[0], num_experts=64, num_tokens=0))\n"
        "print('empty', lib.moe_fastmask_route_cuda_backward(ctypes.byref(p), 2, 0, None))\n"
        "p = c.RouteBackwardParams(**dict(t.bad_shapes()[0], num_experts=64))\n"
        "rc = lib.moe_fastmask_route_cuda_backward(ctypes.byref(p), 2, 0, None)\n"
        "print('no device', rc not in (0, 1), lib.moe_fastmask_route_cuda_error_string(rc).decode())\n"
        "print('LOG', (c._build().parent / 'build.log').read_text())\n"
    )
    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, MOE_FASTMASK_CACHE_DIR=str(sm90_build_cache), MOE_FASTMASK_CUDA_ARCH="90",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    size = ctypes.sizeof(cuda_route.RouteBackwardParams)
    assert f"params size {size} {size}" in out.stdout, out.stdout[:2000]
    assert out.stdout.count(f"refused {CUDA_ERROR_INVALID_VALUE}\n") == len(bad_shapes()), out.stdout[:2000]
    assert f"bad dtype {CUDA_ERROR_INVALID_VALUE}" in out.stdout, out.stdout[:2000]
    assert f"null params {CUDA_ERROR_INVALID_VALUE}" in out.stdout, out.stdout[:2000]
    assert "empty 0" in out.stdout and "no device True" in out.stdout, out.stdout[:2000]
    # ptxas: per kernel a "Compiling entry function" line, then "Function properties", its stack and spills, and its
    # registers
    log = out.stdout.split("LOG", 1)[1].splitlines()
    entries = [i for i, line in enumerate(log) if "Compiling entry function" in line and "route_bwd_kernel" in line]
    # (dtype, padded E: 8 .. 512, vector or checked access; and the sigmoid router's vector instances, E up to 256)
    assert len(entries) == 3 * 7 * 2 + 3 * 6
    lane = [i for i, line in enumerate(log) if "Compiling entry function" in line and "route_bwd_lane_kernel" in line]
    # (16-bit dtype, E = 32 or 64, with or without a mask, int64 or byte ids; and the benchmark's loads-and-stores-only
    # instance)
    assert len(lane) == 2 * 2 * 2 * 2 + 1
    sigmoid = [i for i, line in enumerate(log)
               if "Compiling entry function" in line and "route_bwd_sigmoid_kernel" in line]
    assert len(sigmoid) == 3  # (dtype)
    entries += lane + sigmoid
    for i in entries:
        report = " ".join(log[i + 1 : i + 4])
        assert "0 bytes spill stores, 0 bytes spill loads" in report and "registers" in report, (log[i], report)


# --------------------------------------------------------------------------------------------------------------
# CPU: the kernel source itself, compiled for the host with an emulation of the warp (and AddressSanitizer)
# --------------------------------------------------------------------------------------------------------------

# the source's device-only statements, and their host stand-ins (tests/cuda_emulation.py)
EMU_SUBSTITUTIONS = {
    **cuda_emulation.LANE16_SUBSTITUTIONS,
    'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));': "y = emu_ex2(x);",
    'asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));': "y = emu_rcp(x);",
    'asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));': "d = emu_bf16x2_pack(lo, hi);",
    'asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));': "d = emu_bf16x2_mul(a, b);",
    'asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));': "d = emu_bf16x2_fma(a, b, c);",
    "extern __shared__ __align__(16) unsigned char bwd_lane_smem[];":
        "unsigned char* const bwd_lane_smem = emu_smem_base;",
}


def build_emulation(directory: Path, sanitize: bool) -> Path:
    """csrc/route_cuda_backward.cu compiled for the host (see tests/cuda_emulation.py); returns the library's path."""
    return cuda_emulation.build_emulation(cuda_emulation.kernel_source(cuda_route.backward_source_path()),
                                          EMU_SUBSTITUTIONS, directory,
                                          "route_cuda_backward_host", sanitize)


def start_emulation_build() -> None:
    """(``prebuild``) build_emulation's build, started in the background."""
    cuda_emulation.start_build(cuda_emulation.kernel_source(cuda_route.backward_source_path()), EMU_SUBSTITUTIONS,
                               "route_cuda_backward_host")


def emulated_run(library: Path, variant: str = "lane", ids8: bool = False, scoring: str = "softmax",
                 scale: float = 1.0, saved: bool = False):
    """A launcher (as ``run_cuda``) on CPU tensors through the emulated library, with the Python side's arguments;
    ``saved``: the sigmoid router's given the forward's saved logits (saved_logits_run)."""
    launch = emulated_launcher(library)
    if saved:
        def launch_saved(grad, logits, keep, group, ids, renormalize, out, chosen_logits):
            grad, ids = grad.contiguous(), ids.contiguous()  # (alive until the launch returns)
            launch(cuda_route.backward_params(out, grad, logits, keep, group, ids, renormalize, scoring=scoring,
                                              scale=scale, chosen_logits=chosen_logits), logits.dtype)

        return saved_logits_run(launch_saved, scoring, scale)

    def run(grad, logits, keep, group, ids, renormalize, out):
        grad, ids = grad.contiguous(), ids.contiguous()
        byte_ids = ids.to(torch.uint8) if ids8 else None  # (alive until the launch returns)
        launch(cuda_route.backward_params(out, grad, logits, keep, group, ids, renormalize, scoring=scoring,
                                          scale=scale, variant=variant, ids8=byte_ids), logits.dtype)

    return run


def emulated_load_store(library: Path):
    """The loads-and-stores-only instance on CPU tensors through the emulated library (as scenario_load_store
    launches it; the int64 ids it is given are never read)."""
    launch = emulated_launcher(library)

    def run(grad, logits, keep, group, ids8, out):
        ids = ids8.to(torch.int64)
        launch(cuda_route.backward_params(out, grad, logits, keep, group, ids, False, ids8=ids8,
                                          ablation="load_store"), logits.dtype)

    return run


def emulated_launcher(library: Path):
    """``launch(params, dtype)``: the emulated library's backward launcher, asserting it returns 0."""
    lib = ctypes.CDLL(str(library))
    lib.moe_fastmask_route_cuda_backward.argtypes = [
        ctypes.POINTER(cuda_route.RouteBackwardParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    assert lib.moe_fastmask_route_cuda_backward_params_size() == ctypes.sizeof(cuda_route.RouteBackwardParams)

    def launch(params, dtype):
        code = lib.moe_fastmask_route_cuda_backward(ctypes.byref(params), cuda_route.DTYPE_CODES[dtype], 0, None)
        assert code == 0, code

    return launch


def check_launcher_refuses_saved_logits_off_the_sigmoid_router(library: Path) -> None:
    """The launcher refuses chosen_logits (cudaErrorInvalidValue, before any launch) for a softmax router."""
    lib = ctypes.CDLL(str(library))
    lib.moe_fastmask_route_cuda_backward.argtypes = [
        ctypes.POINTER(cuda_route.RouteBackwardParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    logits = torch.randn(8, 64)
    ids = torch.arange(8).repeat(8, 1)
    out = torch.full((8, 64), POISON)
    grad, chosen = torch.randn(8, 8), torch.zeros(8, 8)  # (alive until the launches return)
    for scoring, refused in (("softmax", True), ("sigmoid", False)):
        params = cuda_route.backward_params(out, grad, logits, None, None, ids, False, scoring=scoring,
                                            chosen_logits=chosen)
        code = lib.moe_fastmask_route_cuda_backward(ctypes.byref(params), cuda_route.DTYPE_CODES[torch.float32], 0,
                                                    None)
        assert (code != 0) == refused, (scoring, code)


def emulated_checks(library: str) -> None:
    """The scenarios, smaller, on the emulated kernel (CPU tensors; the emulated device has 2 SMs, so the
    grid-stride loops take several steps)."""
    run = emulated_run(Path(library))
    split = emulated_run(Path(library), variant="split")
    byte_ids = emulated_run(Path(library), ids8=True)
    for dtype in (torch.float16, torch.bfloat16):
        for E, k in LANE_SHAPES:
            scenario_random_shapes(split, "cpu", E, k, dtype, (37,), SESSION_SEED + E * 17)
            scenario_random_shapes(byte_ids, "cpu", E, k, dtype, (1, 37, 70), SESSION_SEED + E * 23)
        scenario_adversarial(split, "cpu", "wide", dtype, 29, ((64, 8),), SESSION_SEED + 19)
        for kind in ("wide", "nan_inf", "ties"):
            scenario_adversarial(byte_ids, "cpu", kind, dtype, 29, LANE_SHAPES, SESSION_SEED + 29)
    for emulated in (run, split):
        scenario_invalid_ids(emulated, "cpu", 37, SESSION_SEED + 15)
    for seed, emulated in enumerate((run, byte_ids, split)):
        scenario_extreme_grads(emulated, "cpu", 70, SESSION_SEED + 31 + seed)
    scenario_rounding(run, "cpu", 70, SESSION_SEED + 41, {torch.bfloat16: 2, torch.float16: 1})
    scenario_rounding(split, "cpu", 70, SESSION_SEED + 42, {torch.bfloat16: 1, torch.float16: 1})
    for dtype in DTYPES:
        for E, k in SHAPES:
            scenario_random_shapes(run, "cpu", E, k, dtype, (1, 37), SESSION_SEED + E * 131 + k)
        for kind in KINDS:
            scenario_adversarial(run, "cpu", kind, dtype, 29, ((64, 8), (60, 8), (8, 2), (256, 16), (32, 8), (512, 10)),
                                 SESSION_SEED + sum(map(ord, kind)))
    scenario_examples(run, "cpu")
    for dtype in DTYPES:
        scenario_router_variants(lambda scoring, scale: emulated_run(Path(library), scoring=scoring, scale=scale),
                                 "cpu", dtype, ("normal", "nan_inf"), 19,
                                 ((256, 8), (60, 4), (64, 8), (512, 10)), SESSION_SEED + 61)
    scenario_invalid_ids(emulated_run(Path(library), scoring="sigmoid", scale=2.5), "cpu", 37, SESSION_SEED + 16,
                         scoring="sigmoid", scale=2.5)
    scenario_sigmoid_rows(lambda scoring, scale: emulated_run(Path(library), scoring=scoring, scale=scale), "cpu", 37,
                          SESSION_SEED + 71)
    # given the forward's saved logits (and logits of NaN): the sigmoid router's rows, variants and invalid ids
    saved = lambda scoring, scale: emulated_run(Path(library), scoring=scoring, scale=scale,  # noqa: E731
                                                saved=scoring == "sigmoid")
    scenario_sigmoid_rows(saved, "cpu", 37, SESSION_SEED + 72)
    for dtype in DTYPES:
        scenario_router_variants(saved, "cpu", dtype, ("normal", "nan_inf"), 19, ((256, 8), (160, 8), (384, 8)),
                                 SESSION_SEED + 62)
    scenario_invalid_ids(saved("sigmoid", 2.5), "cpu", 37, SESSION_SEED + 18, scoring="sigmoid", scale=2.5)
    check_launcher_refuses_saved_logits_off_the_sigmoid_router(Path(library))
    for group_dtype in (torch.int64, torch.int32):
        scenario_out_of_range_groups(run, "cpu", group_dtype, 3, SESSION_SEED + 3)
    for layout in LAYOUTS:
        scenario_layout(run, "cpu", layout, 37, SESSION_SEED + 5)
    scenario_any_ids(run, "cpu", 29, SESSION_SEED + 7)
    scenario_load_store(emulated_load_store(Path(library)), "cpu", SESSION_SEED + 9)
    print("emulated checks passed")


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
@pytest.mark.prebuild.with_args(start_emulation_build)
def test_kernel_source_emulated_on_the_host(tmp_path):
    """The kernel source, compiled for the host with its warps emulated by threads, against the reference on every
    scenario (random shapes, adversarial values, examples, out-of-range groups, layouts, any ids), under
    AddressSanitizer where g++ has it: every load and store within its tensor or the shared buffers. Runs in a fresh
    process (a sanitizer report, or a warp whose lanes disagree on the __syncwarp calls, ends it)."""
    code = "import test_route_cuda_backward as t\nt.emulated_checks({library!r})\n"
    cuda_emulation.run_emulated_checks(build_emulation, code, tmp_path, SESSION_SEED, "emulated checks passed")
