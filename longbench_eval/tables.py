"""LongBench's tables (config/*.json), dataset lists and model-name rules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

# LongBench (21 datasets) and LongBench-E (13 datasets, balanced over length), in LongBench's order.
LONGBENCH_DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)  # fmt: skip
LONGBENCH_E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
# Few-shot / completion tasks: chat models do better on them without the chat wrapper. The
# standard-library tasks (stdlib_tasks.py) are completions too: lcc's format, and needle prompts
# ending with RULER's answer prefix.
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p", "stdlib_lcc",
                              "stdlib_niah", "stdlib_niah_multikey"})  # fmt: skip
# Tasks whose prediction is cut to its first non-empty line before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# LongBench's model2maxlen entries are the context window minus 500 tokens of room for the answer;
# the fallback for models missing from the table follows the same rule.
FALLBACK_MARGIN = 500


@dataclass(frozen=True)
class Tables:
    dataset2prompt: dict[str, str]
    dataset2maxlen: dict[str, int]
    model2maxlen: dict[str, int]
    model2path: dict[str, str]


def _read(config_dir: Path, name: str) -> dict:
    path = config_dir / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def synthetic_datasets(config_dir: str | Path = CONFIG_DIR) -> tuple[str, ...]:
    """The project's own long-context tasks in LongBench format: the synthetic ones of
    ``synthetic_tasks.py`` and the ``stdlib_*`` ones of ``stdlib_tasks.py``. Their prompts, max new
    tokens and metrics live in ``config/synthetic_dataset2*.json``."""
    return tuple(_read(Path(config_dir), "synthetic_dataset2prompt"))


def project_task_command(name: str, config_dir: str | Path = CONFIG_DIR) -> str | None:
    """The command that writes the jsonl file of one of the project's own tasks (``name`` a dataset
    or its ``_e`` config name), or None for LongBench's datasets: these tasks are not on the hub."""
    if name not in synthetic_datasets(config_dir):
        return None
    if name.startswith("stdlib_"):
        return "python stdlib_tasks.py --out_dir data/stdlib"
    return "python synthetic_tasks.py --out_dir data/synthetic"


def load_tables(config_dir: str | Path = CONFIG_DIR) -> Tables:
    """LongBench's tables, with the synthetic tasks' prompt and max-new-token entries merged in."""
    config_dir = Path(config_dir)
    prompts = {**_read(config_dir, "dataset2prompt"), **_read(config_dir, "synthetic_dataset2prompt")}
    maxlen = {**_read(config_dir, "dataset2maxlen"), **_read(config_dir, "synthetic_dataset2maxlen")}
    return Tables(prompts, maxlen, _read(config_dir, "model2maxlen"), _read(config_dir, "model2path"))


def dataset_names(longbench_e: bool) -> tuple[str, ...]:
    return LONGBENCH_E_DATASETS if longbench_e else LONGBENCH_DATASETS


def select_datasets(requested: list[str] | None, longbench_e: bool) -> list[str]:
    """Expand ``all`` (LongBench's datasets), ``synthetic`` (synthetic_tasks.py's tasks), ``stdlib``
    (stdlib_tasks.py's tasks) and comma-separated lists; keep order, drop repeats; reject unknown
    names."""
    known = dataset_names(longbench_e)
    synthetic = () if longbench_e else synthetic_datasets()
    groups = {"all": known, "synthetic": tuple(n for n in synthetic if not n.startswith("stdlib_")),
              "stdlib": tuple(n for n in synthetic if n.startswith("stdlib_"))}  # fmt: skip
    names: list[str] = []
    for item in requested or ["all"]:
        for name in filter(None, (part.strip() for part in item.split(","))):
            for expanded in groups.get(name, (name,)):
                if expanded not in known and expanded not in synthetic:
                    bench = "LongBench-E" if longbench_e else "LongBench"
                    choices = ", ".join(("all", *known, *(("synthetic", "stdlib", *synthetic) if synthetic else ())))
                    raise ValueError(f"unknown {bench} dataset {expanded!r}; choose from: {choices}")
                if expanded not in names:
                    names.append(expanded)
    if not names:
        raise ValueError(f"--dataset_name {' '.join(requested or [])!r} names no dataset; give 'all' or dataset names")
    return names


@dataclass(frozen=True)
class ModelSpec:
    """``key``: the name results are filed under and the tables are looked up by; ``path``: what
    ``from_pretrained`` loads (hub id or local directory)."""

    key: str
    path: str

    @property
    def names(self) -> tuple[str, str]:
        return (self.key, self.path)


def resolve_model(name: str, model2path: dict[str, str]) -> ModelSpec:
    """A LongBench model key (``longchat-v1.5-7b-32k``), a hub id listed in model2path
    (``lmsys/longchat-7b-v1.5-32k`` resolves to the same key), or any other hub id / directory
    (filed under its last path component)."""
    if name in model2path:
        return ModelSpec(name, model2path[name])
    for key, path in model2path.items():
        if path == name:
            return ModelSpec(key, name)
    return ModelSpec(Path(name.rstrip("/")).name or name, name)


def prompt_budget(
    spec: ModelSpec, model2maxlen: dict[str, int], max_position_embeddings: int | None, override: int | None = None
) -> tuple[int, str]:
    """Prompt token budget and where it came from.

    Order: ``override`` (--max_length); model2maxlen by model key, then by the last component of
    the model path; else ``max(max_position_embeddings - 500, max_position_embeddings // 2)``.
    As in LongBench the budget bounds the prompt only: generated tokens come on top of it.
    """
    if override is not None:
        if override <= 1:
            raise ValueError(f"--max_length must be > 1, got {override}")
        return override, "--max_length"
    for name in (spec.key, Path(spec.path.rstrip("/")).name):
        if name in model2maxlen:
            return int(model2maxlen[name]), f"model2maxlen[{name!r}]"
    if not max_position_embeddings:
        raise ValueError(
            f"{spec.key!r} is not in config/model2maxlen.json and its config has no max_position_embeddings: "
            "pass --max_length"
        )
    budget = max(max_position_embeddings - FALLBACK_MARGIN, max_position_embeddings // 2)
    return budget, f"max_position_embeddings={max_position_embeddings} fallback"
