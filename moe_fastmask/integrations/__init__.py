"""Plugging the fused router op into model code (OLMoE in transformers first)."""

from moe_fastmask.integrations.olmoe import (
    RoutingRecorder,
    apply_to_olmoe,
    is_patched,
    layer_expert_label,
    parse_layer_expert,
    remove_from_olmoe,
    set_expert_mask,
    steering_mask,
    token_groups,
)

MODEL_TYPE_TO_APPLY_FN = {"olmoe": apply_to_olmoe}
MODEL_TYPE_TO_REMOVE_FN = {"olmoe": remove_from_olmoe}

__all__ = [
    "MODEL_TYPE_TO_APPLY_FN",
    "MODEL_TYPE_TO_REMOVE_FN",
    "RoutingRecorder",
    "apply_to_olmoe",
    "is_patched",
    "layer_expert_label",
    "parse_layer_expert",
    "remove_from_olmoe",
    "set_expert_mask",
    "steering_mask",
    "token_groups",
]
