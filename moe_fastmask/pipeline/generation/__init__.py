"""Generation backends: "generate these prompts, in these groups, with these settings" behind one protocol.

``analyze`` and ``evaluate`` never call ``model.generate`` themselves; they build a
:class:`~moe_fastmask.pipeline.generation.base.GenerationRequest` and read a
:class:`~moe_fastmask.pipeline.generation.base.GenerationOutput` from the backend that ``--engine`` names.

The protocol (:mod:`moe_fastmask.pipeline.generation.base`):

* :class:`SamplingSettings` — ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_p``
  and the torch ``seed`` set right before a sampled request.
* :class:`GenerationRequest` — ``prompts`` (unpadded token ids per sequence), ``groups`` (the counting group of
  each sequence, -1 = routed but not counted, None = no routing record), ``num_groups``, ``sampling`` and
  ``record_token_experts``.
* :class:`GenerationOutput` — per sequence the generated ``tokens`` up to the first EOS (EOS not kept), the decoded
  ``texts`` and ``num_prompt_tokens``; with groups, the host arrays ``prefill_counts`` / ``decode_counts`` (int64
  ``[layers, groups, experts]``) and ``prefill_tokens`` / ``decode_tokens`` (int64 ``[groups]``); with
  ``record_token_experts``, ``token_experts`` (each counted position's expert ids, per phase).
* :class:`GenerationBackend` — ``name``, ``generate(request)``, ``set_expert_mask(keep)`` (steering: bool
  ``[layers, groups, experts]``, None lifts it) and ``close()``. Which forwards are prefill and which are decode is
  the backend's business; the counts it returns must follow the rules above (no padding, nothing after a
  sequence's EOS, group -1 never counted), so that every backend gives the analysis the same statistics.

Backends: ``hf`` (:mod:`moe_fastmask.pipeline.generation.hf`, ``transformers``' ``generate``, the reference),
``graph`` (:mod:`moe_fastmask.pipeline.generation.engine`: static KV cache, bucketed left-padded batches, chunked
prefill, the decode step replayed as a CUDA graph; the same tokens and counts as ``hf``, eagerly on CPU) and ``vllm``
(:mod:`moe_fastmask.pipeline.generation.vllm`, ``vllm.LLM``; optional, imported only when chosen).
:mod:`~moe_fastmask.pipeline.generation.packing` puts several method batches into one request and splits the output
back, each batch exactly as it would come alone. To add one, write
a module with a class taking ``(model, tokenizer, **options)`` that implements the protocol, and add its line to
:data:`BACKENDS` in :mod:`~moe_fastmask.pipeline.generation.base`; ``--engine`` offers it, and ``analyze`` /
``evaluate`` need no change. A backend that generates from something else than a transformers model gives its class
a ``load_model(model_name_or_path, device, dtype) -> (model, tokenizer)``, which :func:`load_model` calls instead.
"""

from moe_fastmask.pipeline.generation import base
from moe_fastmask.pipeline.generation.base import *  # noqa: F403 (the protocol, re-exported as base.__all__ names it)

__all__ = list(base.__all__)
