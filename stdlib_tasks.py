"""Long-context tasks in LongBench's jsonl format built from real text every machine has: the
running interpreter's standard-library sources (no download). The offline default workload for a
real pretrained model (SmolLM2-135M-Instruct, ``models/pretrained.py``).

- ``stdlib_lcc``: LongBench's ``lcc`` (code completion) on standard-library files: the context is
  a file's text up to a seeded random line (its last ``chars`` characters, from a line start), the
  answer is the next non-empty line (cuts before a line that ``code_sim_score`` could never match,
  holding ``#``, a backquote or ``//``, are skipped); LongBench's lcc prompt and ``code_sim_score``.
- ``stdlib_niah``: RULER's single needle in a haystack (``niah_single``) with real code as the
  haystack: a stretch of standard-library source starting at a seeded random line, with one line
  "# One of the special magic numbers for <word> is: <7-digit number>." inserted at a random line
  boundary; the question asks for the number. RULER's ``string_match`` metric.
- ``stdlib_niah_multikey``: RULER's ``niah_multikey_1``: four such needles with distinct words; the
  question asks for one of them, so the model must match the word, not just find a number.

The needle tasks need contexts at least twice as long as their needle lines can be (``min_chars``:
482 characters for the multikey task), so that at least half of the context is code.

Records carry LongBench's fields (``input``, ``context``, ``answers``, ``length`` = words of the
context, ``all_classes``, ``dataset``, ``_id``) plus ``source`` (file and line the text starts
at). The needle tasks' ``input`` ends with RULER's answer prefix, so they are completion prompts
(no chat wrapper, like lcc). Templates, max new tokens and metrics live in
``config/synthetic_dataset2{prompt,maxlen,metric}.json``. Example ``i`` of a task depends only on
``(task, seed, i, chars)`` and the Python version (the standard library differs between versions).

    python stdlib_tasks.py --out_dir data/stdlib --n 20 --chars 3000 6000 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

import metrics
from real_text import stdlib_files
from synthetic_tasks import write_jsonl, write_task_files

TASKS = ("stdlib_lcc", "stdlib_niah", "stdlib_niah_multikey")
DEFAULT_CHARS = (3000, 6000)
MIN_CHARS = 200
NEEDLE_KEYS = (
    "apple", "river", "candle", "harbor", "violet", "tiger", "marble", "comet", "willow", "falcon", "lantern",
    "meadow", "orchid", "pepper", "quartz", "saddle", "thunder", "velvet", "walnut", "anchor", "blossom", "canyon",
    "dolphin", "ember", "feather", "glacier", "hammock", "island", "jasmine", "kettle", "lemon", "mirror", "nectar",
    "oyster", "pebble", "raven", "silver", "timber", "umbrella", "valley", "whistle", "yarn", "zebra", "biscuit",
    "cobalt", "dragon", "garnet", "helmet", "igloo", "jigsaw", "kayak", "ladder", "magnet", "napkin",
)  # fmt: skip
MULTIKEY_NEEDLES = 4
NEEDLES = {"stdlib_lcc": 0, "stdlib_niah": 1, "stdlib_niah_multikey": MULTIKEY_NEEDLES}  # needle lines per example
NEEDLE_VALUES = (1_000_000, 10_000_000)  # the numbers: 7 digits, drawn from [low, high)
# code_sim_score compares the answer with the first prediction line holding none of these, so an
# answer holding one could never be matched: such cuts are skipped.
_LCC_SKIPPED = ("#", "`", "//")
_NEEDLE = "# One of the special magic numbers for {key} is: {value}."
_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)


def python_tag() -> str:
    """``py3.12``: the standard library, hence the data, depends on the interpreter's version."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


@lru_cache(maxsize=1)
def _haystack() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every line of :func:`_sources` in order, and the file each line comes from."""
    lines = tuple(line for _, file_lines in _sources() for line in file_lines)
    owners = tuple(name for name, file_lines in _sources() for _ in file_lines)
    return lines, owners


@lru_cache(maxsize=1)
def _sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(file name, lines)`` of every top-level standard-library module, sorted by name."""
    return tuple(
        (path.name, tuple(path.read_text(encoding="utf-8", errors="replace").split("\n"))) for path in stdlib_files()
    )


