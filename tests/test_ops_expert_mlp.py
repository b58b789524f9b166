"""The sliced expert MLP op against its plain-PyTorch reference: forward and every gradient, random and adversarial
routings, several shapes, dtypes, activations and weight layouts (gate rows then up rows, no bias; transposed with
interleaved gate/up columns, biases and a clamped activation)."""

from __future__ import annotations

import pytest
import torch

from moe_fastmask.ops import (
    ExpertMLP,
    GatedActivation,
    SlicedExpertsFunction,
    sliced_expert_mlp,
    sliced_expert_mlp_reference,
)

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
LAYOUTS = ["concatenated", "transposed_interleaved_biased"]


def clamped_swiglu(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 1.5) -> torch.Tensor:
    """An interleaved gated activation with clamps (GPT-OSS' form); the low limit clamps many random entries."""
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_mlp(layout: str, act, dtype: torch.dtype = torch.float64) -> ExpertMLP:
    if layout == "concatenated":
        return ExpertMLP(GatedActivation(act))
    if dtype == torch.bfloat16:
        # bfloat16 rounding moves entries near a clamp's limit across it (a gradient of 0 instead of 1, or back) in
        # ours or in the float64 reference; the clamps are checked in float32/float64, bfloat16 checks the dtypes
        return ExpertMLP(lambda gate_up: clamped_swiglu(gate_up, limit=1e4), transposed=True)
    return ExpertMLP(clamped_swiglu, transposed=True)


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


