"""LongBench's scoring metrics, with LongBench's names and behaviour (and RULER's string match).

Each metric takes ``(prediction, ground_truth, **kwargs)`` and returns a float in [0, 1]; the
caller takes the max over a question's reference answers (see ``longbench_eval.scoring``).
Behaviour follows THUDM/LongBench ``metrics.py`` exactly, including its quirks, which are named
where they occur so nobody "fixes" them and silently changes the numbers:

- ``classification_score`` drops class names contained in the ground truth while iterating over
  the match list, which skips the element after each drop (Python list iteration semantics).
- ``rouge_score`` returns 0.0 when the ``rouge`` package raises (empty hypothesis, a hypothesis
  made only of ``.``, recursion on very long inputs).
- ``code_sim_score`` uses ``fuzzywuzzy.fuzz.ratio``; with python-Levenshtein installed (as in our
  requirements) it computes an InDel ratio, without it difflib's ratio, as in LongBench.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import jieba
from fuzzywuzzy import fuzz
from rouge import Rouge

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = frozenset(string.punctuation)
# Chinese punctuation removed by normalize_zh_answer (LongBench's list), on top of ASCII punctuation.
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    + "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(s: str) -> str:
    """English answer normalization (SQuAD style): lower case, drop punctuation, drop the
    articles a/an/the, collapse whitespace to single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese answer normalization: lower case, drop ASCII and Chinese punctuation, drop all
    whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCTUATION)
    return "".join(s.split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **kwargs) -> float:
    """Token-multiset F1 between two token lists (0 when nothing is shared)."""
    shared = sum((Counter(prediction) & Counter(ground_truth)).values())
    if shared == 0:
        return 0
    precision = shared / len(prediction)
    recall = shared / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """F1 over whitespace tokens of the normalized English answers."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    tokens = (normalize_zh_answer(token) for token in jieba.cut(text, cut_all=False))
    return [token for token in tokens if token]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """F1 over jieba words, each normalized, empty ones dropped."""
    return f1_score(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the ``rouge`` package (summary level, sentences split on '.'); 0.0 when it
    raises."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench catches everything here and scores 0
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L on jieba words joined by spaces."""
    return rouge_score(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/k when the ground-truth class is among the k class names found in the prediction
    (``all_classes`` keyword), else 0.

    Class names that are substrings of the ground truth (but not equal to it) are discarded from
    the matches, with LongBench's iterate-while-removing semantics: after a removal the next
    match is not examined.
    """
    matches = [name for name in kwargs["all_classes"] if name in prediction]
    i = 0
    while i < len(matches):
        name = matches[i]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)  # the element that slides into slot i is skipped, as in LongBench
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_match_score(prediction: str, target: str) -> float:
    """Fraction of the integers in the prediction that equal ``target`` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return float(sum(number == target for number in numbers) / len(numbers))


def count_score(prediction: str, ground_truth, **kwargs) -> float:
    """passage_count: fraction of the numbers in the prediction equal to the answer."""
    return _number_match_score(prediction, str(ground_truth))


# The paragraph id a passage_retrieval answer names (the metrics read the first match).
PARAGRAPH_EN = re.compile(r"Paragraph (\d+)")
PARAGRAPH_ZH = re.compile(r"段落(\d+)")


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_en: fraction of the numbers in the prediction equal to the paragraph id
    of the answer ("Paragraph N")."""
    return _number_match_score(prediction, PARAGRAPH_EN.findall(ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_zh: as retrieval_score with answers "段落N"."""
    return _number_match_score(prediction, PARAGRAPH_ZH.findall(ground_truth)[0])


# What every answer of a dataset scored by these metrics must contain (data.check_row refuses others:
# the metric would fail on them after generation).
ANSWER_PATTERNS = {retrieval_score: PARAGRAPH_EN, retrieval_zh_score: PARAGRAPH_ZH}


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """lcc / repobench-p: fuzz.ratio / 100 between the answer and the first line of the
    prediction (after leading newlines) that holds no '`', '#' or '//' ("" when none)."""
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz.ratio(first_code_line, ground_truth) / 100


def string_match(prediction: str, ground_truth: str, **kwargs) -> float:
    """RULER's ``string_match_all`` for one reference (the needle tasks of ``stdlib_tasks.py``):
    1 when the answer occurs in the prediction, case-insensitively."""
    return float(ground_truth.lower() in prediction.lower())


Metric = Callable[..., float]

DATASET_TO_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
