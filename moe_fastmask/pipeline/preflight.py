"""Checks of a run's paths before anything is written or loaded: the model source and the output directory.

A mistake found here raises :class:`UsageError`, a ``ValueError`` whose message is one line naming the flag and the
value; the ``moe-fastmask`` subcommands print it and exit with status 2, so a typo in ``--model`` or ``--out`` never
ends in a traceback or leaves partial files behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name on the Hugging Face hub: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


class UsageError(ValueError):
    """A user mistake (a path, a value, a combination of flags); the command line prints the one-line message and
    exits with status 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_hub_id(text: str) -> bool:
    """True for a syntactically valid hub repository id ``owner/name`` (nothing is looked up)."""
    return (
        bool(_HUB_ID.match(text))
        and "--" not in text
        and ".." not in text
        and len(text) <= 96
        and not text.startswith(("./", "../", "~"))
    )


def check_model_source(model: str | os.PathLike, flag: str = "--model") -> str:
    """``"local"`` for a model directory (a directory holding ``config.json``), ``"hub"`` for a syntactically valid
    hub id ``owner/name`` that is not a local path; anything else raises :class:`UsageError`."""
    text = os.fspath(model)
    if not text.strip():
        raise UsageError(f"{flag} is empty: give a model directory or a hub id (owner/name)")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {text!r} is a file; give a model directory (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {text!r}: the directory has no config.json, so it holds no model")
        return "local"
    if is_hub_id(text):
        return "hub"
    raise UsageError(f"{flag} {text!r}: no such local model directory, and not a hub id (owner/name)")


def check_output_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """The output directory as a path, if it is one or can be made one: an existing file there, or a file in place
    of one of its parent directories, or a parent that cannot be written to, raises :class:`UsageError`."""
    text = os.fspath(out)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {text!r} is an existing file; give a directory (new or existing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {text!r}: the directory is not writable")
        return path
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {text!r}: {parent} is a file, so the directory cannot be made")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {text!r}: cannot create it, {parent} is not writable")
            break
    return path


def check_paths(out: str | os.PathLike | None = None, **models: str | os.PathLike | None) -> None:
    """Check the output directory (when given) and each model source given by keyword (``base_model=...`` is
    reported as ``--base-model``; ``None`` values are skipped), before a run writes or loads anything."""
    if out is not None:
        check_output_dir(out)
    for name, model in models.items():
        if model is not None:
            check_model_source(model, _flag(name))


def resolve_hub_model(model: str | os.PathLike, flag: str = "--model") -> None:
    """For a hub id, fetch (or find in the cache) its ``config.json`` now, so that an id that does not exist, is
    private or cannot be reached fails with a one-line :class:`UsageError` before a run writes anything. A local
    directory is left alone (:func:`check_model_source` checked it)."""
    text = os.fspath(model)
    if check_model_source(text, flag) != "hub":
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as error:  # not on the hub, no access, no network, not a model repository
        raise UsageError(f"{flag} {text!r}: cannot load it from the hub: {one_line(error)}") from error


def check_device(device: str | None, flag: str = "--device") -> None:
    """A ``--device`` that torch understands and that exists here (``None``: the default, always fine)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {device!r}: no CUDA device is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"{flag} {device!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")


def one_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (hub and loading errors run over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


__all__ = [
    "UsageError",
    "check_device",
    "check_model_source",
    "check_output_dir",
    "check_paths",
    "is_hub_id",
    "one_line",
    "resolve_hub_model",
]
