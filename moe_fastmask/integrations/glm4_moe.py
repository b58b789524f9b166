"""GLM-4.5 / GLM-4-MoE (``model_type="glm4_moe"``, transformers 5.x): the adapter. Its router
(``Glm4MoeTopkRouter``) is DeepSeek-V3's line for line — float32 projection, sigmoid scores, a selection bias,
group-limited top-k, ``norm_topk_prob`` and ``routed_scaling_factor`` — as are its MoE block (``Glm4MoeMoE`` with
shared experts, dense layers before ``first_k_dense_replace``), experts and RMSNorm; only the classes differ.
"""

from __future__ import annotations

from torch import nn

from moe_fastmask.integrations.deepseek_v3 import DeepseekV3Adapter

__all__ = ["Glm4MoeAdapter"]


class Glm4MoeAdapter(DeepseekV3Adapter):
    """GLM-4-MoE in transformers 5.x (``Glm4MoeForCausalLM`` / ``Glm4MoeModel``)."""

    model_type = "glm4_moe"

    def _classes(self) -> dict[str, type[nn.Module]]:
        from transformers.models.glm4_moe import modeling_glm4_moe as m

        return dict(base=m.Glm4MoeModel, router=m.Glm4MoeTopkRouter, norm=m.Glm4MoeRMSNorm, block=m.Glm4MoeMoE)
