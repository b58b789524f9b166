"""moe_fastmask: fused masked MoE routing kernels and a pipeline for safety analysis and repair of MoE models."""

from moe_fastmask.ops import route, route_reference

__version__ = "0.1.0"

__all__ = ["route", "route_reference", "__version__"]
