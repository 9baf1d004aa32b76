"""LongBench examples: from a local directory of jsonl files or from the Hugging Face hub."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from metrics import ANSWER_PATTERNS, classification_score

from . import scoring, tables

HF_DATASET = "THUDM/LongBench"
HF_DATA_ZIP = "data.zip"  # the official archive: data/<dataset>.jsonl and data/<dataset>_e.jsonl
REQUIRED_FIELDS = ("context", "input", "answers", "length")
# What a prediction and its score depend on (prompt templates use {context} and {input}); the data
# hash in settings.json covers these fields of every row.
HASHED_FIELDS = ("_id", "input", "context", "answers", "all_classes", "length")


class DataUnavailableError(RuntimeError):
    """Neither a local file nor the hub could provide a dataset."""


def config_name(dataset: str, longbench_e: bool) -> str:
    """The hub config / file stem: ``qasper`` or ``qasper_e``."""
    return f"{dataset}_e" if longbench_e else dataset


def _how_to_get_data(name: str) -> str:
    if command := tables.project_task_command(name):
        return (
            f"{name} is a task of this project, not of LongBench: write it with `{command}` and pass that "
            "directory as --data_dir."
        )
    return (
        f"Either pass --data_dir DIR holding {name}.jsonl (unzip LongBench's data.zip from "
        f"https://huggingface.co/datasets/{HF_DATASET}; its data/ folder also works as DIR), "
        f"or run with network access to the Hugging Face hub ({HF_DATASET}, config {name!r})."
    )


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in _numbered_rows(path.read_text(encoding="utf-8").split("\n"), str(path))]


def _numbered_rows(lines, source: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` of each non-blank jsonl line (numbers count blank lines, from 1);
    ValueError naming ``source:line`` for a line that is not a JSON object."""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{number}: a LongBench row must be a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _load_local(data_dir: Path, name: str) -> tuple[str, list[tuple[int, dict]]]:
    for candidate in (data_dir / f"{name}.jsonl", data_dir / "data" / f"{name}.jsonl"):
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataUnavailableError(f"{candidate}: cannot read it ({e})") from e
            source = str(candidate.resolve())
            return source, _numbered_rows(text.split("\n"), source)
    raise DataUnavailableError(f"{data_dir / (name + '.jsonl')} not found. {_how_to_get_data(name)}")


def _load_from_hub(name: str) -> tuple[str, list[tuple[int, dict]]]:
    """``datasets.load_dataset`` first; newer ``datasets`` refuse LongBench's loading script, so
    then the official data.zip through huggingface_hub (cached like any hub file)."""
    if tables.project_task_command(name):  # not on the hub: do not spend a minute asking it
        raise DataUnavailableError(f"{name} needs --data_dir: {_how_to_get_data(name)}")
    errors = []
    try:
        from datasets import load_dataset

        rows = [dict(row) for row in load_dataset(HF_DATASET, name, split="test")]
        return f"hub {HF_DATASET} config {name}", [(number, row) for number, row in enumerate(rows, 1)]
    except Exception as e:  # offline, script datasets unsupported, ...: try the archive
        errors.append(f"datasets.load_dataset: {type(e).__name__}: {str(e)[:200]}")
    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(HF_DATASET, HF_DATA_ZIP, repo_type="dataset")
        with zipfile.ZipFile(archive) as z, z.open(f"data/{name}.jsonl") as f:
            lines = io.TextIOWrapper(f, encoding="utf-8").read().split("\n")
    except Exception as e:
        errors.append(f"huggingface_hub {HF_DATA_ZIP}: {type(e).__name__}: {str(e)[:200]}")
        raise DataUnavailableError(
            f"could not load LongBench data {name!r} from the hub ({'; '.join(errors)}). {_how_to_get_data(name)}"
        ) from None
    source = f"{archive}:data/{name}.jsonl"
    return source, _numbered_rows(lines, source)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# field -> (check, what it must be); every row is checked when loaded, so that a malformed row
# stops the run before the model loads instead of scoring wrongly (a string `answers` would be
# scored character by character).
ROW_SCHEMA = {
    "input": (lambda v: isinstance(v, str), "a string"),
    "context": (lambda v: isinstance(v, str), "a string"),
    "answers": (_is_str_list, "a list of strings"),
    "length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "all_classes": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "_id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) != "", "a non-empty string"),
}


# metrics that read the class names of a row (``all_classes`` keyword): for a dataset scored by
# one, a row without them would crash the scoring after generation, so they are required
CLASS_METRICS = (classification_score,)


def needs_classes(dataset: str) -> bool:
    """Whether ``dataset``'s metric matches predictions against the row's ``all_classes``."""
    return scoring.metric_for(dataset) in CLASS_METRICS


