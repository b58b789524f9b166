"""The lean RMSNorm op against its plain-PyTorch reference: forward bit for bit, gradients close, random and
adversarial inputs, several shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from moe_fastmask.ops import rms_norm, rms_norm_reference

SHAPES = [(5, 24), (2, 3, 7), (1, 1), (4, 129)]
CASES = ["random", "zero_rows", "wide_values", "tiny_values", "constant_rows"]
# the statistics are float32 for every input dtype (the transformers norm's definition), float64 inputs included
TOLERANCES = {torch.float64: (1e-5, 1e-5), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
              torch.float16: (2e-3, 2e-3)}
EPS = 1e-5


def make(shape, case, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "zero_rows":
        x.view(-1, shape[-1])[::2] = 0.0  # rstd = 1/sqrt(eps): the largest the norm ever multiplies by
    elif case == "wide_values":
        x = x * 3e3 * torch.linspace(0.01, 1.0, shape[-1], dtype=torch.float64)  # squares overflow fp16
    elif case == "tiny_values":
        x = x * 1e-4
    elif case == "constant_rows":
        x = torch.full(shape, -2.5, dtype=torch.float64)
    weight = torch.rand(shape[-1], generator=gen, dtype=torch.float64) + 0.5
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), grad.to(dtype)


def grads(fn, x, weight, grad, weight_grad=True):
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(weight_grad)
    out = fn(x, weight, EPS)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_is_bit_identical_and_gradients_match(shape, case, dtype):
    x, weight, grad = make(shape, case, dtype)
    out = rms_norm(x, weight, EPS)
    assert torch.equal(out, rms_norm_reference(x, weight, EPS))
    assert torch.isfinite(out).all()

    ours = grads(rms_norm, x, weight, grad)
    same_dtype = grads(rms_norm_reference, x, weight, grad)  # autograd of the reference in the same dtype
    exact = grads(rms_norm_reference, x.double(), weight.double(), grad.double())  # from float64 copies
    atol, rtol = TOLERANCES[dtype]
    assert torch.equal(ours[0], same_dtype[0])
    for got, want in ((ours[1], exact[1]), (ours[2], exact[2])):
        assert got.dtype == dtype and torch.isfinite(got).all()
        # dx grows with rstd (1/sqrt(eps) for zero rows); judge relative to the largest exact value
        bound = atol * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want.to(dtype), atol=bound, rtol=rtol)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours[1], same_dtype[1], atol=atol * max(1.0, float(exact[1].abs().max())), rtol=rtol)


def test_frozen_weight_gets_no_gradient():
    x, weight, grad = make((3, 8), "random", torch.float32)
    _, grad_x, grad_weight = grads(rms_norm, x, weight, grad, weight_grad=False)
    assert grad_weight is None
    _, want_x, _ = grads(rms_norm_reference, x, weight, grad, weight_grad=False)
    torch.testing.assert_close(grad_x, want_x)


def test_matches_the_transformers_norm():
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    norm = OlmoeRMSNorm(24, eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(2, 5, 24)).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.variance_epsilon), norm(x))


def test_bad_weight_shape_is_refused():
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(torch.randn(2, 8), torch.ones(7), EPS)
