"""The sliced expert MLP op against its plain-PyTorch reference: forward and every gradient, random and adversarial
routings, several shapes, dtypes and activations."""

from __future__ import annotations

import pytest
import torch

from moe_fastmask.ops import SlicedExpertsFunction, sliced_expert_mlp, sliced_expert_mlp_reference

# (tokens, hidden, intermediate, experts, top_k, selected experts)
SHAPES = [
    (1, 4, 3, 3, 1, [0]),
    (7, 6, 4, 5, 2, [1, 3]),
    (33, 16, 8, 8, 3, [0, 7]),
    (20, 8, 4, 6, 2, []),
    (12, 8, 4, 4, 2, [0, 1, 2, 3]),
]
CASES = ["random", "all_selected", "none_selected_chosen", "one_hot_expert", "wide_values", "zero_weights"]
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def routing(case: str, T: int, E: int, K: int, selected: list[int], gen: torch.Generator) -> torch.Tensor:
    """``[T, K]`` distinct expert ids per token for the case."""
    scores = torch.rand(T, E, generator=gen)
    if case == "all_selected" and len(selected) >= K:
        scores[:, selected] += 10.0
    elif case == "none_selected_chosen" and E - len(selected) >= K:
        scores[:, selected] -= 10.0
    elif case == "one_hot_expert":
        scores[:, E - 1] += 10.0  # every token picks the same expert first
    return scores.topk(K, dim=-1).indices


def make(shape, case, dtype, seed=0):
    T, H, I, E, K, selected = shape
    gen = torch.Generator().manual_seed(seed)
    scale = 30.0 if case == "wide_values" else 1.0
    hidden = (scale * torch.randn(T, H, generator=gen, dtype=torch.float64)).to(dtype)
    index = routing(case, T, E, K, selected, gen)
    weights = torch.rand(T, K, generator=gen, dtype=torch.float64)
    if case == "zero_weights":
        weights[::2] = 0.0
    weights = weights.to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen, dtype=torch.float64) / I**0.5).to(dtype)
    lut = torch.full((E,), -1, dtype=torch.long)
    lut[selected] = torch.arange(len(selected))
    # slices start as copies of their fused rows, then move away so a mix-up of slice and fused row shows
    slices = []
    for e in selected:
        slices += [gate_up[e] + 0.1 * torch.randn_like(gate_up[e]), down[e] + 0.1 * torch.randn_like(down[e])]
    grad_out = torch.randn(T, H, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, index, weights, lut, gate_up, down, slices, grad_out


def run(fn, hidden, index, weights, lut, gate_up, down, slices, grad_out, act):
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    gate_up = gate_up.clone().requires_grad_(True)  # frozen by the op: must get no gradient
    down = down.clone().requires_grad_(True)
    slices = [s.clone().requires_grad_(True) for s in slices]
    out = fn(hidden, index, weights, lut, gate_up, down, act, slices)
    out.backward(grad_out)
    return out.detach(), hidden.grad, weights.grad, [s.grad for s in slices], gate_up, down


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}H{s[1]}I{s[2]}E{s[3]}K{s[4]}S{len(s[5])}")
def test_forward_and_gradients_match_the_reference(shape, case, dtype):
    act = torch.nn.SiLU()
    inputs = make(shape, case, dtype)
    ours = run(sliced_expert_mlp, *inputs, act)
    # the reference in float64 (exact enough to judge every dtype), cast back for the comparison
    wide = [t.double() if t.is_floating_point() else t for t in inputs[:6]]
    ref = run(sliced_expert_mlp_reference, *wide, [s.double() for s in inputs[6]], inputs[7].double(), act)
    atol, rtol = TOLERANCES[dtype]
    scale = 30.0 if case == "wide_values" else 1.0
    assert ours[0].dtype == dtype
    torch.testing.assert_close(ours[0], ref[0].to(dtype), atol=atol * scale**2, rtol=rtol)  # ~ act(gate) * up
    torch.testing.assert_close(ours[1], ref[1].to(dtype), atol=atol * scale, rtol=rtol)  # d hidden
    # d routing weights: accumulated in float32 by the op, whatever the dtype
    w_atol, w_rtol = max(atol, TOLERANCES[torch.float32][0]), max(rtol, TOLERANCES[torch.float32][1])
    torch.testing.assert_close(ours[2], ref[2].to(dtype), atol=w_atol * scale**2, rtol=w_rtol)
    assert len(ours[3]) == 2 * len(shape[5])
    for got, want, piece in zip(ours[3], ref[3], inputs[6]):  # d slices (zeros when no token chose the expert)
        assert got is not None and got.dtype == dtype
        want = torch.zeros_like(piece, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got, want.to(dtype), atol=atol * scale**2, rtol=rtol)  # ~ x * d(gate/up)
    gate_up, down = ours[4], ours[5]
    assert gate_up.grad is None and down.grad is None


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu"])
def test_gradcheck(act):
    hidden, index, weights, lut, gate_up, down, slices, _ = make((7, 6, 4, 5, 2, [1, 3]), "random", torch.float64)
    hidden.requires_grad_(True)
    weights.requires_grad_(True)
    slices = [s.requires_grad_(True) for s in slices]

    def fn(hidden, weights, *slices):
        return SlicedExpertsFunction.apply(hidden, index, weights, lut, gate_up, down, act, *slices)

    assert torch.autograd.gradcheck(fn, (hidden, weights, *slices))


def test_reference_equals_the_fused_computation_when_slices_equal_their_rows():
    """The reference itself: with slices equal to their fused rows it is the plain MoE experts sum."""
    hidden, index, weights, lut, gate_up, down, _, _ = make((9, 6, 4, 5, 2, [0, 2]), "random", torch.float64)
    slices = [t for e in (0, 2) for t in (gate_up[e], down[e])]
    act = torch.nn.SiLU()
    want = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(index.shape[1]):
            e = index[t, j]
            g, u = (gate_up[e] @ hidden[t]).chunk(2)
            want[t] += weights[t, j] * (down[e] @ (act(g) * u))
    got = sliced_expert_mlp_reference(hidden, index, weights, lut, gate_up, down, act, slices)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices), want)


def test_bad_slices_are_refused():
    hidden, index, weights, lut, gate_up, down, slices, _ = make((4, 6, 4, 5, 2, [1, 3]), "random", torch.float32)
    act = torch.nn.SiLU()
    with pytest.raises(ValueError, match="a gate_up and a down tensor per slot; got 3"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices[:3])
    with pytest.raises(ValueError, match="lut names 2 sliced experts but 1 slices were given"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices[:2])
