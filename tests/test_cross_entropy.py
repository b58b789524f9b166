"""The chunked frozen-head cross entropy (``moe_fastmask.ops.cross_entropy``) against plain PyTorch.

Forward and backward of :func:`frozen_head_cross_entropy` are compared with :func:`cross_entropy_reference`
(``F.cross_entropy`` on the full fp32 logits, autograd for the gradient) on random and adversarial inputs, several
shapes, chunk sizes and dtypes, with ignored rows; the reference itself is checked against a float64 loop over rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_fastmask.ops import FrozenHeadCrossEntropy, cross_entropy_reference, frozen_head_cross_entropy
from moe_fastmask.ops.cross_entropy import IGNORE_INDEX

SHAPES = [(1, 4, 7), (13, 16, 33), (70, 32, 257)]  # (rows N, hidden H, vocab V)
CHUNKS = [1, 5, 1024]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
KINDS = ["random", "wide", "ties", "dominant", "ignored", "all_ignored"]


def make_case(kind: str, n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    """``(hidden, weight, targets)``; ``kind`` picks the adversarial pattern."""
    g = torch.Generator().manual_seed(seed + 1000 * n + v)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = v - 1  # the last class is reachable
    if kind == "wide":  # logits in the hundreds: only a max-shifted log-sum-exp stays finite
        hidden = hidden * 300.0
    elif kind == "ties":  # every class has the same row: all logits of a token tie exactly
        weight = weight[:1].expand(v, h).clone()
    elif kind == "dominant":  # the target's logit far above the rest: loss ~ 0, gradient ~ 0
        weight = torch.zeros(v, h, dtype=torch.float64)
        weight[targets, torch.arange(n) % h] = 50.0
        hidden = torch.zeros(n, h, dtype=torch.float64)
        hidden[torch.arange(n), torch.arange(n) % h] = 1.0
    if kind == "ignored":
        targets[torch.rand(n, generator=g) < 0.4] = IGNORE_INDEX
        targets[-1] = IGNORE_INDEX
    elif kind == "all_ignored":
        targets[:] = IGNORE_INDEX
    return hidden.to(dtype), weight.to(dtype), targets


def _loss_and_grad(fn, hidden, weight, targets, upstream: float, **kwargs):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)  # requires grad, yet frozen: the op must not give it one
    loss = fn(h, w, targets, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), (h.grad if h.grad is not None else torch.zeros_like(h)), w.grad


def _tolerance(dtype: torch.dtype, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """(loss atol, gradient atol) from the dtype's precision and the size of the logits and of the weight."""
    eps = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]  # the loss runs in fp32 at best
    logit_scale = 1.0 + float((hidden.double() @ weight.double().t()).abs().max())
    return 8 * eps * logit_scale, 8 * eps * (1.0 + 2 * float(weight.double().abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_forward_and_backward_match_the_reference(shape, kind, dtype):
    hidden, weight, targets = make_case(kind, *shape, dtype)
    loss_atol, grad_atol = _tolerance(dtype, hidden, weight)
    want_loss, want_grad, _ = _loss_and_grad(cross_entropy_reference, hidden, weight, targets, 3.0)
    for chunk in CHUNKS:
        loss, grad, weight_grad = _loss_and_grad(
            frozen_head_cross_entropy, hidden, weight, targets, 3.0, chunk_size=chunk
        )
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert weight_grad is None, "the head is frozen: no gradient may reach it"
        assert grad.dtype == hidden.dtype and torch.isfinite(grad).all()
        where = f"chunk {chunk}"
        torch.testing.assert_close(loss.double(), want_loss.double(), atol=loss_atol, rtol=0, msg=f"loss, {where}")
        torch.testing.assert_close(grad.double(), want_grad.double(), atol=grad_atol, rtol=0, msg=f"grad, {where}")
        ignored = targets == IGNORE_INDEX
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored])), "ignored rows get no gradient"