def make(shape, case, dtype, seed=0, layout="concatenated"):
    """Inputs of one case: hidden, index, weights, lut, gate_up, down, slices, grad_out, biases (a dict: empty, or
    ``gate_up_bias`` / ``down_bias``)."""
    T, H, I, E, K, selected = shape
    gen = torch.Generator().manual_seed(seed)
    scale = 30.0 if case == "wide_values" else 1.0
    hidden = (scale * torch.randn(T, H, generator=gen, dtype=torch.float64)).to(dtype)
    index = routing(case, T, E, K, selected, gen)
    weights = torch.rand(T, K, generator=gen, dtype=torch.float64)
    if case == "zero_weights":
        weights[::2] = 0.0
    weights = weights.to(dtype)
    transposed, biased = layout != "concatenated", layout != "concatenated"
    gate_up = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) / H**0.5
    down = torch.randn(E, H, I, generator=gen, dtype=torch.float64) / I**0.5
    if transposed:  # stored [E, H, 2I] / [E, I, H]
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    biases = {}
    if biased:
        biases = dict(gate_up_bias=torch.randn(E, 2 * I, generator=gen, dtype=torch.float64).to(dtype),
                      down_bias=torch.randn(E, H, generator=gen, dtype=torch.float64).to(dtype))
    lut = torch.full((E,), -1, dtype=torch.long)
    lut[selected] = torch.arange(len(selected))
    # slices start as copies of their fused rows, then move away so a mix-up of slice and fused row shows
    slices = []
    for e in selected:
        rows = [gate_up[e], down[e]] + [bias[e] for bias in biases.values()]
        slices += [row + 0.1 * torch.randn_like(row) for row in rows]
    grad_out = torch.randn(T, H, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, index, weights, lut, gate_up, down, slices, grad_out, biases


def run(fn, hidden, index, weights, lut, gate_up, down, slices, grad_out, biases, mlp):
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    gate_up = gate_up.clone().requires_grad_(True)  # frozen by the op: must get no gradient
    down = down.clone().requires_grad_(True)
    biases = {name: b.clone().requires_grad_(True) for name, b in biases.items()}
    slices = [s.clone().requires_grad_(True) for s in slices]
    out = fn(hidden, index, weights, lut, gate_up, down, mlp, slices, **biases)
    out.backward(grad_out)
    return out.detach(), hidden.grad, weights.grad, [s.grad for s in slices], [gate_up, down, *biases.values()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}H{s[1]}I{s[2]}E{s[3]}K{s[4]}S{len(s[5])}")
def test_forward_and_gradients_match_the_reference(shape, case, dtype, layout):
    mlp = expert_mlp(layout, torch.nn.SiLU(), dtype)
    inputs = make(shape, case, dtype, layout=layout)
    ours = run(sliced_expert_mlp, *inputs, mlp)
    # the reference in float64 (exact enough to judge every dtype), cast back for the comparison
    wide = [t.double() if t.is_floating_point() else t for t in inputs[:6]]
    biases = {name: b.double() for name, b in inputs[8].items()}
    ref = run(sliced_expert_mlp_reference, *wide, [s.double() for s in inputs[6]], inputs[7].double(), biases, mlp)
    atol, rtol = TOLERANCES[dtype]
    scale = 30.0 if case == "wide_values" else 1.0
    # rounding errors scale with the largest values of a result (the biases make some of them several units)
    magnitude = [max(1.0, float(r.abs().max())) if r is not None else 1.0 for r in ref[:3]]
    assert ours[0].dtype == dtype
    torch.testing.assert_close(ours[0], ref[0].to(dtype), atol=atol * scale**2 * magnitude[0], rtol=rtol)
    torch.testing.assert_close(ours[1], ref[1].to(dtype), atol=atol * scale * magnitude[1], rtol=rtol)  # d hidden
    # d routing weights: accumulated in float32 by the op, whatever the dtype
    w_atol, w_rtol = max(atol, TOLERANCES[torch.float32][0]), max(rtol, TOLERANCES[torch.float32][1])
    torch.testing.assert_close(ours[2], ref[2].to(dtype), atol=w_atol * scale**2 * magnitude[2], rtol=w_rtol)
    assert len(ours[3]) == (4 if inputs[8] else 2) * len(shape[5])
    for got, want, piece in zip(ours[3], ref[3], inputs[6]):  # d slices (zeros when no token chose the expert)
        assert got is not None and got.dtype == dtype and got.shape == piece.shape
        want = torch.zeros_like(piece, dtype=torch.float64) if want is None else want
        size = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want.to(dtype), atol=atol * scale**2 * size, rtol=rtol)  # ~ x * d(gate/up)
    assert all(fused.grad is None for fused in ours[4])


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu"])
def test_gradcheck(act):
    hidden, index, weights, lut, gate_up, down, slices, _, _ = make((7, 6, 4, 5, 2, [1, 3]), "random", torch.float64)
    hidden.requires_grad_(True)
    weights.requires_grad_(True)
    slices = [s.requires_grad_(True) for s in slices]

    def fn(hidden, weights, *slices):
        return SlicedExpertsFunction.apply(hidden, index, weights, lut, gate_up, down, act, None, None, *slices)

    assert torch.autograd.gradcheck(fn, (hidden, weights, *slices))


def test_gradcheck_transposed_interleaved_biased():
    hidden, index, weights, lut, gate_up, down, slices, _, biases = make(
        (7, 6, 4, 5, 2, [1, 3]), "random", torch.float64, layout="transposed_interleaved_biased"
    )
    # clamps at 4.0: gradcheck's finite differences must not straddle a clamp's kink; many entries are still clamped
    mlp = ExpertMLP(lambda gu: clamped_swiglu(gu, limit=4.0), transposed=True)
    hidden = (3.0 * hidden).requires_grad_(True)
    weights.requires_grad_(True)
    slices = [s.requires_grad_(True) for s in slices]

    def fn(hidden, weights, *slices):
        return SlicedExpertsFunction.apply(hidden, index, weights, lut, gate_up, down, mlp, biases["gate_up_bias"],
                                           biases["down_bias"], *slices)

    assert torch.autograd.gradcheck(fn, (hidden, weights, *slices))


def test_reference_equals_the_fused_computation_when_slices_equal_their_rows():
    """The reference itself: with slices equal to their fused rows it is the plain MoE experts sum."""
    hidden, index, weights, lut, gate_up, down, _, _, _ = make((9, 6, 4, 5, 2, [0, 2]), "random", torch.float64)
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


