"""RMSNorm that keeps its input in the model dtype for backward (instead of an fp32 copy), and its reference.

The norm is the Llama/OLMoE form: fp32 statistics, the normalised input cast back to the input dtype, then the
weight multiply — ``weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)``. :class:`RMSNormFunction` gives
the same forward bits and saves ``x`` (model dtype) plus the ``[..., 1]`` inverse RMS.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm (fp32 statistics, ``weight * normed.to(input dtype)``), bit-identical forward to
    :func:`rms_norm_reference`, keeping the input in its own dtype and the ``[..., 1]`` inverse RMS for backward
    instead of an fp32 copy of the input."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_normed = (grad_out * weight).to(torch.float32)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x [..., H]`` with ``weight [H]`` through :class:`RMSNormFunction`."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (the last dim of x), got {tuple(weight.shape)}")
    return RMSNormFunction.apply(x, weight, float(eps))


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-PyTorch RMSNorm (the transformers ``OlmoeRMSNorm`` / ``LlamaRMSNorm`` forward), for tests."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
