"""Synthetic long-context tasks in LongBench's jsonl format: the offline default workload.

Two retrieval tasks whose answer sits deep in the context, i.e. in the quantized part of a KV
cache (QJL and KIVI keep only the most recent ``buffer_size`` tokens exact):

- ``passkey``: the classic passkey test. Repetitive filler ("The grass is green. The sky is blue.
  ...") with one needle "The pass key is 407. Remember it. 407 is the pass key." at a uniformly
  random sentence boundary; the question asks for the pass key.
- ``multikey``: the same filler with several labelled needles ("The door code is 583. Remember
  it. 583 is the door code.") at random depths; the question asks for one label, so the model
  must match the label, not just find a number (RULER's "niah_multikey" in miniature).

Numbers are three-digit (100-999), one token each for tinylm's tokenizer: the answer is one
retrieval (at the first decode step, over the quantized cache) rather than a digit-by-digit copy,
which a model this small does not learn in the CPU time we have (see tinylm/README.md).

Records carry LongBench's fields: ``input`` (the question, ending with the answer's lead-in,
e.g. "What is the pass key? The pass key is"), ``context``, ``answers`` (one string: the digits),
``length`` (words of ``context``, as LongBench counts), ``all_classes`` (None), ``dataset`` and
``_id``. Prompt templates and max new tokens live in ``config/synthetic_dataset2prompt.json`` and
``config/synthetic_dataset2maxlen.json`` (LongBench's tables, for these tasks); both tasks are
scored with LongBench's ``qa_f1_score`` (``config/synthetic_dataset2metric.json``): the answer is
one word, so an output of just that word (normalization drops a final period) scores 1 and one that
says more scores the token F1 (``407. Remember it.`` scores 0.5).

A record's requested ``length`` is measured in tokens of the full prompt (template filled in,
BOS included) with the word-level tokenizer of ``tinylm`` (:func:`count_tokens` reproduces it
without loading it): the prompt has between ``length - 12`` and ``length`` tokens.

    python synthetic_tasks.py --out_dir data/synthetic --n 50 --lengths 512 1024 2048 --seed 0
"""

from __future__ import annotations

import argparse
import json
import re
import zlib
from pathlib import Path

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parent / "config"
TASKS = ("passkey", "multikey")
DEFAULT_LENGTHS = (512, 1024, 2048)

# The classic passkey filler (Mohtashami & Jaggi 2023), cycled from a random starting sentence.
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
PASSKEY_LABEL = "pass key"
MULTIKEY_LABELS = ("pass key", "door code", "room number", "bank pin", "safe combination", "phone extension")
NUMBERS = tuple(str(n) for n in range(100, 1000))  # one token each
MULTIKEY_COUNT = 2  # labelled numbers per multikey example
# Every word the tasks write (the tokenizer's vocabulary; digits and punctuation come on top).
_TEMPLATE_WORDS = "There is are a an some numbers hidden in lot of text Find it them and remember Remember What the"
VOCABULARY = tuple(
    sorted(set(" ".join((*FILLER, *MULTIKEY_LABELS, _TEMPLATE_WORDS, "The")).replace(".", " ").split()))
)
PUNCTUATION = (".", "?", ",", ":")

# One token per letter run (a vocabulary word), per digit run (a number), per punctuation mark,
# plus one for the bare word-start marker before a number: tinylm's tokenizer splits text this way.
_TOKEN_PATTERN = re.compile(r"(?:^|(?<=\s))(?=\d)|\d+|[^\w\s]|[^\W\d_]+")


def count_tokens(text: str, bos: bool = True) -> int:
    """Number of tokens of ``text`` with tinylm's word-level tokenizer (BOS included when ``bos``)."""
    return len(_TOKEN_PATTERN.findall(text)) + int(bos)


def load_table(name: str) -> dict:
    """``config/synthetic_<name>.json``: ``dataset2prompt``, ``dataset2maxlen`` or ``dataset2metric``."""
    return json.loads((CONFIG_DIR / f"synthetic_{name}.json").read_text(encoding="utf-8"))


def _distinct_numbers(rng: np.random.Generator, count: int) -> list[str]:
    return [NUMBERS[i] for i in rng.choice(len(NUMBERS), count, replace=False)]


def _question(label: str) -> str:
    return f"What is the {label}? The {label} is"


def _needle(label: str, number: str) -> str:
    # The classic passkey needle states the number twice.
    return f"The {label} is {number}. Remember it. {number} is the {label}."


