"""moe_fastmask: fused masked MoE routing kernels and a pipeline for safety analysis and repair of MoE models."""

from moe_fastmask.integrations import (
    RoutingRecorder,
    apply,
    apply_to_olmoe,
    get_adapter,
    is_patched,
    layer_expert_label,
    parse_layer_expert,
    register_adapter,
    remove,
    remove_from_olmoe,
    set_expert_mask,
    steering_mask,
    token_groups,
)
from moe_fastmask.ops import route, route_reference

__version__ = "0.1.0"

__all__ = [
    "RoutingRecorder",
    "__version__",
    "apply",
    "apply_to_olmoe",
    "get_adapter",
    "is_patched",
    "layer_expert_label",
    "parse_layer_expert",
    "register_adapter",
    "remove",
    "remove_from_olmoe",
    "route",
    "route_reference",
    "set_expert_mask",
    "steering_mask",
    "token_groups",
]
