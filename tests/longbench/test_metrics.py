"""LongBench's metrics on hand-made cases; expected values are worked out in the comments."""

import logging

import jieba
import pytest

import metrics
from metrics import (
    DATASET_TO_METRIC,
    classification_score,
    code_sim_score,
    count_score,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
)

jieba.setLogLevel(logging.WARNING)
ROUGE_EPS = 1e-6  # the rouge package adds 1e-8 to the F denominator
TREC_CLASSES = ["Location", "Number", "Person"]


def test_normalizers():
    # lower -> drop punctuation -> drop articles -> collapse spaces
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    # lower, drop ASCII + Chinese punctuation, drop all whitespace
    assert normalize_zh_answer("你好，世界! A B") == "你好世界ab"


@pytest.mark.parametrize(
    "prediction,truth,expected",
    [
        # pred -> [cat, sat, on, mat], truth -> [cat, on, mat]; 3 shared: P = 3/4, R = 1,
        # F1 = 2 * 3/4 * 1 / (3/4 + 1) = 6/7
        ("The cat sat on the mat.", "a cat on a mat", 6 / 7),
        # multisets {cat:2, dog:1} vs {cat:1, dog:2}: 2 shared, P = R = 2/3, F1 = 2/3
        ("cat cat dog", "cat dog dog", 2 / 3),
        ("dog", "cat", 0.0),  # nothing shared
        ("Paris.", "paris", 1.0),  # normalization makes them equal
    ],
)
def test_qa_f1_score(prediction, truth, expected):
    assert qa_f1_score(prediction, truth) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction,truth,expected",
    [
        # jieba: [我, 爱, 北京] vs [北京]: P = 1/3, R = 1, F1 = 2 * 1/3 / (4/3) = 1/2
        ("我爱北京", "北京", 0.5),
        # [北京, 。] -> the normalized "。" is empty and dropped: [北京] vs [北京] = 1
        ("北京。", "北京", 1.0),
        ("上海", "北京", 0.0),
    ],
)
def test_qa_f1_zh_score(prediction, truth, expected):
    assert qa_f1_zh_score(prediction, truth) == pytest.approx(expected)


def test_rouge_score():
    # one sentence each, distinct words; LCS(cat sat on mat, cat lay on mat) = cat on mat = 3,
    # R = P = 3/4, F = 2PR / (P + R) = 3/4
    assert rouge_score("cat sat on mat", "cat lay on mat") == pytest.approx(0.75, abs=ROUGE_EPS)
    # sentences split on '.': [cat sat], [dog ran] vs [cat sat dog ran]; union LCS = 4 of 4 words
    assert rouge_score("cat sat. dog ran", "cat sat dog ran") == pytest.approx(1.0, abs=ROUGE_EPS)
    assert rouge_score("", "cat") == 0.0  # the package raises on an empty hypothesis -> 0
    assert rouge_score(".", "cat") == 0.0  # only a separator: no sentence left -> raises -> 0


def test_rouge_zh_score():
    # jieba words [我, 爱, 北京] vs [我, 爱, 上海]: LCS = 2, P = R = 2/3, F = 2/3
    assert rouge_zh_score("我爱北京", "我爱上海") == pytest.approx(2 / 3, abs=ROUGE_EPS)


@pytest.mark.parametrize(
    "prediction,truth,classes,expected",
    [
        ("Location", "Location", TREC_CLASSES, 1.0),  # one match, the right one: 1/1
        ("Location or Person", "Person", TREC_CLASSES, 0.5),  # two matches, one right: 1/2
        ("Number", "Person", TREC_CLASSES, 0.0),  # the truth is not matched
        ("nothing", "Person", TREC_CLASSES, 0.0),
        # matches [HUM, HUM:ind]; HUM is inside the truth HUM:ind (and differs) -> dropped: 1/1
        ("HUM:ind", "HUM:ind", ["HUM", "HUM:ind", "LOC"], 1.0),
        # LongBench's quirk: matches [A, AB, ABC]; A is dropped while iterating, so AB slides into
        # its slot and is never examined; [AB, ABC] remain -> 1/2 (a clean filter would give 1)
        ("ABC", "ABC", ["A", "AB", "ABC"], 0.5),
    ],
)
def test_classification_score(prediction, truth, classes, expected):
    assert classification_score(prediction, truth, all_classes=classes) == expected


def test_retrieval_scores():
    # numbers in the prediction: [3] -> 1/1; [3, 12] -> 1/2; none -> 0
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3, not Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    assert retrieval_zh_score("答案是段落5和段落15", "段落5") == 0.5  # [5, 15] -> 1/2


def test_count_score():
    assert count_score("7", 7) == 1.0
    assert count_score("There are 7 unique paragraphs out of 10", 7) == 0.5  # [7, 10] -> 1/2
    assert count_score("There are 17", 7) == 0.0  # whole numbers only: 17 != 7
    assert count_score("seven", "7") == 0.0


def test_code_sim_score():
    # first line without '#', '`' or '//' is "x = 1"; vs "x = 2": 4 of 5 characters match on
    # each side: ratio = 2 * 4 / (5 + 5) = 0.8 (difflib) = (10 - 2 edits) / 10 (Levenshtein)
    assert code_sim_score("# a comment\nx = 1\ny = 2", "x = 2") == pytest.approx(0.8)
    assert code_sim_score("\n\nreturn x", "return x") == 1.0  # leading newlines skipped
    assert code_sim_score("```python\n// c\n", "return x") == 0.0  # no code line -> "" -> 0


def test_string_match():
    # RULER's metric: the answer anywhere in the prediction, case-insensitive; a near miss is 0
    assert metrics.string_match(" 2058756.\n\nThe", "2058756") == 1.0
    assert metrics.string_match(": The Key Is ABC", "abc") == 1.0
    assert metrics.string_match(" 205875.", "2058756") == 0.0


def test_dataset_table_covers_longbench():
    from longbench_eval.tables import LONGBENCH_DATASETS

    assert set(DATASET_TO_METRIC) == set(LONGBENCH_DATASETS)
    assert DATASET_TO_METRIC["samsum"] is metrics.rouge_score
    assert DATASET_TO_METRIC["lsht"] is metrics.classification_score
    assert DATASET_TO_METRIC["repobench-p"] is metrics.code_sim_score
