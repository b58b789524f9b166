"""The ``hf`` generation backend: ``transformers``' ``model.generate`` on left-padded batches.

Routing is recorded by a :class:`moe_fastmask.RoutingRecorder` on the patched model (the patch is applied on the
first request with groups, and stays: it is idempotent and routes like the stock model when no mask is set). Which
forwards are prefill and which are decode is the recorder's own rule for ``generate``: the first forward of a
``record`` block is the prefill, every forward that continues its cache is a decode step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_fastmask.pipeline.generation.base import (
    GenerationOutput,
    GenerationRequest,
    SamplingSettings,
    resolve_eos_ids,
)


def generation_kwargs(sampling: SamplingSettings, pad_token_id: int | None) -> dict:
    """The ``generate`` keyword arguments of ``sampling`` (no top-k cut when sampling; only top-p)."""
    kwargs = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample, "pad_token_id": pad_token_id}
    if sampling.min_new_tokens:
        kwargs["min_new_tokens"] = sampling.min_new_tokens
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    return kwargs


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a sequence (:func:`~moe_fastmask.pipeline.generation.base.resolve_eos_ids`): the model's
    generation config, else its config, else the tokenizer's EOS."""
    return resolve_eos_ids(generation_config=getattr(model, "generation_config", None),
                           model_config=getattr(model, "config", None), tokenizer=tokenizer)


def generated_lengths(tokens: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """Generated tokens of each row of ``tokens [B, T]`` before its first EOS."""
    if not len(eos_ids):
        return np.full(tokens.shape[0], tokens.shape[1], dtype=np.int64)
    is_eos = np.isin(tokens, np.asarray(eos_ids))
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), tokens.shape[1]).astype(np.int64)


def _host(tensor) -> np.ndarray:
    # a real copy: on the CPU ``.cpu()`` would alias the recorder's live buffers, which the next request zeroes
    return tensor.detach().to("cpu", copy=True).numpy()


class HFGenerateBackend:
    """:class:`~moe_fastmask.pipeline.generation.base.GenerationBackend` over ``model.generate``.

    ``op_backend``: the router op backend of the routing patch (``auto``, ``triton``, ``cpp``, ``torch``).
    ``recorder``: a :class:`moe_fastmask.RoutingRecorder` of ``model`` to use for recording (default: one made on
    the first request with groups, and again when a request asks for other groups or per-token experts).
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, op_backend: str = "auto", recorder=None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. the EOS token) before generating")
        self.model = model
        self.tokenizer = tokenizer
        self.op_backend = op_backend
        self.recorder = recorder
        self._patched_for_mask = False
        self._mask_set = False
        self._eos_ids = eos_token_ids(model, tokenizer)

    # -- routing patch, mask and recorder ---------------------------------------------------------------------------

    def _patch(self) -> bool:
        """Patch the model's routers (idempotent); True when this call added the patch."""
        import moe_fastmask as mf

        added = not mf.is_patched(self.model)
        mf.apply(self.model, backend=self.op_backend)
        return added

    def _recorder_for(self, request: GenerationRequest):
        recorder = self.recorder
        if (
            recorder is None
            or recorder.num_groups != request.num_groups
            or (request.record_token_experts and not recorder.record_token_experts)
        ):
            import moe_fastmask as mf

            self._patch()
            recorder = self.recorder = mf.RoutingRecorder(
                self.model, num_groups=request.num_groups, record_token_experts=request.record_token_experts
            )
        return recorder

    def set_expert_mask(self, keep) -> None:
        """Restrict routing to ``keep`` (bool ``[layers, groups, experts]``) from the next request on; None lifts it."""
        import moe_fastmask as mf

        if keep is None:
            if self._mask_set and mf.is_patched(self.model):
                mf.set_expert_mask(self.model, None)
            self._mask_set = False
            return
        self._patched_for_mask = self._patch() or self._patched_for_mask
        mf.set_expert_mask(self.model, keep)
        self._mask_set = True

    def close(self) -> None:
        """Lift a mask this backend set and remove the routing patch if it was added for that mask (a patch used
        only for recording stays: it is idempotent, and routes like the stock model without a mask). The recorder
        is dropped, and so are the model and tokenizer: a closed backend keeps nothing alive."""
        import moe_fastmask as mf

        if self.model is None:  # closed already
            return
        self.set_expert_mask(None)
        if self._patched_for_mask and mf.is_patched(self.model):
            mf.remove(self.model)
        self._patched_for_mask = False
        self.recorder = None
        self.model = self.tokenizer = None

    # -- generation -------------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Run ``model.generate`` on the request's prompts as one left-padded batch, recording the routing of the
        prompt and generated tokens per group when the request has groups."""
        import contextlib

        import torch

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # batched generation continues every row from its last position
        device = next(self.model.parameters()).device
        padded = tokenizer.pad({"input_ids": [list(p) for p in request.prompts]}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(device)
        attention_mask = padded["attention_mask"].to(device)

        recorder = None
        if request.groups is not None:
            recorder = self._recorder_for(request)
            recorder.reset()
        sampling = request.sampling
        if sampling.do_sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # the EOS ids are passed explicitly: ``generate`` alone reads only the generation config, and would run past
        # a tokenizer-only EOS (texts and counts after the answer's end)
        eos = {"eos_token_id": list(self._eos_ids)} if self._eos_ids else {}
        recording = (
            recorder.record(list(request.groups), eos_token_id=self._eos_ids or None)
            if recorder is not None else contextlib.nullcontext()
        )
        with torch.no_grad(), recording:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **generation_kwargs(sampling, tokenizer.pad_token_id),
                **eos,
            )
        rows = output[:, input_ids.shape[1] :].cpu().numpy()
        lengths = generated_lengths(rows, self._eos_ids)
        tokens = [row[:n].tolist() for row, n in zip(rows, lengths)]
        # the text runs to the EOS, included (a special EOS is skipped), as the graph and vLLM engines decode it
        with_eos = [row[: n + 1].tolist() for row, n in zip(rows, lengths)]
        result = GenerationOutput(
            tokens=tokens,
            texts=tokenizer.batch_decode(with_eos, skip_special_tokens=True),
            num_prompt_tokens=[len(p) for p in request.prompts],
        )
        if recorder is not None:
            result.prefill_counts = _host(recorder.prefill_counts)
            result.decode_counts = _host(recorder.decode_counts)
            result.prefill_tokens = _host(recorder.prefill_tokens)
            result.decode_tokens = _host(recorder.decode_tokens)
            if request.record_token_experts:
                experts = {key: value.numpy() for key, value in recorder.token_experts().items()}
                for key, value in experts.items():  # a phase with no forward (one new token: no decode step)
                    if value.shape[0] == 0:
                        experts[key] = np.zeros((len(request.prompts), 0, *value.shape[2:]), dtype=value.dtype)
                result.token_experts = experts
        return result


__all__ = ["HFGenerateBackend", "eos_token_ids", "generated_lengths", "generation_kwargs"]