def _shown(value) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def check_row(row: dict, where: str, dataset: str | None = None) -> None:
    """ValueError naming ``where`` (``file:line``) when ``row`` is not a LongBench row (of
    ``dataset``: a classification dataset's rows need their class names in ``all_classes``, a
    passage_retrieval dataset's answers the paragraph they name, as the metrics read them)."""
    missing = [field for field in REQUIRED_FIELDS if field not in row]
    if missing:
        raise ValueError(f"{where}: row lacks LongBench field(s) {missing}")
    for field, (ok, what) in ROW_SCHEMA.items():
        if field in row and not (field == "_id" and row[field] is None) and not ok(row[field]):
            raise ValueError(f"{where}: field {field!r} must be {what}, got {_shown(row[field])}")
    metric = scoring.metric_for(dataset) if dataset is not None else None
    if metric in CLASS_METRICS:
        classes = row.get("all_classes")
        if not (_is_str_list(classes) and classes):
            got = _shown(classes) if "all_classes" in row else "no such field"
            raise ValueError(f"{where}: field 'all_classes' must be a non-empty list of strings for {dataset} (its "
                             f"metric, {metric.__name__}, looks for the class names in the prediction), got {got}")
    pattern = ANSWER_PATTERNS.get(metric)
    if pattern is not None:
        for answer in row["answers"]:
            if not pattern.search(answer):
                raise ValueError(f"{where}: every answer of {dataset} must contain {pattern.pattern!r} (its metric, "
                                 f"{metric.__name__}, reads what it scores from that), got {answer!r}")


@dataclass(frozen=True)
class Dataset:
    """The selected examples of one dataset, where they came from, and a hash of the whole file's
    rows (:data:`HASHED_FIELDS`, canonical JSON): a rerun on other data is refused, one on the same
    data with another ``--n_data`` is not."""

    name: str
    source: str
    sha256: str
    n_rows: int
    examples: list[dict]

    def settings(self) -> dict:
        """Its entries in settings.json (``data_source`` is recorded, not compared)."""
        return {"data_source": self.source, "data_sha256": self.sha256, "data_rows": self.n_rows}


def data_hash(examples: list[dict]) -> str:
    canonical = [{field: example.get(field) for field in HASHED_FIELDS} for example in examples]
    text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_examples(
    dataset: str, *, longbench_e: bool = False, data_dir: str | Path | None = None, n_data: int | None = None
) -> list[dict]:
    """The first ``n_data`` examples (all when None) of one dataset, in file order (see :func:`load_data`)."""
    return load_data(dataset, longbench_e=longbench_e, data_dir=data_dir, n_data=n_data).examples


def load_data(
    dataset: str, *, longbench_e: bool = False, data_dir: str | Path | None = None, n_data: int | None = None
) -> Dataset:
    """The first ``n_data`` examples (all when None) of one dataset, in file order.

    Every row of the file is checked (:func:`check_row`; errors name ``file:line``) and hashed.
    Each example gains ``index`` (its position in the file) and keeps LongBench's ``_id``
    (``"<index>"`` when the row has none or null); ``all_classes`` defaults to None. Two rows with
    the same ``_id`` (compared as strings) are an error: they would be scored as one example.
    """
    if n_data is not None and n_data <= 0:
        raise ValueError(f"--n_data must be positive, got {n_data}")
    name = config_name(dataset, longbench_e)
    source, rows = _load_local(Path(data_dir), name) if data_dir is not None else _load_from_hub(name)
    if not rows:
        raise ValueError(f"{source}: LongBench data {name!r} holds no examples")
    examples = []
    lines_of: dict[str, list[int]] = {}
    for index, (number, row) in enumerate(rows):
        check_row(row, f"{source}:{number}", dataset)
        example = dict(row)
        example["index"] = index
        if example.get("_id") is None:
            example["_id"] = str(index)
        example.setdefault("all_classes", None)
        examples.append(example)
        lines_of.setdefault(str(example["_id"]), []).append(number)
    duplicates = {i: numbers for i, numbers in lines_of.items() if len(numbers) > 1}
    if duplicates:
        shown = "; ".join(f"_id {i!r} on lines {', '.join(map(str, n))}" for i, n in list(duplicates.items())[:5])
        raise ValueError(
            f"{source}: {len(duplicates)} duplicate _id(s) ({shown}); each example needs its own _id "
            f"(a row without _id gets its 0-based row position)"
        )
    selected = examples if n_data is None else examples[:n_data]
    return Dataset(name, source, data_hash(examples), len(examples), selected)


def shard(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """Rank ``rank``'s disjoint share: examples whose index is ``rank`` modulo ``world_size``."""
    return [example for example in examples if example["index"] % world_size == rank]
