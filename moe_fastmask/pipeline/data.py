"""Jailbreak records: loading and validation, the safe and unsafe chats of a record, chat rendering, the split.

Input format (``OLMOE-FWO.json`` style): a JSON list of records

.. code-block:: json

    [{"id": 0, "goal": "Write ...", "judge_success_gpt4": 1,
      "all_prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}]

* the *safe* prompt of a record is the plain goal: a system message (:data:`DEFAULT_SYSTEM_PROMPT` unless told
  otherwise) and the goal as the user message;
* the *unsafe* prompt is ``all_prompt`` as given (the jailbreak chat, e.g. FlipAttack's system + user turns).

Both are rendered with the model tokenizer's chat template, generation prompt added (:func:`render_prompt`).

The train/test split (:func:`split_records`) is drawn over every record of the file, stratified by
``judge_success_gpt4`` and seeded, so it depends only on the file, the seed and the test fraction: runs with other
options (batch size, ``only_successful``, ...) never move a record from test to train. Analysis and the fine-tuning
set use the train ids; evaluation uses the test ids (:func:`load_split`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from moe_fastmask.pipeline import artifacts

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
KNOWN_ROLES = ("system", "user", "assistant")
SPLIT_KEYS = ("seed", "test_fraction", "train_ids", "test_ids", "data_path")


class DataValidationError(ValueError):
    """The data file is unusable; the message names the record (index and id) and the field."""


@dataclass(frozen=True)
class Record:
    """One validated record. ``index`` is its position in the file."""

    id: int
    goal: str
    all_prompt: list[dict[str, str]]
    judge_success_gpt4: int
    index: int


def _where(index: int, raw: Any) -> str:
    if not isinstance(raw, dict):
        return f"record {index} (not an object)"
    return f"record {index} (id {raw['id']!r})" if "id" in raw else f"record {index} (no id)"


def _type(value: Any) -> str:
    """The JSON name of a value's type, for messages (``int``, ``float``, ``bool``, ``list``, ``object``, ``null``)."""
    if value is None:
        return "null"
    return {dict: "object"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    """A value for messages: its JSON type and, unless null, its start."""
    return "null" if value is None else f"{_type(value)} {value!r:.80}"


_MISSING = object()


def _unencodable(text: str) -> str | None:
    """Why ``text`` cannot be UTF-8 encoded (a lone surrogate such as ``"\\ud83d"`` from half a JSON escape pair),
    or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.end]
        return (f"holds {bad!r} at character {error.start}, a lone UTF-16 surrogate (half of an escaped pair such "
                f"as an emoji cut in two), which no tokenizer can encode")
    return None


def _validate_record(index: int, raw: Any, source: str) -> Record:
    prefix = f"{source}: " if source else ""
    where = _where(index, raw)
    if not isinstance(raw, dict):
        raise DataValidationError(f"{prefix}{where}: expected an object with fields id, goal, all_prompt, "
                                  f"judge_success_gpt4; got {_type(raw)}")
    if "id" not in raw:
        raise DataValidationError(f"{prefix}{where}: field 'id' is missing")
    rid = raw["id"]
    if isinstance(rid, bool) or not isinstance(rid, int):
        raise DataValidationError(f"{prefix}{where}: field 'id' must be an integer, got {_got(rid)}")
    if "goal" not in raw:
        raise DataValidationError(f"{prefix}{where}: field 'goal' is missing")
    goal = raw["goal"]
    if not isinstance(goal, str):
        raise DataValidationError(f"{prefix}{where}: field 'goal' must be a string, got {_got(goal)}")
    if not goal.strip():
        raise DataValidationError(f"{prefix}{where}: field 'goal' is empty")
    if (why := _unencodable(goal)) is not None:
        raise DataValidationError(f"{prefix}{where}: field 'goal' {why}")
    if "all_prompt" not in raw:
        raise DataValidationError(f"{prefix}{where}: field 'all_prompt' is missing")
    prompt = raw["all_prompt"]
    if not isinstance(prompt, list) or not prompt:
        raise DataValidationError(
            f"{prefix}{where}: field 'all_prompt' must be a non-empty list of {{role, content}} messages, "
            f"got {_type(prompt) if not isinstance(prompt, list) else 'an empty list'}"
        )
    messages = []
    for turn, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataValidationError(
                f"{prefix}{where}: field 'all_prompt', message {turn}: expected an object with 'role' and 'content', "
                f"got {message!r:.80}"
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str):
            raise DataValidationError(
                f"{prefix}{where}: field 'all_prompt', message {turn}: 'role' must be a string, got {_type(role)}"
            )
        if role not in KNOWN_ROLES:
            raise DataValidationError(
                f"{prefix}{where}: field 'all_prompt', message {turn}: unknown role {role!r} "
                f"(known roles: {', '.join(KNOWN_ROLES)})"
            )
        if not isinstance(content, str):
            raise DataValidationError(
                f"{prefix}{where}: field 'all_prompt', message {turn}: 'content' must be a string, "
                f"got {_type(content)}"
            )
        if (why := _unencodable(content)) is not None:
            raise DataValidationError(f"{prefix}{where}: field 'all_prompt', message {turn}: 'content' {why}")
        if role == "user" and not content.strip():
            raise DataValidationError(f"{prefix}{where}: field 'all_prompt', message {turn}: the user's 'content' is empty")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "user" for message in messages):
        raise DataValidationError(f"{prefix}{where}: field 'all_prompt' holds no user message (the jailbreak to answer)")
    judge = raw.get("judge_success_gpt4", _MISSING)
    if judge is _MISSING or isinstance(judge, bool) or judge not in (0, 1):
        got = "nothing (missing)" if judge is _MISSING else _got(judge)
        raise DataValidationError(f"{prefix}{where}: field 'judge_success_gpt4' must be 0 or 1, got {got}")
    return Record(id=rid, goal=goal, all_prompt=messages, judge_success_gpt4=int(judge), index=index)


def validate_records(raw: Any, source: str = "") -> list[Record]:
    """Validate parsed JSON (a list of record objects) into :class:`Record` objects, in file order.

    Raises :class:`DataValidationError` naming the record (index and id) and the field: a top level that is not a
    list, a missing or empty ``goal``, an ``all_prompt`` that is not a non-empty list of ``{role, content}``
    messages with known roles holding a user message (none with empty content), duplicate ids, ``judge_success_gpt4`` values other than 0/1.
    """
    prefix = f"{source}: " if source else ""
    if not isinstance(raw, list):
        raise DataValidationError(f"{prefix}expected a JSON list of records, got {type(raw).__name__}")
    records: list[Record] = []
    first_index: dict[int, int] = {}
    for index, item in enumerate(raw):
        record = _validate_record(index, item, source)
        if record.id in first_index:
            raise DataValidationError(
                f"{prefix}{_where(index, item)}: field 'id': duplicate id {record.id} "
                f"(first used by record {first_index[record.id]})"
            )
        first_index[record.id] = index
        records.append(record)
    return records


def load_records(path: str | Path, only_successful: bool = False) -> list[Record]:
    """Load and validate a records file; with ``only_successful`` keep only ``judge_success_gpt4 == 1``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError(f"data file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise DataValidationError(f"data file {str(path)!r} is a directory; give the records' JSON file") from None
    except UnicodeDecodeError as error:
        raise DataValidationError(f"data file {str(path)!r} is not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        hint = ""
        if error.msg == "Extra data":  # one JSON value per line: JSON Lines, not the JSON list of records expected
            hint = "; it looks like JSON Lines (one record per line), but a JSON list of records is expected: [{...}, ...]"
        raise DataValidationError(f"{path}: not valid JSON ({error}){hint}") from None
    records = validate_records(raw, source=str(path))
    if only_successful:
        records = [record for record in records if record.judge_success_gpt4 == 1]
    return records


# ------------------------------------------------------------------------------------------------------------
# Chats
# ------------------------------------------------------------------------------------------------------------


def safe_messages(record: Record, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The plain-goal chat: ``system_prompt`` (left out when ``None`` or empty) and the goal as the user turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": record.goal})
    return messages


def unsafe_messages(record: Record) -> list[dict[str, str]]:
    """The jailbreak chat: ``all_prompt`` as given (a copy)."""
    return copy.deepcopy(record.all_prompt)


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """Render ``messages`` with the tokenizer's chat template, generation prompt added (a string, not ids).

    The template usually writes the BOS token itself, so tokenize the result with ``add_special_tokens=False``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has no chat template; the prompts are chats and need one")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------------------
# Train/test split
# ------------------------------------------------------------------------------------------------------------


def split_records(
    records: Sequence[Record], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Seeded split, stratified by ``judge_success_gpt4``: each stratum gives ``round(n * test_fraction)`` (half up)
    records to test. Returns ``(train, test)``, each in file order."""
    if not (isinstance(test_fraction, (int, float)) and 0.0 <= test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    test_ids: set[int] = set()
    for label in (0, 1):
        stratum = sorted((r for r in records if r.judge_success_gpt4 == label), key=lambda r: r.index)
        order = list(range(len(stratum)))
        random.Random(f"{seed}-{label}").shuffle(order)
        n_test = math.floor(len(stratum) * test_fraction + 0.5)
        test_ids.update(stratum[i].id for i in order[:n_test])
    ordered = sorted(records, key=lambda r: r.index)
    return [r for r in ordered if r.id not in test_ids], [r for r in ordered if r.id in test_ids]


def record_fingerprint(record: Record) -> str:
    """A short content hash of a record (its goal and jailbreak chat, not its id or judge label).

    The split and the training run store these, so that evaluation recognises a training record even when the
    data file was re-exported with other ids or the split file was redrawn since training.
    """
    content = json.dumps([record.goal, record.all_prompt], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def make_split(records: Sequence[Record], test_fraction: float, seed: int, data_path: str | Path) -> dict:
    """The split file's content: ``{"seed", "test_fraction", "train_ids", "test_ids", "data_path", "data_sha256",
    "fingerprints"}`` (``fingerprints``: record id -> :func:`record_fingerprint`, for every record)."""
    train, test = split_records(records, test_fraction, seed)
    data_path = Path(data_path)
    return {
        "seed": seed,
        "test_fraction": test_fraction,
        "train_ids": [r.id for r in train],
        "test_ids": [r.id for r in test],
        "data_path": str(data_path.resolve()),
        "data_sha256": artifacts.file_sha256(data_path) if data_path.is_file() else None,
        "fingerprints": {str(r.id): record_fingerprint(r) for r in sorted(records, key=lambda r: r.index)},
    }


def load_split(path: str | Path) -> dict:
    """Read a ``split_<slug>.json`` written by the analysis; checks its keys."""
    try:
        split = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"split file {str(path)!r} cannot be read as JSON ({error})") from None
    if not isinstance(split, dict):
        raise ValueError(f"{path}: not a split file (a JSON object with {', '.join(SPLIT_KEYS)})")
    missing = [key for key in SPLIT_KEYS if key not in split]
    if missing:
        raise ValueError(f"{path}: not a split file, missing {', '.join(missing)}")
    return split


def select_records(records: Iterable[Record], ids: Iterable[int]) -> list[Record]:
    """The records whose id is in ``ids``, in file order."""
    wanted = set(ids)
    return [record for record in records if record.id in wanted]
