"""LongBench's scoring rules (its eval.py) on top of the metrics in ``metrics.py``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import metrics
from metrics import DATASET_TO_METRIC

from .tables import CONFIG_DIR, FIRST_LINE_DATASETS, _read

# The synthetic tasks name their LongBench metric in config/synthetic_dataset2metric.json.
SYNTHETIC_METRICS = {name: getattr(metrics, metric) for name, metric in _read(CONFIG_DIR, "synthetic_dataset2metric").items()}

LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def metric_for(dataset: str):
    """The metric ``dataset`` is scored with (LongBench's table, then this project's tasks); None
    for a name neither knows."""
    return DATASET_TO_METRIC.get(dataset) or SYNTHETIC_METRICS.get(dataset)


def score_prediction(dataset: str, prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """Max of the dataset's metric over the reference answers (0 when there are none); trec,
    triviaqa, samsum and lsht score only the first line after leading newlines."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = metric_for(dataset)
    if metric is None:
        raise KeyError(dataset)
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes=all_classes))
    return score


def length_bucket(length: int) -> str:
    """LongBench-E's bucket of an example by its ``length`` field (words, or characters for
    Chinese, of the context)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def scorer(dataset: str, records: Sequence[dict]) -> float:
    """Mean score x 100, rounded to 2 decimals (LongBench's ``scorer``; sequential sum)."""
    if not records:
        raise ValueError(f"no predictions to score for {dataset}")
    total = 0.0
    for r in records:
        total += score_prediction(dataset, r["pred"], r["answers"], r.get("all_classes"))
    return round(100 * total / len(records), 2)


def scorer_e(dataset: str, records: Sequence[dict]) -> dict[str, float | None]:
    """Mean score x 100 per LongBench-E length bucket, rounded to 2 decimals; None for an empty
    bucket (LongBench writes NaN there, which is not valid JSON)."""
    scores: dict[str, list[float]] = {bucket: [] for bucket in LENGTH_BUCKETS}
    for r in records:
        s = score_prediction(dataset, r["pred"], r["answers"], r.get("all_classes"))
        scores[length_bucket(r["length"])].append(s)
    return {bucket: round(100 * float(np.mean(v)), 2) if v else None for bucket, v in scores.items()}
