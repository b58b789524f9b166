"""GPT-OSS (``model_type="gpt_oss"``, transformers 5.x): the adapter, i.e. what differs from the generic
integration.

``GptOssModel`` holds the decoder layers; every layer's ``mlp`` is a ``GptOssMLP`` whose router is ``router`` (not
``gate``): ``GptOssTopKRouter`` computes logits with a bias (``linear(x, weight, bias)``), takes the top-k of the raw
logits and weights them by a softmax over the chosen k only, in the logits' dtype. The block returns
``(hidden_states, router_scores)``; the router forward returns ``(logits, scores, indices)``.

``GptOssExperts`` stores ``gate_up_proj [E, H, 2I]`` transposed, gate and up columns interleaved, with
``gate_up_proj_bias``, ``down_proj [E, I, H]`` with ``down_proj_bias``, and a clamped ``gate * sigmoid(alpha * gate)``
activation: routing, masks, counts, steering and analysis work, but expert-slice training does not take this layout
(:func:`moe_fastmask.integrations.expert_slices.attach_expert_slices` refuses it, naming the family).
``GptOssRMSNorm`` multiplies by the weight before the cast, so it has no lean-norm replacement.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics

__all__ = ["GptOssAdapter"]


class GptOssAdapter(MoEAdapter):
    """GPT-OSS in transformers 5.x (``GptOssForCausalLM`` / ``GptOssModel``)."""

    model_type = "gpt_oss"
    min_transformers = "5.0.0"
    max_transformers = "6.0.0"
    router_attr = "router"
    expert_layout = ExpertLayout(
        gate_up="gate_up_proj", down="down_proj", transposed=True, interleaved=True, has_bias=True
    )

    def base_model_class(self) -> type[nn.Module]:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssModel

        return GptOssModel

    def router_class(self) -> type[nn.Module]:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

        return GptOssTopKRouter

    def router_semantics(self, router: nn.Module) -> RouterSemantics:
        return RouterSemantics(scoring="softmax", softmax_after_topk=True)

    def router_logits(self, router: nn.Module, hidden_states: Tensor) -> Tensor:
        return F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight, router.bias)
