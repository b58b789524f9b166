"""Qwen3-MoE (``model_type="qwen3_moe"``, transformers 5.x): the adapter, i.e. what differs from the generic
integration.

``Qwen3MoeModel`` holds the decoder layers; a layer's ``mlp`` is a ``Qwen3MoeSparseMoeBlock`` unless the layer is in
``mlp_only_layers`` or off the ``decoder_sparse_step`` (then a dense ``Qwen3MoeMLP``, skipped). The router
``Qwen3MoeTopKRouter`` (``gate``): softmax over all experts in float32, top-k, renormalised when ``norm_topk_prob``
(True for the released models), cast to the logits' dtype. ``Qwen3MoeExperts`` (``experts``): fused
``gate_up_proj [E, 2I, H]``, gate rows then up rows, and ``down_proj [E, H, I]``, no bias; no shared experts.
"""

from __future__ import annotations

from torch import nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics

__all__ = ["Qwen3MoeAdapter"]


class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-MoE in transformers 5.x (``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel``)."""

    model_type = "qwen3_moe"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    expert_layout = ExpertLayout(gate_up="gate_up_proj", down="down_proj")

    def base_model_class(self) -> type[nn.Module]:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeModel

        return Qwen3MoeModel

    def router_class(self) -> type[nn.Module]:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        return Qwen3MoeTopKRouter

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

        return (Qwen3MoeRMSNorm,)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        return isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)

    def moe_layer_indices(self, config) -> list[int]:
        # the decoder layer's rule: MoE unless in mlp_only_layers, on every decoder_sparse_step-th layer
        return [
            i for i in range(config.num_hidden_layers)
            if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        ]

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        return RouterSemantics(scoring="softmax", renormalize=bool(router.norm_topk_prob))
