"""LongBench's scoring rules: first-line rule, max over answers, x100 rounding, length buckets."""

import pytest

from longbench_eval.scoring import length_bucket, score_prediction, scorer, scorer_e

TREC_CLASSES = ["Location", "Number", "Person"]


def test_first_line_rule_only_on_its_datasets():
    # triviaqa scores the first line after leading newlines: "Paris" vs "Paris" = 1
    assert score_prediction("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    # hotpotqa scores everything: [paris, london] vs [paris]: P = 1/2, R = 1, F1 = 2/3
    assert score_prediction("hotpotqa", "\nParis\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    # trec: first line "Location" is the only class found: 1; the whole text would match two
    assert score_prediction("trec", "\n\nLocation\nNumber", ["Location"], TREC_CLASSES) == 1.0


def test_max_over_answers():
    # F1(cat sat, dog) = 0, F1(cat sat, cat) = 2 * 1/2 * 1 / (3/2) = 2/3, F1(cat sat, cat sat) = 1
    assert score_prediction("qasper", "cat sat", ["dog", "cat"]) == pytest.approx(2 / 3)
    assert score_prediction("qasper", "cat sat", ["dog", "cat", "cat sat"]) == 1.0
    assert score_prediction("qasper", "cat sat", []) == 0.0


def test_scorer_mean_times_100_rounded():
    records = [
        {"pred": "cat sat", "answers": ["cat sat"]},  # 1
        {"pred": "cat sat", "answers": ["cat"]},  # 2/3
        {"pred": "dog", "answers": ["cat"]},  # 0
    ]
    # 100 * (1 + 2/3 + 0) / 3 = 55.555... -> 55.56
    assert scorer("qasper", records) == 55.56


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 30000)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+",
    ]  # fmt: skip


def test_scorer_e_buckets():
    records = [
        {"pred": "cat", "answers": ["cat"], "length": 100},  # 0-4k: 1
        {"pred": "dog", "answers": ["cat"], "length": 3999},  # 0-4k: 0
        {"pred": "cat sat", "answers": ["cat"], "length": 5000},  # 4-8k: 2/3
    ]
    # 0-4k: 100 * (1 + 0) / 2 = 50.0; 4-8k: 66.666... -> 66.67; 8k+: empty -> None
    assert scorer_e("qasper", records) == {"0-4k": 50.0, "4-8k": 66.67, "8k+": None}
