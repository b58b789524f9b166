"""The model families moe_fastmask can patch, keyed by ``config.model_type``: one line per family."""

from __future__ import annotations

from torch import nn

from moe_fastmask.integrations.adapter import MoEAdapter
from moe_fastmask.integrations.deepseek_v3 import DeepseekV3Adapter
from moe_fastmask.integrations.glm4_moe import Glm4MoeAdapter
from moe_fastmask.integrations.gpt_oss import GptOssAdapter
from moe_fastmask.integrations.mixtral import MixtralAdapter
from moe_fastmask.integrations.olmoe import OlmoeAdapter
from moe_fastmask.integrations.qwen2_moe import Qwen2MoeAdapter
from moe_fastmask.integrations.qwen3_moe import Qwen3MoeAdapter

_ADAPTERS: dict[str, MoEAdapter] = {}


class UnsupportedModelError(TypeError):
    """The model's ``config.model_type`` has no registered adapter."""


def register_adapter(adapter: MoEAdapter, *, replace: bool = False) -> MoEAdapter:
    """Register ``adapter`` for its ``model_type``; a second adapter for one type needs ``replace=True``."""
    if not isinstance(adapter, MoEAdapter) or not adapter.model_type:
        raise TypeError(f"expected an MoEAdapter instance with a model_type, got {adapter!r}")
    if adapter.model_type in _ADAPTERS and not replace:
        raise ValueError(f"an adapter for model_type {adapter.model_type!r} is already registered")
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a registered adapter, sorted."""
    return sorted(_ADAPTERS)


def _model_type(model: nn.Module | str) -> str | None:
    if isinstance(model, str):
        return model
    config = getattr(model, "config", None)
    if config is None:  # a wrapper (DDP, a PEFT model, ...): the first submodule with a config
        config = next((m.config for m in model.modules() if getattr(m, "config", None) is not None), None)
    return getattr(config, "model_type", None)


def get_adapter(model: nn.Module | str) -> MoEAdapter:
    """The adapter of ``model`` (or of a ``config.model_type`` string); a clear error for unsupported types."""
    model_type = _model_type(model)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
        raise UnsupportedModelError(
            f"moe_fastmask has no adapter for {what}; supported model types: {', '.join(supported_model_types())}"
        )
    return adapter


register_adapter(OlmoeAdapter())
register_adapter(Qwen2MoeAdapter())
register_adapter(Qwen3MoeAdapter())
register_adapter(MixtralAdapter())
register_adapter(GptOssAdapter())
register_adapter(DeepseekV3Adapter())
register_adapter(Glm4MoeAdapter())
