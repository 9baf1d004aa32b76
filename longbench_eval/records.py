"""Prediction files: append-and-flush per example, crash-tolerant reading, resume, rank merge.

Layout of one (model, method, dataset) directory:
``predictions.jsonl`` (merged, ordered by example index), ``predictions.rank<r>.jsonl`` (what
rank r of a torchrun run appends; merged into predictions.jsonl by rank 0 and removed),
``settings.json`` (what the predictions depend on) and ``result.json`` (scores).
A single process appends to predictions.jsonl directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREDICTIONS = "predictions.jsonl"
SETTINGS = "settings.json"
RESULT = "result.json"


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


def check_settings(directory: Path, settings: dict) -> None:
    """Record the settings the predictions depend on; refuse to resume into predictions made with
    other settings."""
    path = directory / SETTINGS
    settings = json.loads(json.dumps(settings))  # compare in JSON form (tuples become lists)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{directory} holds predictions made with other settings (differences: {changed}); "
                "use another --output_dir or delete that directory"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)
