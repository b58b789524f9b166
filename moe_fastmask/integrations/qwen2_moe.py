"""Qwen2-MoE (``model_type="qwen2_moe"``, transformers 5.x): the adapter, i.e. what differs from the generic
integration.

``Qwen2MoeModel`` holds the decoder layers; a layer's ``mlp`` is a ``Qwen2MoeSparseMoeBlock`` unless the layer is in
``mlp_only_layers`` or off the ``decoder_sparse_step`` (then a dense ``Qwen2MoeMLP``, skipped). The router
``Qwen2MoeTopKRouter`` (``gate``): softmax over all experts in float32, top-k, renormalised when ``norm_topk_prob``
(False for Qwen1.5-MoE-A2.7B), cast to the logits' dtype. ``Qwen2MoeExperts`` (``experts``): fused
``gate_up_proj [E, 2I, H]``, gate rows then up rows, and ``down_proj [E, H, I]``, no bias. The block also runs a
shared expert (``shared_expert``, gated by ``sigmoid(shared_expert_gate(x))``) that routing never touches and expert
slices never make trainable.
"""

from __future__ import annotations

from torch import nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics

__all__ = ["Qwen2MoeAdapter"]


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE in transformers 5.x (``Qwen2MoeForCausalLM`` / ``Qwen2MoeModel``)."""

    model_type = "qwen2_moe"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    expert_layout = ExpertLayout(gate_up="gate_up_proj", down="down_proj")

    def base_model_class(self) -> type[nn.Module]:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeModel

        return Qwen2MoeModel

    def router_class(self) -> type[nn.Module]:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

        return Qwen2MoeTopKRouter

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRMSNorm

        return (Qwen2MoeRMSNorm,)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        return isinstance(layer.mlp, Qwen2MoeSparseMoeBlock)

    def moe_layer_indices(self, config) -> list[int]:
        # the decoder layer's rule: MoE unless in mlp_only_layers, on every decoder_sparse_step-th layer
        return [
            i for i in range(config.num_hidden_layers)
            if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        ]

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        return RouterSemantics(scoring="softmax", renormalize=bool(router.norm_topk_prob), shared_experts=True)
