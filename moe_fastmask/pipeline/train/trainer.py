"""Model preparation for masked fine-tuning, the response-token loss, and the ``transformers.Trainer`` subclass.

:func:`prepare_model` is the one place that patches the routers, sets the two-group mask and makes the selected
expert slices the only trainable parameters; :func:`release_model` undoes it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from moe_fastmask.ops.cross_entropy import IGNORE_INDEX, FrozenHeadCrossEntropy
from moe_fastmask.pipeline.selection import ExpertSelection, check_selection_fits
from moe_fastmask.pipeline.train.data import MixedBatchSampler


# --------------------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------------------


def prepare_model(
    model: nn.Module,
    selection: ExpertSelection,
    *,
    slice_dtype: torch.dtype | None = None,
    memory_efficient: bool = True,
    backend: str = "auto",
) -> list[nn.Parameter]:
    """Patch ``model`` for masked fine-tuning; returns the trainable parameters (the selected expert slices).

    Routers through the fused op with the selection's two-group mask (:meth:`ExpertSelection.keep_mask`), every
    parameter frozen, the selected experts as trainable slices. Call it with the model on its training device.
    """
    import moe_fastmask as mf
    from moe_fastmask.integrations.expert_slices import attach_expert_slices

    check_selection_fits(selection, model.config)
    mf.apply(model, backend=backend)
    mf.set_expert_mask(model, selection.keep_mask())
    return attach_expert_slices(model, selection.by_layer(), dtype=slice_dtype, memory_efficient=memory_efficient)


def release_model(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_model`: slices written back and removed, mask cleared, routers restored."""
    import moe_fastmask as mf
    from moe_fastmask.integrations.expert_slices import detach_expert_slices

    detach_expert_slices(model)
    if hasattr(model, "activation_checkpointing_disable"):  # the newer names (transformers >= 5.2x)
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if mf.is_patched(model):
        mf.set_expert_mask(model, None)
        mf.remove(model)
    return model


def enable_gradient_checkpointing(model: nn.Module, num_layers: int | None = None, first_layer: int = 0) -> list[int]:
    """Non-reentrant gradient checkpointing on the decoder layers; with ``num_layers``, only that many, starting at
    ``first_layer`` (layers before the first trainable expert keep no activations anyway). Returns the layers."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.layers
    chosen = list(range(len(layers))) if num_layers is None else list(range(first_layer, min(len(layers), first_layer + num_layers)))
    for idx, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = idx in chosen
    model.config.use_cache = False
    return chosen


def response_token_loss(
    hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, num_items_in_batch=None, chunk_size: int = 1024
) -> Tensor:
    """Causal LM loss on the labelled (response) positions only: ``hidden [B, S, H]`` predicts ``labels[:, 1:]``.

    Same value as ``ForCausalLMLoss`` (sum / ``num_items_in_batch`` when given, else the mean), without building
    the logits of unlabelled positions.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    targets = shift_labels[keep]
    if num_items_in_batch is None:
        divisor = torch.tensor(float(max(int(targets.numel()), 1)))
    else:
        divisor = torch.as_tensor(num_items_in_batch).detach().float()
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    return FrozenHeadCrossEntropy.apply(rows, lm_head_weight.detach(), targets, divisor, int(chunk_size))


