"""Run artifacts: atomic writes, the model slug, the config fingerprint, per-batch persistence and resume.

Every file is written to a temporary file in the same directory and moved into place with ``os.replace``, so a
reader (or a crashed run) never sees a half-written file.

Layout of an analysis output directory ``OUT`` for model slug ``SLUG``::

    OUT/analysis_config_SLUG.json        run config + fingerprint (written first; guards resume)
    OUT/batches_SLUG/batch_00000.pkl     one file per finished batch (resume reads these; with several processes
                                         each writes and rereads its own share)
    OUT/split_SLUG.json                  train/test split
    OUT/batch_outputs_SLUG.pkl           all batches + config
    OUT/risk_diff_SLUG.pkl / .csv        aggregated table
    OUT/sft_dataset_SLUG.pkl             fine-tuning set
    OUT/risk_diff_heatmap_SLUG.png, OUT/top_experts_SLUG.png
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
import warnings
from typing import Any, Callable

FINGERPRINT_VERSION = 1


def _file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask): mkstemp's temporary files are owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it); returns the path."""
    return _atomic(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_pickle(path: str | Path, obj: Any) -> Path:
    """Pickle ``obj`` atomically (protocol 4: readable by ``pandas.read_pickle`` and plain ``pickle.load``)."""
    return _atomic(path, lambda handle: pickle.dump(obj, handle, protocol=4))


def read_pickled_frame(path: str | Path, what: str):
    """A pandas DataFrame pickled at ``path`` (``what`` names it in errors: a missing file, a directory, a file that
    is not a pickle or holds something else all raise ``ValueError`` naming the path)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give the .pkl file")
    try:
        frame = pd.read_pickle(path)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways (bad key, truncated, missing class)
        raise ValueError(f"{what} {str(path)!r} is not a pickled table ({type(error).__name__}: {error})") from None
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{what} {str(path)!r}: expected a pandas DataFrame, got {type(frame).__name__}")
    return frame


def atomic_write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame as CSV (no index) to ``path`` atomically; returns the path."""
    return atomic_write_text(path, frame.to_csv(index=False))


def atomic_savefig(path: str | Path, figure, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic(path, lambda handle: figure.savefig(handle, format=fmt, **kwargs))


# ------------------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------------------


def model_slug(model: str | os.PathLike) -> str:
    """A file-name-safe name for a model, used in every artifact name.

    * a hub repo id: ``"/"`` -> ``"--"`` (``allenai/OLMoE-1B-7B-0125-Instruct`` ->
      ``allenai--OLMoE-1B-7B-0125-Instruct``);
    * a local directory inside a hub cache (``.../models--org--name/snapshots/<hash>``): ``org--name``;
    * any other local path: its last two components joined with ``"--"`` (``/ckpt/run3/final`` -> ``run3--final``;
      ``DIR/demo/model`` -> ``demo--model``), or the last one alone if there is only one.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
    """
    text = os.fspath(model).strip()
    if not text:
        raise ValueError("empty model name")
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        parts = [p for p in path.resolve().parts if p not in ("/", "")]
        for part in reversed(parts):
            if part.startswith("models--"):
                slug = part[len("models--"):]
                break
        else:
            slug = "--".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else "model")
    else:
        slug = text.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]", "_", slug)


