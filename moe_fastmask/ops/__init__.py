"""Public ops of moe_fastmask: the fused router op, the chunked frozen-head cross entropy, and their plain-PyTorch
references."""

from moe_fastmask.ops.cross_entropy import FrozenHeadCrossEntropy, cross_entropy_reference, frozen_head_cross_entropy
from moe_fastmask.ops.reference import route_backward_reference, route_reference
from moe_fastmask.ops.route import (
    BACKENDS,
    MAX_TOP_K,
    RouteFunction,
    check_route_args,
    resolve_backend,
    route,
    route_prechecked,
)

__all__ = [
    "BACKENDS",
    "FrozenHeadCrossEntropy",
    "MAX_TOP_K",
    "RouteFunction",
    "check_route_args",
    "cross_entropy_reference",
    "frozen_head_cross_entropy",
    "resolve_backend",
    "route",
    "route_prechecked",
    "route_backward_reference",
    "route_reference",
]
