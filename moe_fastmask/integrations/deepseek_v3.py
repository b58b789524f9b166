"""DeepSeek-V3 (``model_type="deepseek_v3"``, transformers 5.x): the adapter, i.e. what differs from the generic
integration.

``DeepseekV3Model`` holds the decoder layers; the first ``first_k_dense_replace`` layers have a dense
``DeepseekV3MLP`` (skipped: MoE layers are counted among the ``DeepseekV3MoE`` blocks only). The router
``DeepseekV3TopkRouter`` (``gate``) projects in float32 (``linear(x.float(), weight.float())``), scores
``s = sigmoid(logits)``, chooses by ``s + e_score_correction_bias`` within the ``topk_group`` best of ``n_group``
expert groups (a group scores the sum of its two best biased scores), weights by the chosen ``s`` (no bias),
renormalised by ``sum + 1e-20`` when ``norm_topk_prob``, times ``routed_scaling_factor``; the weights stay float32.
``DeepseekV3Experts`` (``experts``): fused ``gate_up_proj [E, 2I, H]``, gate rows then up rows, ``down_proj
[E, H, I]``, no bias. The shared experts (``shared_experts``) are untouched by routing and never made trainable by
expert slices.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics

__all__ = ["DeepseekV3Adapter"]


class DeepseekV3Adapter(MoEAdapter):
    """DeepSeek-V3 in transformers 5.x (``DeepseekV3ForCausalLM`` / ``DeepseekV3Model``)."""

    model_type = "deepseek_v3"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    expert_layout = ExpertLayout(gate_up="gate_up_proj", down="down_proj")

    def _classes(self) -> dict[str, type[nn.Module]]:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

        return dict(base=m.DeepseekV3Model, router=m.DeepseekV3TopkRouter, norm=m.DeepseekV3RMSNorm,
                    block=m.DeepseekV3MoE)

    def base_model_class(self) -> type[nn.Module]:
        return self._classes()["base"]

    def router_class(self) -> type[nn.Module]:
        return self._classes()["router"]

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        return (self._classes()["norm"],)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        return isinstance(layer.mlp, self._classes()["block"])

    def moe_layer_indices(self, config) -> list[int]:
        return list(range(int(config.first_k_dense_replace), int(config.num_hidden_layers)))

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        num_groups = int(router.num_group)
        return RouterSemantics(
            scoring="sigmoid",
            renormalize=bool(router.norm_topk_prob),
            selection_bias=True,
            num_groups=num_groups,
            topk_groups=int(router.topk_group) if num_groups > 1 else 1,
            scaling_factor=float(router.routed_scaling_factor),
            shared_experts=True,
        )

    def router_logits(self, router: nn.Module, hidden_states: Tensor) -> Tensor:
        return F.linear(hidden_states.reshape(-1, router.hidden_dim).float(), router.weight.float())

    def selection_bias(self, router: nn.Module) -> Tensor:
        return router.e_score_correction_bias