def _build_context(rng: np.random.Generator, needles: list[str], filler_tokens: int) -> str:
    """Filler sentences totalling at most ``filler_tokens`` tokens, each needle inserted at an
    independent uniformly random sentence boundary."""
    sentences: list[str] = []
    used, i = 0, int(rng.integers(len(FILLER)))
    while True:
        sentence = FILLER[i % len(FILLER)]
        cost = count_tokens(sentence, bos=False)
        if used + cost > filler_tokens:
            break
        sentences.append(sentence)
        used += cost
        i += 1
    for needle in needles:
        sentences.insert(int(rng.integers(len(sentences) + 1)), needle)
    return " ".join(sentences)


def make_example(task: str, rng: np.random.Generator, length: int, prompt_format: str | None = None) -> dict:
    """One example of ``task`` whose filled-in prompt has at most ``length`` tokens (and at most
    one filler sentence fewer). Returns LongBench's fields except ``dataset`` and ``_id``."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    if prompt_format is None:
        prompt_format = load_table("dataset2prompt")[task]
    if task == "passkey":
        (number,) = _distinct_numbers(rng, 1)
        labels, numbers, asked = [PASSKEY_LABEL], [number], 0
    else:
        numbers = _distinct_numbers(rng, MULTIKEY_COUNT)
        labels = [MULTIKEY_LABELS[j] for j in rng.choice(len(MULTIKEY_LABELS), MULTIKEY_COUNT, replace=False)]
        asked = int(rng.integers(MULTIKEY_COUNT))
    needles = [_needle(label, number) for label, number in zip(labels, numbers)]
    question = _question(labels[asked])
    fixed = count_tokens(prompt_format.format(context=" ".join(needles), input=question))
    if fixed + 12 > length:
        raise ValueError(f"length {length} is too short for task {task!r} (needs at least {fixed + 12} tokens)")
    context = _build_context(rng, needles, length - fixed)
    return {
        "input": question,
        "context": context,
        "answers": [numbers[asked]],
        "length": len(context.split()),
        "all_classes": None,
    }


def _example_seed(seed: int, task: str, index: int) -> list[int]:
    # Each example gets its own stream, so a file's first n examples do not depend on n.
    return [seed, zlib.crc32(task.encode()), index]


def generate(task: str, n: int, lengths=DEFAULT_LENGTHS, seed: int = 0) -> list[dict]:
    """``n`` LongBench records of ``task``, example ``i`` of length ``lengths[i % len(lengths)]``
    tokens (so lengths are mixed and balanced); deterministic in ``(task, seed, i, length)``."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not lengths:
        raise ValueError("lengths must not be empty")
    prompt_format = load_table("dataset2prompt")[task]
    records = []
    for i in range(n):
        length = int(lengths[i % len(lengths)])
        rng = np.random.default_rng(_example_seed(seed, task, i))
        record = make_example(task, rng, length, prompt_format)
        record["dataset"] = task
        record["_id"] = f"{task}-s{seed}-{i:05d}-L{length}"
        records.append(record)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_task_files(records: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<task>.jsonl`` for each task's generated records, printing each path."""
    paths = []
    for task, rows in records.items():
        paths.append(Path(out_dir) / f"{task}.jsonl")
        write_jsonl(rows, paths[-1])
        print(paths[-1])
    return paths


def write_tasks(out_dir: str | Path, n: int, lengths=DEFAULT_LENGTHS, seed: int = 0, tasks=TASKS) -> list[Path]:
    """Write ``<out_dir>/<task>.jsonl`` for each task; returns the paths."""
    paths = []
    for task in tasks:
        path = Path(out_dir) / f"{task}.jsonl"
        write_jsonl(generate(task, n, lengths, seed), path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    from cli_io import non_negative_int, positive_int, require_output_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="data/synthetic")
    p.add_argument("--n", type=positive_int, default=50, help="examples per task (lengths cycle over --lengths)")
    # action="extend": a repeated flag adds to the list (nargs="+" alone keeps only the last one)
    p.add_argument("--lengths", type=positive_int, nargs="+", action="extend",
                   help=f"prompt lengths in tokens (default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--tasks", nargs="+", action="extend", choices=TASKS, help="default: all of them")
    args = p.parse_args(argv)
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    tasks = list(dict.fromkeys(args.tasks or TASKS))
    require_output_paths(p, "--out_dir", args.out_dir, [f"{task}.jsonl" for task in tasks])
    try:  # every task before writing any: a length too short for a task's prompt writes nothing
        records = {task: generate(task, args.n, args.lengths, args.seed) for task in tasks}
    except ValueError as e:
        p.error(f"argument --lengths: {e}")
    write_task_files(records, args.out_dir)


if __name__ == "__main__":
    main()
