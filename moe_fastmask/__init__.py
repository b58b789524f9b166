"""moe_fastmask: fused masked MoE routing kernels and a pipeline for safety analysis and repair of MoE models."""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

# The public names load on first use, so that ``moe-fastmask --help`` and the light pipeline modules (settings,
# data checks) start without importing torch. The op ``torch.ops.moe_fastmask.route`` is registered as soon as
# torch is there: now if it is imported already, else right after its import (see _RegisterOpsAfterTorch).
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


class _RegisterOpsAfterTorch(importlib.abc.MetaPathFinder):
    """Imports :mod:`moe_fastmask.ops` (which registers the custom ops) once a later ``import torch`` finishes."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; the normal finders locate torch
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            try:
                importlib.import_module("moe_fastmask.ops")
            except Exception as exc:  # never let our registration break the user's ``import torch``
                import warnings

                warnings.warn(f"moe_fastmask: registering torch.ops.moe_fastmask failed ({exc!r}); it is retried "
                              f"when moe_fastmask.ops is imported", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


if "torch" in sys.modules:
    importlib.import_module("moe_fastmask.ops")
elif not any(isinstance(finder, _RegisterOpsAfterTorch) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOpsAfterTorch())


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
