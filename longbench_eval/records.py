"""Prediction files: append-and-flush per example, crash-tolerant reading, resume, rank merge.

Layout of one (model, method, dataset) directory:
``predictions.jsonl`` (merged, ordered by example index), ``predictions.rank<r>.jsonl`` (what
rank r of a torchrun run appends; merged into predictions.jsonl by rank 0 and removed),
``settings.json`` (what the predictions depend on, the data's hash included), ``result.json``
(scores) and ``run.lock`` (held by the run writing there: :class:`DirectoryLock`).
A single process appends to predictions.jsonl directly.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs into one directory are not guarded against each other
    fcntl = None

PREDICTIONS = "predictions.jsonl"
SETTINGS = "settings.json"
RESULT = "result.json"
LOCK = "run.lock"
# Recorded in settings.json for the reader, not compared on resume: the same data may be reached
# by another path (a moved directory, another machine's hub cache); its hash is compared.
INFORMATIONAL_SETTINGS = ("data_source",)


def part_path(directory: Path, rank: int) -> Path:
    return directory / f"predictions.rank{rank}.jsonl"


def write_path(directory: Path, rank: int, world_size: int) -> Path:
    return directory / PREDICTIONS if world_size == 1 else part_path(directory, rank)


def read_records(path: Path) -> list[dict]:
    """Records of one jsonl file; a last line cut short by a crash is ignored, a bad line
    elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: an interrupted write
                break
            raise ValueError(f"{path}:{number}: corrupt prediction record ({e}); fix or delete the line") from e
    return records


def repair_tail(path: Path) -> None:
    """Make ``path`` end with a complete line before appending: an interrupted last record is
    cut off (a complete one only lacking its newline gets it)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        with open(path, "ab") as f:
            f.write(b"\n")
    except json.JSONDecodeError:
        with open(path, "r+b") as f:
            f.truncate(cut)


def all_prediction_files(directory: Path) -> list[Path]:
    return [directory / PREDICTIONS, *sorted(directory.glob("predictions.rank*.jsonl"))]


def load_done(directory: Path) -> dict[str, dict]:
    """Finished records by ``_id``, from the merged file and any rank files (of this run or of an
    interrupted one with another world size)."""
    done: dict[str, dict] = {}
    for path in all_prediction_files(directory):
        for record in read_records(path):
            done.setdefault(str(record["_id"]), record)
    return done


class PredictionWriter:
    """Appends one JSON line per example and flushes it, so a crash loses at most the example
    being written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json_atomic(path: Path, data, **kwargs) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, **kwargs) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def merge(directory: Path) -> list[dict]:
    """Fold the rank files into predictions.jsonl (deduplicated by ``_id``, ordered by index),
    remove them, and return all records. The rewrite goes through a temporary file and a rename,
    so a crash leaves either the old or the new file."""
    records = sorted(load_done(directory).values(), key=lambda r: r["index"])
    parts = all_prediction_files(directory)[1:]
    main = directory / PREDICTIONS
    tmp = directory / f".{PREDICTIONS}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, main)
    for part in parts:
        part.unlink()
    return records


def _shown(settings: dict, key: str) -> str:
    text = json.dumps(settings[key], ensure_ascii=False) if key in settings else "nothing"
    return text if len(text) <= 80 else text[:77] + "..."


def _difference(old: dict, new: dict, key: str) -> str:
    """``key: <recorded> recorded, <now> now``; for two dicts (e.g. the QJL configuration) only the
    entries that differ, so a long value cannot hide its one changed field behind a cut."""
    before, after = old.get(key), new.get(key)
    if isinstance(before, dict) and isinstance(after, dict):
        fields = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        return "; ".join(f"{key}.{f}: {_shown(before, f)} recorded, {_shown(after, f)} now" for f in fields)
    return f"{key}: {_shown(old, key)} recorded, {_shown(new, key)} now"


def check_settings(directory: Path, settings: dict, *, partial: bool = False) -> None:
    """Record the settings the predictions depend on; refuse to resume into predictions made with
    other settings, naming each difference (recorded vs now). ``partial``: compare only the keys
    given, write nothing (an early check, before the model that the other settings need loads).
    Keys in :data:`INFORMATIONAL_SETTINGS` are recorded but not compared."""
    path = directory / SETTINGS
    settings = json.loads(json.dumps(settings))  # compare in JSON form (tuples become lists)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: corrupt settings file ({e.msg}); delete {directory}") from e
        keys = set(settings) if partial else set(old) | set(settings)
        changed = sorted(k for k in keys - set(INFORMATIONAL_SETTINGS) if old.get(k) != settings.get(k))
        if changed:
            details = "; ".join(_difference(old, settings, k) for k in changed)
            context = "".join(
                f"; {k}: {_shown(old, k)} recorded, {_shown(settings, k)} now"
                for k in INFORMATIONAL_SETTINGS if k in settings and old.get(k) != settings.get(k)
            )  # fmt: skip
            raise ValueError(
                f"{directory} holds predictions made with other settings (differences: {changed}; {details}{context}); "
                "use another --output_dir or delete that directory"
            )
        return
    if partial:
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


class DirectoryLock:
    """An exclusive lock on one output directory for the life of a run (``flock`` on ``run.lock``,
    non-blocking): a second run into the same directory is refused instead of appending to,
    merging or rewriting files the first is still writing. The lock file names its holder (pid,
    host, start, command), so the refusal can say which run holds it. The kernel drops the lock
    when the holder exits, however it exits. Without ``fcntl`` (Windows) nothing is locked.

    ``acquire`` creates the directory: it is also the check that the output directory is
    writable, made before the model loads."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.created = False  # the directory did not exist before acquire
        self._file = None

    def acquire(self) -> "DirectoryLock":
        try:
            self.created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(f"no write permission on {self.directory}")
            lock_file = open(self.directory / LOCK, "a+", encoding="utf-8")
        except OSError as e:
            raise ValueError(
                f"cannot write to the output directory {self.directory}: {e}; choose another --output_dir"
            ) from e
        if fcntl is None:
            warnings.warn(f"no fcntl here: {self.directory} is not locked against other runs", stacklevel=2)
        else:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "a process that has not yet written its name"
                lock_file.close()
                raise ValueError(
                    f"{self.directory} is in use by another run ({holder}); wait for it to finish or use another "
                    "--output_dir"
                ) from None
            lock_file.seek(0)
            lock_file.truncate()
            started = datetime.datetime.now().isoformat(timespec="seconds")
            lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
            lock_file.flush()
        self._file = lock_file
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock; ``remove``: also remove the directory if ``acquire`` created it and it
        holds nothing else (a method that turned out unable to run)."""
        if self._file is None:
            return
        if remove and self.created:
            (self.directory / LOCK).unlink(missing_ok=True)
        self._file.close()  # closing the file drops the flock
        self._file = None
        if remove and self.created:
            for directory in (self.directory, self.directory.parent):
                try:
                    directory.rmdir()
                except OSError:  # not empty
                    break

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