def _record(context: str, question: str, answer: str, source: str) -> dict:
    return {"input": question, "context": context, "answers": [answer], "length": len(context.split()),
            "all_classes": None, "source": source}  # fmt: skip


def make_lcc_example(rng: np.random.Generator, chars: int) -> dict:
    """A file cut at a random line: the ``chars`` characters before the cut (from a line start;
    files whose text before every cut is shorter are not used) and the next non-empty line."""
    sources = [(name, lines) for name, lines in _sources() if sum(len(line) + 1 for line in lines) > chars + 200]
    if not sources:
        raise ValueError(f"no standard-library file is longer than {chars} characters")
    for _ in range(10_000):
        name, lines = sources[int(rng.integers(len(sources)))]
        ends = np.cumsum([len(line) + 1 for line in lines])  # ends[i]: characters of lines[: i + 1]
        first_cut = int(np.searchsorted(ends, chars)) + 1  # the prefix before the cut holds >= chars
        if first_cut >= len(lines):
            continue
        cut = int(rng.integers(first_cut, len(lines)))
        answer = next((line.rstrip() for line in lines[cut:] if line.strip()), None)
        if answer is None or any(marker in answer for marker in _LCC_SKIPPED):
            continue
        prefix = "\n".join(lines[:cut]) + "\n"
        start = len(prefix) - chars
        if start > 0 and prefix[start - 1] != "\n":
            start = prefix.index("\n", start) + 1  # begin at a line start
        first_line = prefix.count("\n", 0, start) + 1
        return _record(prefix[start:], "", answer, f"{name}:{first_line}")
    raise ValueError(f"found no code line to complete after {chars} characters of a standard-library file")


def needle_chars(needles: int) -> int:
    """The most characters ``needles`` needle lines can take, newlines included (the longest keys)."""
    value = "9" * len(str(NEEDLE_VALUES[1] - 1))
    lengths = sorted((len(_NEEDLE.format(key=key, value=value)) + 1 for key in NEEDLE_KEYS), reverse=True)
    return sum(lengths[:needles])


def haystack_least(needles: int) -> int:
    """The smallest context for ``needles`` needle lines: room for code at least as long as the
    needles can be, so that needles fill at most half of it (and the context never exceeds its size)."""
    return 2 * needle_chars(needles)


def min_chars(task: str) -> int:
    """The smallest context ``task`` is made at: :data:`MIN_CHARS`, or :func:`haystack_least` of its needles."""
    return max(MIN_CHARS, haystack_least(NEEDLES[task]))


def check_chars(task: str, chars: Sequence[int]) -> None:
    """ValueError unless every size in ``chars`` is at least ``min_chars(task)``."""
    least, size = min_chars(task), min(chars)
    if size < least:
        needles, why = NEEDLES[task], ""
        if needles and least > MIN_CHARS:
            why = f": its {needles} needle lines take up to {needle_chars(needles)}, the haystack at least as many"
        raise ValueError(f"length {size} is too short for task {task!r} (needs at least {least} characters{why})")


