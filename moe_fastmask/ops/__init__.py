"""Public ops of moe_fastmask: the fused router op, the sliced expert MLP, the lean RMSNorm and the chunked
frozen-head cross entropy, with their plain-PyTorch references."""

from moe_fastmask.ops.cross_entropy import FrozenHeadCrossEntropy, cross_entropy_reference, frozen_head_cross_entropy
from moe_fastmask.ops.expert_mlp import (
    ExpertMLP,
    GatedActivation,
    SlicedExpertsFunction,
    sliced_expert_mlp,
    sliced_expert_mlp_reference,
)
from moe_fastmask.ops.reference import route_backward_reference, route_reference
from moe_fastmask.ops.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference
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
    "ExpertMLP",
    "FrozenHeadCrossEntropy",
    "GatedActivation",
    "MAX_N_GROUP",
    "MAX_TOP_K",
    "RMSNormFunction",
    "SCORINGS",
    "RouteFunction",
    "SlicedExpertsFunction",
    "check_route_args",
    "cross_entropy_reference",
    "frozen_head_cross_entropy",
    "resolve_backend",
    "rms_norm",
    "rms_norm_reference",
    "route",
    "route_prechecked",
    "route_backward_reference",
    "route_reference",
    "sliced_expert_mlp",
    "sliced_expert_mlp_reference",
]