# ------------------------------------------------------------------------------------------------------------
# Fingerprint and resume
# ------------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (the result-affecting settings)."""
    blob = json.dumps({"version": FINGERPRINT_VERSION, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# files of a model directory that decide what it generates (weights, configs, tokenizer, chat template, remote code)
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_HASHED_MODEL_FILE_LIMIT = 64 << 20  # smaller files are identified by content, larger (weights) by size and time


def model_identity(model: str | os.PathLike) -> dict | None:
    """What identifies the model at ``model`` for a resumed run, or ``None`` where nothing does.

    A local directory: each file that decides generation (weights, configs, tokenizer, chat template), by name, the
    small ones with their content's sha256, the weight files with their size and modification time (saving another
    model into the directory changes them; hashing gigabytes on every start would not pay). A hub id: the revision
    of the snapshot that loads (the cached one when offline).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        files = {}
        for item in sorted(path.iterdir()):
            if item.name.startswith(".") or not item.is_file() or not item.name.endswith(_MODEL_FILE_SUFFIXES):
                continue
            stat = item.stat()
            files[item.name] = (file_sha256(item) if stat.st_size <= _HASHED_MODEL_FILE_LIMIT
                                else f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns")  # fmt: skip
        return {"files": files}
    try:
        from transformers import AutoConfig

        revision = getattr(AutoConfig.from_pretrained(os.fspath(model)), "_commit_hash", None)
    except Exception:  # noqa: BLE001 - not resolvable now: the run config's model name is all there is
        return None
    return {"revision": revision} if revision else None


def _identity_changes(old: dict, new: dict) -> list[str]:
    """What differs between two :func:`model_identity` results, in words."""
    if "files" in old and "files" in new:
        names = sorted(set(old["files"]) | set(new["files"]))
        return [f"{name} " + ("added" if name not in old["files"] else "removed" if name not in new["files"]
                              else "changed") for name in names if old["files"].get(name) != new["files"].get(name)]
    return [f"revision {old.get('revision')} -> {new.get('revision')}"] if old != new else []


class ConfigMismatchError(RuntimeError):
    """The output directory holds a run with another config; pass ``overwrite`` to replace it."""


class RunStore:
    """The files of one analysis run (one output directory, one model slug)."""

    def __init__(self, out_dir: str | Path, slug: str) -> None:
        self.out_dir = Path(out_dir)
        self.slug = slug

    # paths
    def path(self, stem: str, suffix: str) -> Path:
        """The run's file ``<stem>_<slug><suffix>`` in the output directory."""
        return self.out_dir / f"{stem}_{self.slug}{suffix}"

    @property
    def config_path(self) -> Path:
        """The run's ``analysis_config_<slug>.json``."""
        return self.path("analysis_config", ".json")

    @property
    def batch_dir(self) -> Path:
        """The folder of the run's per-batch files."""
        return self.out_dir / f"batches_{self.slug}"

    def batch_path(self, batch_idx: int) -> Path:
        """The file of batch ``batch_idx``."""
        return self.batch_dir / f"batch_{batch_idx:05d}.pkl"

    def final_paths(self) -> dict[str, Path]:
        """The run's final artifacts by name (split, batch outputs, risk tables, SFT dataset, plots, config)."""
        return {
            "split": self.path("split", ".json"),
            "batch_outputs": self.path("batch_outputs", ".pkl"),
            "risk_diff": self.path("risk_diff", ".pkl"),
            "risk_diff_csv": self.path("risk_diff", ".csv"),
            "sft_dataset": self.path("sft_dataset", ".pkl"),
            "heatmap": self.path("risk_diff_heatmap", ".png"),
            "top_experts": self.path("top_experts", ".png"),
            "config": self.config_path,
        }

    # resume
    def prepare(self, config: dict, overwrite: bool = False, model_files: dict | None = None) -> str:
        """Bind the directory to ``config``: write the config file, or check the one on disk.

        A different config on disk raises :class:`ConfigMismatchError` naming the differing settings, and so does a
        model whose files changed since the run started (``model_files``: :func:`model_identity` of the model now;
        the file keeps the one the run started with). ``overwrite`` deletes whatever run of this slug is there (same
        config or not) and starts over. Returns the fingerprint.
        """
        fingerprint = config_fingerprint(config)
        if overwrite:
            self.clear()
        elif self.config_path.exists():
            on_disk = json.loads(self.config_path.read_text(encoding="utf-8"))
            started_with = on_disk.get("model_files")
            if on_disk.get("fingerprint") == fingerprint and started_with and model_files:
                if changes := _identity_changes(started_with, model_files):
                    raise ConfigMismatchError(
                        f"{self.out_dir} holds an analysis of {self.slug} whose finished batches were generated by "
                        f"other model files than those at {config.get('model')} now ({'; '.join(changes)}); "
                        f"refusing to mix them. Use another --out, or --overwrite to delete that run"
                    )
            if on_disk.get("fingerprint") != fingerprint:
                old = on_disk.get("config", {})
                keys = sorted(set(old) | set(config))
                changed = [f"{k}: {old.get(k, '<unset>')!r} -> {config.get(k, '<unset>')!r}"
                           for k in keys if old.get(k) != config.get(k)]  # fmt: skip
                raise ConfigMismatchError(
                    f"{self.out_dir} holds an analysis of {self.slug} with another config "
                    f"({'; '.join(changed) or 'different fingerprint'}); refusing to mix them. Use another --out, "
                    f"or --overwrite to delete that run"
                )
        if not self.config_path.exists():
            record = {"fingerprint": fingerprint, "config": config}
            atomic_write_json(self.config_path, {**record, "model_files": model_files} if model_files else record)
        return fingerprint

    def clear(self) -> None:
        """Delete this run's files (batches, config, final artifacts)."""
        shutil.rmtree(self.batch_dir, ignore_errors=True)
        for path in self.final_paths().values():
            if path.exists():
                path.unlink()

    def save_batch(self, batch_data: dict) -> Path:
        """Write one batch's results atomically to its file (named by ``batch_data['batch_idx']``)."""
        return atomic_pickle(self.batch_path(int(batch_data["batch_idx"])), batch_data)

    def read_batch(self, batch_idx: int) -> dict | None:
        """Batch ``batch_idx`` from its file; ``None`` when there is none, or when it cannot be read (the run's own
        writes are atomic, but a copy or sync of the directory can cut a file short): then it is generated again,
        said in a warning naming the file."""
        path = self.batch_path(batch_idx)
        if not path.exists():
            return None
        try:
            with open(path, "rb") as handle:
                batch_data = pickle.load(handle)
        except Exception as error:  # noqa: BLE001 - any unreadable pickle: truncated, empty, not a pickle
            warnings.warn(f"{path} cannot be read ({type(error).__name__}: {error}); generating batch {batch_idx} "
                          f"again", stacklevel=2)  # fmt: skip
            return None
        if not isinstance(batch_data, dict) or batch_data.get("batch_idx") != batch_idx:
            warnings.warn(f"{path} does not hold batch {batch_idx}; generating it again", stacklevel=2)
            return None
        return batch_data

    def finished_batches(self, num_batches: int) -> list[dict]:
        """Batches ``0 .. k-1`` already on disk (stops at the first missing or unreadable one)."""
        done = []
        for batch_idx in range(num_batches):
            batch_data = self.read_batch(batch_idx)
            if batch_data is None:
                break
            done.append(batch_data)
        return done

    def load_batches(self, batch_indices) -> dict[int, dict]:
        """The batches among ``batch_indices`` already on disk, by index (gaps allowed: each process of a
        multi-process run saves only its own share, ``batch_idx % world_size == rank``)."""
        done = {}
        for batch_idx in batch_indices:
            if (batch_data := self.read_batch(int(batch_idx))) is not None:
                done[int(batch_idx)] = batch_data
        return done