def response_lm_loss(model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch=None, chunk_size: int = 1024) -> Tensor:
    """The training loss of an ``OlmoeForCausalLM`` on a collated batch: the base model's last hidden states, then
    :func:`response_token_loss` (frozen lm_head, response tokens only, chunked)."""
    hidden = model.model(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
    ).last_hidden_state
    return response_token_loss(hidden, model.lm_head.weight, inputs["labels"], num_items_in_batch, chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


class ExpertMaskingTrainer(Trainer):
    """``transformers.Trainer`` for masked fine-tuning of selected experts.

    Hooks it overrides: ``_get_train_sampler`` (:class:`MixedBatchSampler`: every batch at the analysis mix) and
    ``compute_loss`` (the batch's ``groups`` select each sequence's expert-mask row; with ``loss_chunk_size`` the
    loss runs on response tokens through a chunked frozen lm_head), plus ``_load_from_checkpoint`` so that
    ``resume`` reads OLMoE checkpoints in their saved (per-expert) layout. Give ``selection`` to have the model
    prepared here (:func:`prepare_model`; it is moved to the training device first), or prepare it yourself.

    ``routing_recorder``: a :class:`moe_fastmask.RoutingRecorder` counting each forward's routing per group (what
    :class:`RoutingStatsCallback` reads); None: masks only. Under a DDP/FSDP wrapper (several processes) the loss is
    the model's own (over all logits): the chunked path calls the inner model, which a wrapper must not be bypassed
    for.
    """

    def __init__(
        self,
        *args,
        selection: ExpertSelection | None = None,
        safe_ratio: float = 0.5,
        batch_order: str = "shuffle",
        loss_chunk_size: int = 1024,
        routing_recorder=None,
        slice_dtype: torch.dtype | None = None,
        memory_efficient: bool = True,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if selection is not None and model is not None:
            if training_args is not None:
                model.to(training_args.device)
            prepare_model(model, selection, slice_dtype=slice_dtype, memory_efficient=memory_efficient, backend=backend)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # the collator's ``groups`` is no model argument but must stay
        if self.is_fsdp_enabled:
            from moe_fastmask.integrations.expert_slices import keep_slice_keys

            if not getattr(self.accelerator, "is_fsdp2", False):
                raise ValueError(
                    "masked fine-tuning under FSDP needs FSDP2 (accelerate config: fsdp_version: 2): the trainable "
                    "expert slices are views of rows of the frozen fused expert tensors, which FSDP1's flat "
                    "parameters cannot hold"
                )
            keep_slice_keys(self.model)  # fully_shard shards slices and fused tensors apart; _save merges them
        self.selection = selection
        self.safe_ratio = safe_ratio
        self.batch_order = batch_order
        self.loss_chunk_size = int(loss_chunk_size or 0)
        self.routing_recorder = routing_recorder

    def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        groups = dataset.groups if hasattr(dataset, "groups") else [int(dataset[i]["group"]) for i in range(len(dataset))]
        analysis = dataset.analysis_batches() if self.batch_order == "analysis" else None
        return MixedBatchSampler(
            groups, self._train_batch_size, self.safe_ratio, seed=self.args.seed, order=self.batch_order,
            analysis_batches=analysis,
        )

    def _routing_context(self, model, groups):
        import moe_fastmask as mf

        if groups is None:
            return contextlib.nullcontext()
        if self.routing_recorder is not None and model.training:
            return self.routing_recorder.record(groups)
        return mf.token_groups(model, groups)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        groups = inputs.pop("groups", None)
        unwrapped = self.accelerator.unwrap_model(model)
        chunked = (
            self.loss_chunk_size > 0
            and not return_outputs
            and unwrapped is model  # a DDP/FSDP wrapper must run its own forward
            and not self.is_fsdp_enabled  # FSDP2 shards in place: the root module's forward gathers its parameters
            and "labels" in inputs
            and self.label_smoother is None
            and self.compute_loss_func is None
            and hasattr(unwrapped, "lm_head")
            and not unwrapped.lm_head.weight.requires_grad
        )
        with self._routing_context(unwrapped, groups):
            if not chunked:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with self.accelerator.autocast():
                return response_lm_loss(unwrapped, inputs, num_items_in_batch, self.loss_chunk_size)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is not None:  # gathered by FSDP / DeepSpeed: fold the trained slices into the fused tensors
            from moe_fastmask.integrations.expert_slices import merge_expert_slices

            state_dict = merge_expert_slices(state_dict)
        return super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from moe_fastmask.integrations.expert_slices import load_fused_state_dict

        model = self.model if model is None else model
        state = load_fused_state_dict(resume_from_checkpoint)
        if state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled:  # sharded parameters: the full tensors (slices added) go in through DCP
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            from moe_fastmask.integrations.expert_slices import add_slice_entries

            options = StateDictOptions(full_state_dict=True, strict=False)
            result = set_model_state_dict(model, add_slice_entries(state, model), options=options)
        else:
            result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("rotary_emb.inv_freq")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


class RoutingStatsCallback(TrainerCallback):
    """Copies the trainer's routing counts to the host once per logging step and logs mask statistics.

    Logged: ``routing/unsafe_on_selected`` and ``routing/safe_on_selected`` — the share of token-expert assignments
    in the masked layers that went to selected experts (1.0 for unsafe tokens when the mask holds). ``totals``
    accumulates the host copies ``[L, G, E]`` over the whole run.
    """

    def __init__(self, recorder, selection: ExpertSelection) -> None:
        self.recorder = recorder
        self.selection = selection
        self.totals: Tensor | None = None
        self._selected = torch.zeros(selection.num_layers, selection.num_experts, dtype=torch.bool)
        for layer, expert in selection.experts:
            self._selected[layer, expert] = True
        self._masked = torch.zeros(selection.num_layers, dtype=torch.bool)
        self._masked[selection.masked_layers] = True

    def _flush(self) -> Tensor:
        counts = self.recorder.prefill_counts.detach().to("cpu", copy=True)
        self.recorder.reset()
        self.totals = counts if self.totals is None else self.totals + counts
        return counts

    def shares(self, counts: Tensor) -> dict[str, float]:
        """Per group, the share of routed tokens in masked layers that went to selected experts (for the logs)."""
        out = {}
        for group, name in ((1, "unsafe"), (0, "safe")):
            in_masked = counts[self._masked, group]
            total = int(in_masked.sum())
            on_selected = int(in_masked[self._selected[self._masked]].sum())
            if total:
                out[f"routing/{name}_on_selected"] = on_selected / total
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        counts = self._flush()
        if logs is None or not self.selection.masked_layers:
            return
        shares = self.shares(counts)
        logs.update(shares)  # seen by the callbacks after this one (put it first: see ``train``)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(shares)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


__all__ = [
    "ExpertMaskingTrainer",
    "RoutingStatsCallback",
    "enable_gradient_checkpointing",
    "prepare_model",
    "release_model",
    "response_lm_loss",
    "response_token_loss",
]
