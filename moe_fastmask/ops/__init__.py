"""Public ops of moe_fastmask: the fused router op and its plain-PyTorch reference."""

from moe_fastmask.ops.reference import route_backward_reference, route_reference
from moe_fastmask.ops.route import (
    BACKENDS,
    MAX_N_GROUP,
    MAX_TOP_K,
    SCORINGS,
    RouteFunction,
    check_route_args,
    resolve_backend,
    route,
    route_prechecked,
)

__all__ = [
    "BACKENDS",
    "MAX_N_GROUP",
    "MAX_TOP_K",
    "SCORINGS",
    "RouteFunction",
    "check_route_args",
    "resolve_backend",
    "route",
    "route_prechecked",
    "route_backward_reference",
    "route_reference",
]
