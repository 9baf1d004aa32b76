"""LongBench examples: from a local directory of jsonl files or from the Hugging Face hub."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

HF_DATASET = "THUDM/LongBench"
HF_DATA_ZIP = "data.zip"  # the official archive: data/<dataset>.jsonl and data/<dataset>_e.jsonl
REQUIRED_FIELDS = ("context", "input", "answers", "length")


class DataUnavailableError(RuntimeError):
    """Neither a local file nor the hub could provide a dataset."""


def config_name(dataset: str, longbench_e: bool) -> str:
    """The hub config / file stem: ``qasper`` or ``qasper_e``."""
    return f"{dataset}_e" if longbench_e else dataset


def _how_to_get_data(name: str) -> str:
    return (
        f"Either pass --data_dir DIR holding {name}.jsonl (unzip LongBench's data.zip from "
        f"https://huggingface.co/datasets/{HF_DATASET}; its data/ folder also works as DIR), "
        f"or run with network access to the Hugging Face hub ({HF_DATASET}, config {name!r})."
    )


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_local(data_dir: Path, name: str) -> list[dict]:
    for candidate in (data_dir / f"{name}.jsonl", data_dir / "data" / f"{name}.jsonl"):
        if candidate.is_file():
            return read_jsonl(candidate)
    raise DataUnavailableError(f"{data_dir / (name + '.jsonl')} not found. {_how_to_get_data(name)}")


def _load_from_hub(name: str) -> list[dict]:
    """``datasets.load_dataset`` first; newer ``datasets`` refuse LongBench's loading script, so
    then the official data.zip through huggingface_hub (cached like any hub file)."""
    errors = []
    try:
        from datasets import load_dataset

        return [dict(row) for row in load_dataset(HF_DATASET, name, split="test")]
    except Exception as e:  # offline, script datasets unsupported, ...: try the archive
        errors.append(f"datasets.load_dataset: {type(e).__name__}: {str(e)[:200]}")
    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(HF_DATASET, HF_DATA_ZIP, repo_type="dataset")
        with zipfile.ZipFile(archive) as z, z.open(f"data/{name}.jsonl") as f:
            text = io.TextIOWrapper(f, encoding="utf-8")
            return [json.loads(line) for line in text if line.strip()]
    except Exception as e:
        errors.append(f"huggingface_hub {HF_DATA_ZIP}: {type(e).__name__}: {str(e)[:200]}")
    raise DataUnavailableError(
        f"could not load LongBench data {name!r} from the hub ({'; '.join(errors)}). {_how_to_get_data(name)}"
    )


def load_examples(
    dataset: str, *, longbench_e: bool = False, data_dir: str | Path | None = None, n_data: int | None = None
) -> list[dict]:
    """The first ``n_data`` examples (all when None) of one dataset, in file order.

    Each example gains ``index`` (its position in the file) and keeps LongBench's ``_id``
    (``"<index>"`` when the file has none); ``all_classes`` defaults to None.
    """
    name = config_name(dataset, longbench_e)
    rows = _load_local(Path(data_dir), name) if data_dir is not None else _load_from_hub(name)
    if n_data is not None:
        if n_data <= 0:
            raise ValueError(f"--n_data must be positive, got {n_data}")
        rows = rows[:n_data]
    if not rows:
        raise ValueError(f"LongBench data {name!r} holds no examples")
    examples = []
    for index, row in enumerate(rows):
        missing = [field for field in REQUIRED_FIELDS if field not in row]
        if missing:
            raise ValueError(f"{name} example {index} lacks LongBench field(s) {missing}")
        example = dict(row)
        example["index"] = index
        example.setdefault("_id", str(index))
        example.setdefault("all_classes", None)
        examples.append(example)
    return examples


def shard(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """Rank ``rank``'s disjoint share: examples whose index is ``rank`` modulo ``world_size``."""
    return [example for example in examples if example["index"] % world_size == rank]
