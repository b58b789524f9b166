"""GPT-OSS (``model_type="gpt_oss"``, transformers 5.x): the adapter, i.e. what differs from the generic
integration.

``GptOssModel`` holds the decoder layers; every layer's ``mlp`` is a ``GptOssMLP`` whose router is ``router`` (not
``gate``): ``GptOssTopKRouter`` computes logits with a bias (``linear(x, weight, bias)``), takes the top-k of the raw
logits and weights them by a softmax over the chosen k only, in the logits' dtype. The block returns
``(hidden_states, router_scores)``; the router forward returns ``(logits, scores, indices)``.

``GptOssExperts`` stores ``gate_up_proj [E, H, 2I]`` transposed (``y = x @ W``), gate and up columns interleaved
(gate ``[..., ::2]``, up ``[..., 1::2]``), with ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]`` with
``down_proj_bias [E, H]``; each bias is added after its projection, before the routing weight. Its activation,
:meth:`GptOssAdapter.expert_glu`, is the module's own: ``gate`` clamped above at ``limit``, ``up`` to
``[-limit, limit]``, then ``(up + 1) * gate * sigmoid(alpha * gate)``, with ``alpha`` / ``limit`` read from the
experts module. That layout (:class:`ExpertLayout` data) and this activation are all expert-slice training needs: a
selected expert trains its ``gate_up_proj``, ``down_proj`` and both bias rows, each a slice in the stored layout.
``GptOssRMSNorm`` multiplies by the weight before the cast, so it has no lean-norm replacement.
"""

from __future__ import annotations

from typing import Callable

import torch
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
        gate_up="gate_up_proj", down="down_proj", transposed=True, interleaved=True, has_bias=True,
        gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias",
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

    def expert_glu(self, experts: nn.Module) -> Callable[[Tensor], Tensor]:
        return _ClampedSwiGLU(alpha=float(experts.alpha), limit=float(experts.limit))


class _ClampedSwiGLU:
    """GPT-OSS' gated activation of an interleaved gate/up output ``[..., 2I]``, in ``GptOssExperts``' order of
    operations (so that it is the same bits)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu

    def __repr__(self) -> str:
        return f"GPT-OSS clamped SwiGLU(alpha={self.alpha}, limit={self.limit})"