def make_niah_example(rng: np.random.Generator, chars: int, needles: int = 1) -> dict:
    """``chars`` characters of standard-library code from a random line on (across files, in
    name order, wrapping around) with ``needles`` needle lines at random line boundaries; ``chars``
    must leave the haystack as many characters as the needles can take."""
    if not 1 <= needles <= len(NEEDLE_KEYS):
        raise ValueError(f"needles must be in 1..{len(NEEDLE_KEYS)}, got {needles}")
    if chars < haystack_least(needles):
        raise ValueError(f"{needles} needle(s) need a context of at least {haystack_least(needles)} characters "
                         f"(at most half of it needles), got {chars}")
    lines, owners = _haystack()
    keys = [str(k) for k in rng.choice(NEEDLE_KEYS, needles, replace=False)]
    values = [str(v) for v in rng.choice(np.arange(*NEEDLE_VALUES), needles, replace=False)]
    needle_lines = [_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    budget = chars - sum(len(n) + 1 for n in needle_lines)
    start = int(rng.integers(len(lines)))
    hay, used, i = [], 0, start
    while used + len(lines[i % len(lines)]) + 1 <= budget:
        hay.append(lines[i % len(lines)])
        used += len(hay[-1]) + 1
        i += 1
    for needle in needle_lines:
        hay.insert(int(rng.integers(len(hay) + 1)), needle)
    asked = int(rng.integers(needles))
    first_line = start - owners.index(owners[start]) + 1
    return _record("\n".join(hay), _QUESTION.format(key=keys[asked]), values[asked], f"{owners[start]}:{first_line}")


def make_example(task: str, rng: np.random.Generator, chars: int) -> dict:
    """One example of ``task`` with a context of about ``chars`` characters."""
    if task == "stdlib_lcc":
        return make_lcc_example(rng, chars)
    if task == "stdlib_niah":
        return make_niah_example(rng, chars, 1)
    if task == "stdlib_niah_multikey":
        return make_niah_example(rng, chars, MULTIKEY_NEEDLES)
    raise ValueError(f"unknown standard-library task {task!r}; choose from {', '.join(TASKS)}")


def generate(task: str, n: int, chars: Sequence[int] = DEFAULT_CHARS, seed: int = 0) -> list[dict]:
    """``n`` records of ``task``, example ``i`` with a context of ``chars[i % len(chars)]``
    characters; each example has its own random stream, so the first ``k`` do not depend on ``n``."""
    if task not in TASKS:
        raise ValueError(f"unknown standard-library task {task!r}; choose from {', '.join(TASKS)}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not chars or min(chars) < MIN_CHARS:
        raise ValueError(f"chars must be non-empty and at least {MIN_CHARS} each, got {list(chars)}")
    check_chars(task, chars)
    records = []
    for i in range(n):
        size = int(chars[i % len(chars)])
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), i, size])
        record = make_example(task, rng, size)
        record["dataset"] = task
        record["_id"] = f"{task}-{python_tag()}-s{seed}-{i:05d}-c{size}"
        records.append(record)
    return records


def write_tasks(out_dir: str | Path, n: int, chars: Sequence[int] = DEFAULT_CHARS, seed: int = 0,
                tasks: Sequence[str] = TASKS) -> list[Path]:  # fmt: skip
    """Write ``<out_dir>/<task>.jsonl`` for each task; returns the paths."""
    paths = []
    for task in tasks:
        path = Path(out_dir) / f"{task}.jsonl"
        write_jsonl(generate(task, n, chars, seed), path)
        paths.append(path)
    return paths


def previous_line_baseline(records: Sequence[dict]) -> float:
    """Score x 100 of a model-free lcc predictor that repeats the context's last non-empty line:
    the level a model must clear for code completion to show anything."""
    total = 0.0
    for r in records:
        last = next((line for line in reversed(r["context"].split("\n")) if line.strip()), "")
        total += max(metrics.code_sim_score(last, answer) for answer in r["answers"])
    return round(100 * total / len(records), 2)


def main(argv: list[str] | None = None) -> None:
    from cli_io import non_negative_int, positive_int, require_output_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="data/stdlib")
    p.add_argument("--n", type=positive_int, default=20, help="examples per task (context sizes cycle over --chars)")
    # action="extend": a repeated flag adds to the list (nargs="+" alone keeps only the last one)
    p.add_argument("--chars", type=positive_int, nargs="+", action="extend",
                   help=f"context sizes in characters (default: {' '.join(map(str, DEFAULT_CHARS))}; at least "
                        f"{MIN_CHARS}, {min_chars('stdlib_niah_multikey')} for stdlib_niah_multikey)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--tasks", nargs="+", action="extend", choices=TASKS, help="default: all of them")
    args = p.parse_args(argv)
    args.chars = args.chars or list(DEFAULT_CHARS)
    if min(args.chars) < MIN_CHARS:
        p.error(f"argument --chars: must be at least {MIN_CHARS} characters each, got {min(args.chars)}")
    tasks = list(dict.fromkeys(args.tasks or TASKS))
    for task in tasks:
        try:
            check_chars(task, args.chars)
        except ValueError as e:
            p.error(f"argument --chars: {e}")
    require_output_paths(p, "--out_dir", args.out_dir, [f"{task}.jsonl" for task in tasks])
    try:  # every task before writing any: a size no file can serve writes nothing
        records = {task: generate(task, args.n, args.chars, args.seed) for task in tasks}
    except ValueError as e:
        p.error(f"argument --chars: {e}")
    write_task_files(records, args.out_dir)
    if "stdlib_lcc" in records:
        print(f"stdlib_lcc: repeating the previous line scores {previous_line_baseline(records['stdlib_lcc'])}")


if __name__ == "__main__":
    main()
