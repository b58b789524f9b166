"""The adapter registry: dispatch on ``config.model_type``, clear errors for unsupported families, apply/remove
through the generic API, and a second family plugged in as one adapter class plus one registration (a tiny
Mixtral, registered only inside these tests)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import moe_fastmask as mf
from moe_fastmask.integrations import (
    ExpertLayout,
    MoEAdapter,
    OlmoeAdapter,
    RouterSemantics,
    UnsupportedModelError,
    expert_slices,
    register_adapter,
    registry,
    supported_model_types,
)
from moe_fastmask.pipeline.demo import tiny_olmoe_config


def tiny_olmoe(seed: int = 0):
    torch.manual_seed(seed)
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM(tiny_olmoe_config(96, num_layers=2, num_experts=8, top_k=2)).eval()
    with torch.no_grad():  # decisive routing: random tiny routers are near-uniform
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(4.0)
    return model


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


class MixtralTestAdapter(MoEAdapter):
    """What a Mixtral adapter needs on top of the defaults (Mixtral always renormalises the top-k weights)."""

    model_type = "mixtral"
    expert_layout = ExpertLayout()

    def base_model_class(self):
        from transformers.models.mixtral.modeling_mixtral import MixtralModel

        return MixtralModel

    def router_class(self):
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        return MixtralTopKRouter

    def norm_classes(self):
        from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

        return (MixtralRMSNorm,)

    def router_semantics(self, router):
        return RouterSemantics(scoring="softmax", renormalize=True)


@pytest.fixture
def mixtral_unregistered():
    """The shipped Mixtral adapter taken out for the test (a tiny Mixtral then stands for an unknown family)."""
    shipped = registry._ADAPTERS.pop("mixtral", None)
    try:
        yield
    finally:
        registry._ADAPTERS.pop("mixtral", None)
        if shipped is not None:
            registry._ADAPTERS["mixtral"] = shipped


@pytest.fixture
def mixtral_registered(mixtral_unregistered):
    return register_adapter(MixtralTestAdapter())


IDS = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(5))


def test_dispatch_by_model_type():
    model = tiny_olmoe()
    adapter = mf.get_adapter(model)
    assert isinstance(adapter, OlmoeAdapter) and adapter.model_type == "olmoe"
    assert mf.get_adapter("olmoe") is adapter
    assert mf.get_adapter(model.model) is adapter  # the base model carries the config too
    assert "olmoe" in supported_model_types()
    assert adapter.base_model(model) is model.model
    assert adapter.routers(model.model) == [layer.mlp.gate for layer in model.model.layers]
    assert adapter.router_semantics(model.model.layers[0].mlp.gate) == RouterSemantics(renormalize=False)
    assert mf.apply_to_olmoe is mf.apply and mf.remove_from_olmoe is mf.remove


def test_unknown_model_type_gets_a_clear_error(mixtral_unregistered):
    model = tiny_mixtral()
    for call in (
        mf.apply,
        mf.remove,
        mf.is_patched,
        mf.get_adapter,
        lambda m: mf.RoutingRecorder(m),
        lambda m: expert_slices.attach_expert_slices(m, {0: [1]}),
    ):
        with pytest.raises(UnsupportedModelError, match=r"model_type 'mixtral'.*supported model types: .*olmoe"):
            call(model)
    assert "forward" not in model.model.layers[0].mlp.gate.__dict__  # nothing was patched on the way
    with pytest.raises(UnsupportedModelError, match=r"Linear \(no config.model_type\)"):
        mf.get_adapter(nn.Linear(2, 2))


def test_apply_remove_round_trip():
    model = tiny_olmoe()
    gate = model.model.layers[1].mlp.gate
    original_source = inspect.getsource(gate.forward)
    with torch.no_grad():
        expected = model(IDS).logits
        assert mf.apply(model, backend="torch") is model and mf.is_patched(model)
        assert mf.integrations.state.state_of(model).backend == "torch"
        assert inspect.getsource(gate.forward) != original_source
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        mf.apply(model)  # idempotent: only the backend changes
        assert mf.integrations.state.state_of(model).backend == "auto" and len(model.model._forward_pre_hooks) == 1
        assert mf.remove(model) is model and not mf.is_patched(model)
        assert "forward" not in gate.__dict__ and not model.model._forward_pre_hooks
        assert torch.equal(model(IDS).logits, expected)
    assert mf.remove(model) is model  # removing twice is a no-op


def test_register_adapter_rejects_duplicates_and_non_adapters(mixtral_registered):
    with pytest.raises(ValueError, match="'mixtral' is already registered"):
        register_adapter(MixtralTestAdapter())
    assert register_adapter(MixtralTestAdapter(), replace=True).model_type == "mixtral"
    with pytest.raises(TypeError, match="MoEAdapter"):
        register_adapter(object())
    assert {"mixtral", "olmoe"} <= set(supported_model_types())


def test_a_second_family_is_one_adapter_away(mixtral_registered):
    """The generic code runs a tiny Mixtral through its adapter: same logits, masks hold, counts add up."""
    model = tiny_mixtral()
    with torch.no_grad():
        expected = model(IDS).logits
        mf.apply(model)
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        keep = mf.steering_mask(model, ["L00_E01", (1, 4)])
        mf.set_expert_mask(model, keep)
        rec = mf.RoutingRecorder(model, num_groups=2, record_token_experts=True)
        with rec.record([0, 1, 0]):
            model(IDS)
    counts = rec.prefill_counts
    assert counts.shape == (2, 2, 6) and int(counts[0, :, 1].sum()) == 0 and int(counts[1, :, 4].sum()) == 0
    assert rec.prefill_tokens.tolist() == [2 * 9, 9]
    chosen = rec.token_experts()["prefill"]  # [B, S, L, K]
    assert not (chosen[:, :, 0] == 1).any() and not (chosen[:, :, 1] == 4).any()
    mf.remove(model)
    assert "forward" not in model.model.layers[0].mlp.gate.__dict__


def test_expert_slices_follow_the_adapter(mixtral_registered):
    """Slices on a tiny Mixtral: the same outputs and gradients as training the fused tensors directly."""
    reference = tiny_mixtral(seed=2)
    reference.config._experts_implementation = "eager"
    ours = copy.deepcopy(reference)
    for p in reference.parameters():
        p.requires_grad_(False)
    for layer in reference.model.layers:
        layer.mlp.experts.gate_up_proj.requires_grad_(True)
        layer.mlp.experts.down_proj.requires_grad_(True)
    reference(IDS, labels=IDS).loss.backward()
    selected = {0: [1, 3], 1: [5]}
    for memory_efficient in (True, False):
        model = copy.deepcopy(ours)
        params = expert_slices.attach_expert_slices(model, selected, memory_efficient=memory_efficient)
        assert len(params) == 6
        norms = [m for m in model.modules() if "forward" in m.__dict__ and "RMSNorm" in type(m).__name__]
        assert len(norms) == (2 * 2 + 1 if memory_efficient else 0)  # the adapter's norm class, lean when asked
        model(IDS, labels=IDS).loss.backward()
        for layer, experts in selected.items():
            module, ref = model.model.layers[layer].mlp.experts, reference.model.layers[layer].mlp.experts
            for e in experts:
                torch.testing.assert_close(getattr(module, f"fastmask_gate_up_proj_{e}").grad, ref.gate_up_proj.grad[e])
                torch.testing.assert_close(getattr(module, f"fastmask_down_proj_{e}").grad, ref.down_proj.grad[e])
        expert_slices.detach_expert_slices(model)
        assert all("forward" not in m.__dict__ for m in model.modules())


class _SigmoidRouterAdapter(MixtralTestAdapter):
    def router_semantics(self, router):
        return RouterSemantics(scoring="sigmoid", num_groups=4, topk_groups=1)  # 6 experts: not 4 groups


class _TransposedExpertsAdapter(MixtralTestAdapter):
    expert_layout = ExpertLayout(transposed=True, has_bias=True)


class _InterleavedExpertsAdapter(MixtralTestAdapter):
    expert_layout = ExpertLayout(interleaved=True)


def test_semantics_and_layouts_the_ops_cannot_run_are_refused(mixtral_unregistered):
    register_adapter(_SigmoidRouterAdapter())
    model = tiny_mixtral()
    with pytest.raises(NotImplementedError, match=r"mixtral layer 0: .*n_group must divide E=6"):
        mf.apply(model)
    assert not mf.is_patched(model)
    # an adapter whose layout the experts modules do not hold: refused before anything changes
    register_adapter(_TransposedExpertsAdapter(), replace=True)
    with pytest.raises(TypeError, match=r"MoE layer 0: the mixtral experts module \(MixtralExperts\) does not match "
                                        r"its adapter's expert layout .*: no fused gate_up_proj_bias, down_proj_bias"):
        expert_slices.attach_expert_slices(model, {0: [1]})
    register_adapter(_InterleavedExpertsAdapter(), replace=True)
    with pytest.raises(TypeError, match=r"does not match its adapter's expert layout .*: is_concatenated=True"):
        expert_slices.attach_expert_slices(model, {0: [1]})
    assert all(p.requires_grad for p in model.parameters())
    assert not any("fastmask" in name for name, _ in model.named_parameters())


def test_transformers_range_is_checked(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "6.1.0")
    with pytest.raises(RuntimeError, match=r"olmoe integration supports transformers >= 5.0.0, < 6.0.0; found 6.1.0"):
        mf.apply(tiny_olmoe())
