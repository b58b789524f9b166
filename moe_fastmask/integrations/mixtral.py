"""Mixtral (``model_type="mixtral"``, transformers 5.x): the adapter, i.e. what differs from the generic integration.

``MixtralModel`` holds the decoder layers; every layer's ``mlp`` is a ``MixtralSparseMoeBlock`` with a
``MixtralTopKRouter`` (``gate``: softmax over all experts of the float32 logits, top-k, always renormalised — the
softmax over the chosen experts, computed as Mixtral does) whose weights stay float32 whatever the model dtype, and
``MixtralExperts`` (``experts``: fused ``gate_up_proj [E, 2I, H]``, gate rows then up rows, and
``down_proj [E, H, I]``, no bias); no shared experts. The block's training-time jitter noise acts on the hidden
states before the router and is left as it is.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics

__all__ = ["MixtralAdapter"]


class MixtralAdapter(MoEAdapter):
    """Mixtral in transformers 5.x (``MixtralForCausalLM`` / ``MixtralModel``)."""

    model_type = "mixtral"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    expert_layout = ExpertLayout(gate_up="gate_up_proj", down="down_proj")

    def base_model_class(self) -> type[nn.Module]:
        from transformers.models.mixtral.modeling_mixtral import MixtralModel

        return MixtralModel

    def router_class(self) -> type[nn.Module]:
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        return MixtralTopKRouter

    def norm_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

        return (MixtralRMSNorm,)

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        return RouterSemantics(scoring="softmax", renormalize=True)

    def route_input(self, router: nn.Module, logits: Tensor) -> Tensor:
        # Mixtral's routing weights are float32 (softmax of logits.float(), never cast back)
        return logits.float()
