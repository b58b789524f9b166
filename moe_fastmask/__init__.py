"""moe_fastmask: fused masked MoE routing kernels and a pipeline for safety analysis and repair of MoE models."""

import importlib
from typing import TYPE_CHECKING, Any

# The public names load on first use, so that ``moe-fastmask --help`` and the light pipeline modules (settings,
# data checks) start without importing torch.
_LAZY = {
    **{name: "moe_fastmask.integrations" for name in (
        "RoutingRecorder", "apply", "apply_to_olmoe", "get_adapter", "is_patched", "layer_expert_label",
        "parse_layer_expert", "register_adapter", "remove", "remove_from_olmoe", "set_expert_mask", "steering_mask",
        "token_groups",
    )},
    "route": "moe_fastmask.ops",
    "route_reference": "moe_fastmask.ops",
}  # fmt: skip

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moe_fastmask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
