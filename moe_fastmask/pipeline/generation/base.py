"""The generation-backend protocol, its request / output records, and the backend registry."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

# name -> "module:attribute" of the backend class; imported on first use, so an engine's own dependencies (vLLM, ...)
# are needed only by the runs that choose it. A new backend is one module and one line here.
BACKENDS: dict[str, str] = {
    "hf": "moe_fastmask.pipeline.generation.hf:HFGenerateBackend",
    "graph": "moe_fastmask.pipeline.generation.engine:StaticCacheEngine",
    "vllm": "moe_fastmask.pipeline.generation.vllm:VLLMBackend",
}
DEFAULT_BACKEND = "hf"
# ``--engine-compile``: whether a backend that can (``graph``) ``torch.compile``s its decode step
COMPILE_CHOICES = ("auto", "on", "off")
COMPILING_BACKENDS = ("graph",)


@dataclass(frozen=True)
class SamplingSettings:
    """How to generate: greedy unless ``do_sample`` (then ``temperature`` / ``top_p``, no top-k cut).

    ``seed``: with ``do_sample``, the torch seed set right before generating (one seed per request makes a resumed
    run draw the same tokens as an uninterrupted one); None leaves the generator as it is.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if self.do_sample and (not (math.isfinite(self.temperature) and self.temperature > 0) or not 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class GenerationRequest:
    """One batch to generate.

    ``prompts``: the prompt token ids of each sequence, unpadded (the backend pads as it needs). ``groups``: the
    counting group of each sequence in ``[-1, num_groups)`` (-1: routed but not counted), or None for no routing
    record at all. ``record_token_experts``: also keep each counted token's chosen experts (needs ``groups``).
    ``sequence_seeds``: with ``do_sample``, one int64 sampling seed per sequence, for backends that draw each
    sequence's tokens from its own seed (``graph``), so that a sequence samples the same tokens whatever else the
    request holds (packed requests); backends drawing from one generator (``hf``) use ``sampling.seed``.
    """

    prompts: Sequence[Sequence[int]]
    sampling: SamplingSettings
    groups: Sequence[int] | None = None
    num_groups: int = 2
    record_token_experts: bool = False
    sequence_seeds: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not len(self.prompts):
            raise ValueError("a generation request needs at least one prompt")
        for i, prompt in enumerate(self.prompts):
            if not len(prompt):
                raise ValueError(f"prompt {i} of the request is empty")
        if self.groups is not None:
            if len(self.groups) != len(self.prompts):
                raise ValueError(f"groups has {len(self.groups)} entries for {len(self.prompts)} prompts")
            bad = [g for g in self.groups if not -1 <= int(g) < self.num_groups]
            if bad:
                raise ValueError(f"groups must lie in [-1, {self.num_groups}), got {bad[:5]}")
        elif self.record_token_experts:
            raise ValueError("record_token_experts needs groups (per-token experts are kept only while recording)")
        if self.sequence_seeds is not None and len(self.sequence_seeds) != len(self.prompts):
            raise ValueError(f"sequence_seeds has {len(self.sequence_seeds)} entries for {len(self.prompts)} prompts")


@dataclass
class GenerationOutput:
    """What a backend gives back for one :class:`GenerationRequest`, on the host, in request order.

    ``tokens``: each sequence's generated token ids up to its first EOS, the EOS **not** kept (so ``len`` is the
    number of generated tokens before the EOS). ``texts``: each sequence's generated tokens decoded with special
    tokens skipped. ``num_prompt_tokens``: each prompt's length.

    With ``groups`` in the request: ``prefill_counts`` / ``decode_counts`` int64 ``[layers, groups, experts]`` —
    routing of the prompt tokens / of the generated tokens fed back to the model, padding and tokens after a
    sequence's EOS never counted, group -1 never counted — and ``prefill_tokens`` / ``decode_tokens`` int64
    ``[groups]``. With ``record_token_experts``: ``token_experts`` maps ``"prefill"`` / ``"decode"`` to uint8
    ``[B, T, layers, top_k]`` expert ids and ``"prefill_counted"`` / ``"decode_counted"`` to bool ``[B, T]`` (which
    of those positions were counted); T is the number of positions of that phase (0 when none ran).
    """

    tokens: list[list[int]]
    texts: list[str]
    num_prompt_tokens: list[int]
    prefill_counts: np.ndarray | None = None
    decode_counts: np.ndarray | None = None
    prefill_tokens: np.ndarray | None = None
    decode_tokens: np.ndarray | None = None
    token_experts: dict[str, np.ndarray] | None = None

    @property
    def num_generated_tokens(self) -> list[int]:
        """How many tokens each prompt generated before its first EOS (the length of its ``tokens``)."""
        return [len(row) for row in self.tokens]


@runtime_checkable
class GenerationBackend(Protocol):
    """Generates batches of prompts and reports the routing of each phase.

    ``name``: the registry name. ``generate(request)``: one :class:`GenerationRequest` in, one
    :class:`GenerationOutput` out; the backend decides which forwards are prefill and which are decode.
    ``set_expert_mask(keep)``: restrict routing for the following requests (bool ``[layers, groups, experts]``, as
    :func:`moe_fastmask.set_expert_mask`; one group applies to every token), None lifts it. ``close()``: undo
    ``set_expert_mask`` and release what the backend holds; the model stays usable.
    """

    name: str

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate the request's prompts; the routing counts of each phase when it has groups."""
        ...

    def set_expert_mask(self, keep: Any) -> None:
        """Restrict routing for the following requests to ``keep`` (bool ``[layers, groups, experts]``); None lifts
        it."""
        ...

    def close(self) -> None:
        """Undo :meth:`set_expert_mask` and release what the backend holds; the model stays usable."""
        ...


def backend_names() -> tuple[str, ...]:
    """The registered backend names (the ``--engine`` choices)."""
    return tuple(BACKENDS)


def backend_class(name: str) -> type:
    """The class registered as backend ``name`` (its module is imported now, not its engine's dependencies)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown generation engine {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, attribute = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def get_backend(name: str, model, tokenizer, **options) -> GenerationBackend:
    """Create backend ``name`` over ``model`` / ``tokenizer``; ``options`` go to its constructor."""
    return backend_class(name)(model, tokenizer, **options)


def check_engine_compile(engine: str, engine_compile: str) -> None:
    """Raise ``ValueError`` for an ``--engine-compile`` value that is not a choice, or ``on`` for an engine that does
    not compile."""
    if engine_compile not in COMPILE_CHOICES:
        raise ValueError(f"engine_compile must be one of {', '.join(COMPILE_CHOICES)}, got {engine_compile!r}")
    if engine_compile == "on" and engine not in COMPILING_BACKENDS:
        raise ValueError(f"--engine-compile on needs an engine that compiles its decode step "
                         f"({', '.join(COMPILING_BACKENDS)}), not --engine {engine}")


def engine_options(engine: str, engine_compile: str = "auto", **options) -> dict:
    """Constructor options of backend ``engine``: ``options`` plus, for a backend that compiles, ``compile``
    (``"auto"``, True or False from ``engine_compile``)."""
    check_engine_compile(engine, engine_compile)
    if engine in COMPILING_BACKENDS:
        options["compile"] = {"auto": "auto", "on": True, "off": False}[engine_compile]
    return options


def load_model(name: str, model_name_or_path: str, device: str, dtype: str):
    """``(model, tokenizer)`` for backend ``name``: what its class's ``load_model`` returns when it has one (vLLM: its
    engine, never a second copy of the weights), else the transformers model
    (:func:`moe_fastmask.pipeline.common.load_model_and_tokenizer`)."""
    loader = getattr(backend_class(name), "load_model", None)
    if loader is None:
        from moe_fastmask.pipeline.common import load_model_and_tokenizer

        loader = load_model_and_tokenizer
    return loader(model_name_or_path, device, dtype)


def resolve_eos_ids(
    eos_token_id: int | Sequence[int] | None = None,
    *,
    generation_config: Any = None,
    model_config: Any = None,
    tokenizer: Any = None,
) -> list[int]:
    """The ids that end a sequence, by the one rule every backend follows: ``eos_token_id`` when given, else the
    generation config's, else the model config's, else the tokenizer's EOS; ``[]`` when none has one.

    So the same model and tokenizer stop at the same tokens (and count the same routing) whichever engine runs.
    """
    configured = (getattr(source, "eos_token_id", None) for source in (generation_config, model_config, tokenizer))
    for eos in (eos_token_id, *configured):
        if eos is None:
            continue
        values = [eos] if isinstance(eos, (int, np.integer)) else list(eos)
        if not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in values):
            raise ValueError(f"eos_token_id must be an int or a sequence of ints, got {eos!r:.80}")
        if values:
            return [int(e) for e in values]
    return []


__all__ = [
    "BACKENDS",
    "COMPILE_CHOICES",
    "DEFAULT_BACKEND",
    "GenerationBackend",
    "GenerationOutput",
    "GenerationRequest",
    "SamplingSettings",
    "backend_class",
    "backend_names",
    "check_engine_compile",
    "engine_options",
    "get_backend",
    "load_model",
    "resolve_eos_ids",
]
