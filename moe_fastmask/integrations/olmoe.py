"""OLMoE (``model_type="olmoe"``, transformers 5.x): the adapter, i.e. what differs from the generic integration.

``OlmoeModel`` holds the decoder layers; every layer's ``mlp`` is an MoE block with an ``OlmoeTopKRouter`` (``gate``:
softmax over all experts, top-k, renormalised when ``norm_topk_prob``) and ``OlmoeExperts`` (``experts``: fused
``gate_up_proj [E, 2I, H]``, gate rows then up rows, and ``down_proj [E, H, I]``, no bias); no shared experts.
``OlmoeRMSNorm`` casts to the input dtype before the weight multiply. Everything else is generic:
:func:`moe_fastmask.apply` patches an OLMoE model through :class:`OlmoeAdapter`.
"""

from __future__ import annotations

from torch import nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics
# the label helpers have always been importable from here
from moe_fastmask.integrations.labels import layer_expert_label, parse_layer_expert

__all__ = ["OlmoeAdapter", "layer_expert_label", "parse_layer_expert"]


class OlmoeAdapter(MoEAdapter):
    """OLMoE in transformers 5.x (``OlmoeForCausalLM`` / ``OlmoeModel``)."""

    model_type = "olmoe"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    expert_layout = ExpertLayout(gate_up="gate_up_proj", down="down_proj")

    def base_model_class(self) -> type[nn.Module]:
        from transformers.models.olmoe.modeling_olmoe import OlmoeModel

        return OlmoeModel

    def router_class(self) -> type[nn.Module]:
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        return OlmoeTopKRouter

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

        return (OlmoeRMSNorm,)

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        return RouterSemantics(scoring="softmax", renormalize=bool(router.norm_topk_prob))