@pytest.mark.parametrize("kind", ["random", "wide", "ties", "ignored"])
def test_reference_equals_a_float64_loop_over_rows(kind):
    hidden, weight, targets = make_case(kind, 9, 8, 11, torch.float64, seed=7)
    got = cross_entropy_reference(hidden, weight, targets)
    rows = [i for i in range(len(targets)) if targets[i] != IGNORE_INDEX]
    total = 0.0
    for i in rows:
        logits = [float(hidden[i] @ weight[c]) for c in range(weight.shape[0])]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[int(targets[i])]
    assert got.item() == pytest.approx(total / max(len(rows), 1), rel=1e-6, abs=1e-6)


def test_ties_give_log_vocab_and_a_gradient_toward_the_target():
    hidden, weight, targets = make_case("ties", 6, 8, 16, torch.float32)
    loss, grad, _ = _loss_and_grad(frozen_head_cross_entropy, hidden, weight, targets, 1.0, chunk_size=4)
    assert loss.item() == pytest.approx(math.log(16), rel=1e-6)
    # all rows of W are equal, so (p - onehot) @ W sums to zero for every token
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_divisor_sums_instead_of_averaging():
    hidden, weight, targets = make_case("ignored", 13, 16, 33, torch.float32, seed=3)
    counted = int((targets != IGNORE_INDEX).sum())
    mean, mean_grad, _ = _loss_and_grad(frozen_head_cross_entropy, hidden, weight, targets, 1.0, chunk_size=4)
    for divisor in (torch.tensor(50), 50.0, torch.tensor(50.0)):
        loss, grad, _ = _loss_and_grad(
            frozen_head_cross_entropy, hidden, weight, targets, 1.0, chunk_size=4, divisor=divisor
        )
        torch.testing.assert_close(loss, mean * counted / 50)
        torch.testing.assert_close(grad, mean_grad * counted / 50)
        ref = cross_entropy_reference(hidden, weight, targets, divisor=divisor)
        torch.testing.assert_close(loss, ref)


def test_autograd_function_is_the_op_without_ignored_rows():
    hidden, weight, targets = make_case("random", 13, 16, 33, torch.float32, seed=5)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    direct = FrozenHeadCrossEntropy.apply(h1, weight, targets, torch.tensor(13.0), 4)
    op = frozen_head_cross_entropy(h2, weight, targets, chunk_size=4)
    assert torch.equal(direct, op)
    direct.backward()
    op.backward()
    assert torch.equal(h1.grad, h2.grad)


def test_no_gradient_kept_when_hidden_needs_none():
    hidden, weight, targets = make_case("random", 5, 4, 7, torch.float32)
    loss = frozen_head_cross_entropy(hidden, weight, targets, chunk_size=2)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, cross_entropy_reference(hidden, weight, targets))


def test_bad_input_is_refused_with_a_clear_message():
    hidden, weight, targets = make_case("random", 5, 4, 7, torch.float32)
    bad = targets.clone()
    bad[2] = 7
    with pytest.raises(ValueError, match="target 7 is outside the 7 classes"):
        frozen_head_cross_entropy(hidden, weight, bad)
    bad[2] = -3
    with pytest.raises(ValueError, match="target -3"):
        frozen_head_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        frozen_head_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="hidden must be"):
        frozen_head_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets must be"):
        frozen_head_cross_entropy(hidden, weight, targets[:4])


def test_liger_fused_linear_cross_entropy_agrees_when_installed():
    """The library the training benchmark compares against (``--loss-impl liger``) computes the same loss."""
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    hidden, weight, targets = make_case("ignored", 13, 16, 33, torch.float32, seed=9)
    want_loss, want_grad, _ = _loss_and_grad(frozen_head_cross_entropy, hidden, weight, targets, 1.0, chunk_size=4)
    loss, grad, _ = _loss_and_grad(
        lambda h, w, t: liger.liger_fused_linear_cross_entropy(h, w.detach(), t, reduction="mean"),
        hidden, weight, targets, 1.0,
    )
    torch.testing.assert_close(loss.float(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)
