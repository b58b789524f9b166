"""Plugging the fused router op into model code (transformers MoE models, one adapter per model family).

Generic parts: :mod:`~moe_fastmask.integrations.patch` (``apply`` / ``remove``, the patched router forward, the
token-group pre-hook), :mod:`~moe_fastmask.integrations.state`, :mod:`~moe_fastmask.integrations.masks`,
:mod:`~moe_fastmask.integrations.recorder`, :mod:`~moe_fastmask.integrations.labels` and
:mod:`~moe_fastmask.integrations.expert_slices`. Per family: one :class:`MoEAdapter` subclass (e.g.
:mod:`~moe_fastmask.integrations.olmoe`) and one line in :mod:`~moe_fastmask.integrations.registry`.
"""

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter, RouterSemantics
from moe_fastmask.integrations.labels import layer_expert_label, parse_layer_expert
from moe_fastmask.integrations.masks import set_expert_mask, steering_mask, token_groups
from moe_fastmask.integrations.olmoe import OlmoeAdapter
from moe_fastmask.integrations.patch import apply, apply_to_olmoe, remove, remove_from_olmoe
from moe_fastmask.integrations.recorder import RoutingRecorder
from moe_fastmask.integrations.registry import (
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from moe_fastmask.integrations.state import FastmaskState, is_patched

__all__ = [
    "ExpertLayout",
    "FastmaskState",
    "MoEAdapter",
    "OlmoeAdapter",
    "RouterSemantics",
    "RoutingRecorder",
    "UnsupportedModelError",
    "apply",
    "apply_to_olmoe",
    "get_adapter",
    "is_patched",
    "layer_expert_label",
    "parse_layer_expert",
    "register_adapter",
    "remove",
    "remove_from_olmoe",
    "set_expert_mask",
    "steering_mask",
    "supported_model_types",
    "token_groups",
]
