"""Token cross-entropy through a frozen output head, chunked so that no ``[N, vocab]`` logits outlive a chunk.

:func:`frozen_head_cross_entropy` is the op (the training loss of masked fine-tuning: the lm_head is frozen, only
the hidden states need a gradient); :class:`FrozenHeadCrossEntropy` its autograd function;
:func:`cross_entropy_reference` the plain-PyTorch reference the tests compare both against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean (or sum / ``divisor``) token cross-entropy of ``hidden @ weight.T`` for a frozen ``weight``.

    Works through ``chunk_size`` rows at a time and computes the gradient of ``hidden`` during the forward, so no
    ``[N, vocab]`` logits outlive a chunk (the gradient needs only ``hidden``'s shape). Logits are upcast to fp32 as
    in transformers' ``ForCausalLMLoss``. Every target must be a valid class (drop ignored rows first).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, divisor: Tensor, chunk_size: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = (hidden[start:end] @ weight.t()).float()
            target = targets[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(end - start, device=probs.device), target] -= 1.0
                grad[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        divisor = divisor.to(device=hidden.device, dtype=torch.float32)
        ctx.save_for_backward(grad, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad, divisor = ctx.saved_tensors
        scale = (grad_loss.float() / divisor).to(grad.dtype) if grad is not None else None
        return (grad * scale if grad is not None else None), None, None, None, None


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be integer [N] = [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def frozen_head_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    divisor: Tensor | float | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``sum_i CE(hidden[i] @ weight.T, targets[i]) / divisor`` over the rows whose target is not ``ignore_index``.

    ``hidden [N, H]`` gets a gradient, ``weight [V, H]`` never does. ``divisor``: default the number of counted rows
    (the mean; 1 when there is none). Returns a float32 scalar. Rows are processed ``chunk_size`` at a time.
    """
    _check(hidden, weight, targets, chunk_size)
    keep = targets != ignore_index
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if divisor is None:
        divisor = torch.tensor(float(max(int(targets.numel()), 1)))
    divisor = torch.as_tensor(divisor).detach().float()
    bad = (targets < 0) | (targets >= weight.shape[0])
    if bool(bad.any()):
        raise ValueError(
            f"target {int(targets[bad][0])} is outside the {weight.shape[0]} classes (ignore_index is {ignore_index})"
        )
    return FrozenHeadCrossEntropy.apply(hidden, weight.detach(), targets.long(), divisor, int(chunk_size))


def cross_entropy_reference(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, divisor: Tensor | float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Plain PyTorch: fp32 logits of every row, ``F.cross_entropy`` summed over the non-ignored rows, / divisor."""
    logits = (hidden @ weight.detach().t()).float()
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    if divisor is None:
        divisor = float(max(int((targets != ignore_index).sum()), 1))
    return total / torch.as_tensor(divisor, dtype=torch.float32, device=total.device)


__all__ = ["IGNORE_INDEX", "FrozenHeadCrossEntropy", "cross_entropy_reference", "frozen_head_cross_entropy"]