def test_reference_of_the_transposed_biased_layout_written_out():
    """The transposed, interleaved, biased layout written out per token: ``x @ W_gu + b_gu``, gate the even columns,
    up the odd ones, ``@ W_down + b_down``, then the routing weight."""
    hidden, index, weights, lut, gate_up, down, _, _, biases = make(
        (9, 6, 4, 5, 2, [0, 2]), "wide_values", torch.float64, layout="transposed_interleaved_biased"
    )
    b_gu, b_dn = biases["gate_up_bias"], biases["down_bias"]
    slices = [t for e in (0, 2) for t in (gate_up[e], down[e], b_gu[e], b_dn[e])]
    want = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(index.shape[1]):
            e = index[t, j]
            gu = hidden[t] @ gate_up[e] + b_gu[e]
            g, u = gu[0::2].clamp(max=1.5), gu[1::2].clamp(-1.5, 1.5)
            want[t] += weights[t, j] * (((u + 1) * g * torch.sigmoid(1.702 * g)) @ down[e] + b_dn[e])
    mlp = expert_mlp("transposed_interleaved_biased", None)
    got = sliced_expert_mlp_reference(hidden, index, weights, lut, gate_up, down, mlp, slices, **biases)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, mlp, slices, **biases),
                               want)


def test_bad_slices_are_refused():
    hidden, index, weights, lut, gate_up, down, slices, _, _ = make((4, 6, 4, 5, 2, [1, 3]), "random", torch.float32)
    act = torch.nn.SiLU()
    with pytest.raises(ValueError, match="a gate_up and a down tensor per slot; got 3"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices[:3])
    with pytest.raises(ValueError, match="lut names 2 sliced experts but 1 slices were given"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices[:2])
    *_, slices, _, biases = make((4, 6, 4, 5, 2, [1, 3]), "random", torch.float32,
                                 layout="transposed_interleaved_biased")
    with pytest.raises(ValueError, match="a gate_up, a down, a gate_up_bias and a down_bias tensor per slot; got 6"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices[:6], **biases)
    with pytest.raises(ValueError, match="give both"):
        sliced_expert_mlp(hidden, index, weights, lut, gate_up, down, act, slices, gate_up_bias=biases["gate_up_bias"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["random", "one_hot_expert", "none_selected_chosen"])
@pytest.mark.parametrize("shape", [(64, 32, 16, 8, 2, [1, 5]), (300, 64, 32, 16, 4, [0, 3, 7])],
                         ids=lambda s: f"T{s[0]}H{s[1]}I{s[2]}E{s[3]}K{s[4]}S{len(s[5])}")
def test_cuda_grouped_gemm_path_matches_the_reference(shape, case, layout):
    """bfloat16 on CUDA runs the grouped GEMMs (``F.grouped_mm``), transposed weights and their transposes in
    backward included: against the float64 reference on the CPU."""
    dtype = torch.bfloat16
    mlp = expert_mlp(layout, torch.nn.SiLU(), dtype)
    inputs = make(shape, case, dtype, layout=layout)
    on_gpu = [t.cuda() for t in inputs[:6]], [s.cuda() for s in inputs[6]], inputs[7].cuda()
    biases = {name: b.cuda() for name, b in inputs[8].items()}
    ours = run(sliced_expert_mlp, *on_gpu[0], on_gpu[1], on_gpu[2], biases, mlp)
    wide = [t.double() if t.is_floating_point() else t for t in inputs[:6]]
    ref = run(sliced_expert_mlp_reference, *wide, [s.double() for s in inputs[6]], inputs[7].double(),
              {name: b.double() for name, b in inputs[8].items()}, mlp)
    atol, rtol = TOLERANCES[dtype]
    for got, want in [*zip(ours[:3], ref[:3]), *zip(ours[3], ref[3])]:
        want = torch.zeros(got.shape, dtype=torch.float64) if want is None else want  # the reference is on the CPU
        size = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.cpu(), want.to(dtype), atol=atol * size, rtol=rtol)
    assert all(fused.grad is None for fused in ours[4])
