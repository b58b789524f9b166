"""Constants and small helpers shared by the pipeline steps (analyze, train, evaluate, selection, batching).

* The two prompt kinds and their recorder / mask groups: ``SAFE`` = group 0, ``UNSAFE`` = group 1.
* :func:`split_counts`: how a batch of ``batch_size`` divides between the kinds at ``safe_ratio``.
* :data:`DTYPES` and :func:`resolve_dtype` / :func:`torch_dtype`: the ``--dtype`` choices and what ``auto`` means.
* The file names that one step writes and another reads (selection, training config, final model, checkpoints).
* :func:`prepare_tokenizer` / :func:`load_model_and_tokenizer`: the tokenizer setup of batched generation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

SAFE, UNSAFE = "safe", "unsafe"
SAFE_GROUP, UNSAFE_GROUP = 0, 1
GROUP_OF_KIND = {SAFE: SAFE_GROUP, UNSAFE: UNSAFE_GROUP}
NUM_GROUPS = len(GROUP_OF_KIND)

DTYPES = ("auto", "float32", "bfloat16", "float16")

SELECTION_FILE = "expert_selection.json"
TRAINING_CONFIG_FILE = "training_config.json"
FINAL_MODEL_DIR = "final_model"
CHECKPOINT_DIR = "checkpoints"


def split_counts(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """``(n_safe, n_unsafe)`` of a batch: ``n_safe = round(batch_size * safe_ratio)`` (half up), the rest unsafe.

    No validation (a ratio of 0 or 1 gives an empty kind); :func:`moe_fastmask.pipeline.batching.group_sizes` is the
    checked form the analysis uses.
    """
    n_safe = math.floor(batch_size * safe_ratio + 0.5)
    return n_safe, batch_size - n_safe


def resolve_device(device: str | None) -> str:
    """``device``, or ``cuda`` when available, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name ``dtype`` stands for on ``device``: ``auto`` is bfloat16 on cuda, float32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def torch_dtype(dtype: str, device: str):
    """:func:`resolve_dtype` as a ``torch.dtype``."""
    import torch

    return getattr(torch, resolve_dtype(dtype, device))


def prepare_tokenizer(tokenizer, padding_side: str | None = "left"):
    """A pad token (the EOS token when the tokenizer has none) and, unless ``padding_side`` is None, that padding
    side (left for batched generation). Returns the tokenizer."""
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_name_or_path: str, device: str, dtype: str):
    """``from_pretrained`` on the path or hub id, in eval mode on ``device``; tokenizer set to left padding with a
    pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_fastmask.pipeline.preflight import UsageError, one_line

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=getattr(torch, dtype))
    except OSError as error:  # not found locally or on the hub, no access, no network: one line, no traceback
        raise UsageError(f"cannot load model {str(model_name_or_path)!r}: {one_line(error)}") from error
    model.to(device).eval()
    return model, prepare_tokenizer(tokenizer)


def plural(count: int, noun: str) -> str:
    """``"1 batch"``, ``"2 batches"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith(('s', 'ch')) else 's'}"


@contextlib.contextmanager
def library_progress_bars(show: bool) -> Iterator[None]:
    """Inside the block, hide the progress bars of transformers and huggingface_hub (loading weights, writing shards,
    downloads) unless ``show`` and this is the main process (``RANK`` 0 or unset); the previous setting comes back
    after the block. ``show=True`` never turns on bars a user turned off."""
    from transformers.utils import logging as hf_logging

    from moe_fastmask.pipeline.distributed import launched_rank

    if (show and launched_rank() == 0) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


__all__ = [
    "CHECKPOINT_DIR",
    "DTYPES",
    "FINAL_MODEL_DIR",
    "GROUP_OF_KIND",
    "NUM_GROUPS",
    "SAFE",
    "SAFE_GROUP",
    "SELECTION_FILE",
    "TRAINING_CONFIG_FILE",
    "UNSAFE",
    "UNSAFE_GROUP",
    "library_progress_bars",
    "load_model_and_tokenizer",
    "plural",
    "prepare_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "split_counts",
    "torch_dtype",
]
