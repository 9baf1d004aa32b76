"""stdlib_tasks: LongBench-format tasks from the standard library's sources, deterministic by seed."""

import json

import pytest

import stdlib_tasks
from longbench_eval import data, scoring
from real_text import stdlib_files

CHARS = [1000, 2500]
N = 4


def _file_lines(source: str) -> tuple[list[str], int]:
    name, line = source.rsplit(":", 1)
    (path,) = [p for p in stdlib_files() if p.name == name]
    return path.read_text(encoding="utf-8", errors="replace").split("\n"), int(line)


def test_same_seed_same_files_other_seed_other_examples(tmp_path):
    first = stdlib_tasks.write_tasks(tmp_path / "a", N, CHARS, seed=1)
    second = stdlib_tasks.write_tasks(tmp_path / "b", N, CHARS, seed=1)
    assert [p.name for p in first] == [f"{t}.jsonl" for t in stdlib_tasks.TASKS]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    for task in stdlib_tasks.TASKS:
        other = stdlib_tasks.generate(task, N, CHARS, seed=2)
        assert [r["context"] for r in other] != [r["context"] for r in stdlib_tasks.generate(task, N, CHARS, seed=1)]
        # Example i does not depend on how many are written.
        assert stdlib_tasks.generate(task, 2, CHARS, seed=1) == stdlib_tasks.generate(task, N, CHARS, seed=1)[:2]


@pytest.mark.parametrize("task", stdlib_tasks.TASKS)
def test_rows_carry_longbench_fields_and_load_as_longbench_data(tmp_path, task):
    (path,) = stdlib_tasks.write_tasks(tmp_path, N, CHARS, seed=0, tasks=[task])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == N and len({r["_id"] for r in rows}) == N
    for i, r in enumerate(rows):
        assert r["dataset"] == task and isinstance(r["input"], str) and isinstance(r["context"], str)
        assert isinstance(r["answers"], list) and all(isinstance(a, str) and a.strip() for a in r["answers"])
        assert r["length"] == len(r["context"].split()) and r["all_classes"] is None
        assert CHARS[i % 2] - 200 <= len(r["context"]) <= CHARS[i % 2]
    loaded = data.load_examples(task, longbench_e=False, data_dir=str(tmp_path), n_data=None)
    assert [e["_id"] for e in loaded] == [r["_id"] for r in rows]
    # The prompt template and metric tables know the task.
    from longbench_eval import tables

    assert "{context}" in tables.load_tables().dataset2prompt[task]
    assert scoring.score_prediction(task, rows[0]["answers"][0], rows[0]["answers"]) == 1.0


def test_lcc_context_is_the_file_before_the_cut_and_the_answer_its_next_line():
    for r in stdlib_tasks.generate("stdlib_lcc", 6, CHARS, seed=3):
        lines, first = _file_lines(r["source"])
        context_lines = r["context"].split("\n")[:-1]  # the context ends with a newline
        assert r["context"].endswith("\n")
        assert lines[first - 1 : first - 1 + len(context_lines)] == context_lines
        after = lines[first - 1 + len(context_lines) :]
        assert r["answers"] == [next(line.rstrip() for line in after if line.strip())]
        assert not any(marker in r["answers"][0] for marker in ("#", "`", "//"))


def test_needles_sit_in_real_code_and_the_question_asks_for_one_of_them():
    for task, count in (("stdlib_niah", 1), ("stdlib_niah_multikey", stdlib_tasks.MULTIKEY_NEEDLES)):
        for r in stdlib_tasks.generate(task, 4, CHARS, seed=5):
            needles = [line for line in r["context"].split("\n") if "special magic number" in line]
            assert len(needles) == count
            keys = {line.split(" for ")[1].split(" is:")[0]: line.rsplit(" ", 1)[1].rstrip(".") for line in needles}
            assert len(keys) == count and all(len(v) == 7 and v.isdigit() for v in keys.values())
            asked = r["input"].split("magic number for ")[1].split(" mentioned")[0]
            assert r["answers"] == [keys[asked]]
            assert r["input"].endswith(f"The special magic number for {asked} mentioned in the provided text is")
            hay = [line for line in r["context"].split("\n") if "special magic number" not in line]
            lines, first = _file_lines(r["source"])
            assert hay[0] == lines[first - 1]  # the haystack starts at the named line of a real file


def test_previous_line_baseline_scores_the_copy_predictor():
    rows = [{"context": "a = 1\nreturn x\n\n", "answers": ["return x"]}, {"context": "x\n", "answers": ["y"]}]
    assert stdlib_tasks.previous_line_baseline(rows) == 50.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "lcc"}, "unknown standard-library task"),
        ({"n": 0}, "n must be positive"),
        ({"chars": []}, "chars must be non-empty"),
        ({"chars": [50]}, "at least 200"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"task": "stdlib_niah", "n": 2, "chars": CHARS, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        stdlib_tasks.generate(**args)


def test_cli_writes_the_files_and_the_baseline(tmp_path, capsys):
    stdlib_tasks.main(["--out_dir", str(tmp_path), "--n", "2", "--chars", "1000", "--tasks", "stdlib_lcc",
                       "stdlib_niah"])
    out = capsys.readouterr().out
    for task in ("stdlib_lcc", "stdlib_niah"):
        rows = [json.loads(line) for line in (tmp_path / f"{task}.jsonl").read_text().splitlines()]
        assert rows == stdlib_tasks.generate(task, 2, [1000], seed=0)
    baseline = stdlib_tasks.previous_line_baseline(stdlib_tasks.generate("stdlib_lcc", 2, [1000], seed=0))
    assert f"stdlib_lcc: repeating the previous line scores {baseline}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "argument --n: must be a positive integer, got 0"),
        (["--chars", "0"], "argument --chars: must be a positive integer, got 0"),
        (["--chars", "1000", "-5"], "argument --chars: must be a positive integer, got -5"),
        (["--chars", "1000", "50"], "argument --chars: must be at least 200 characters each, got 50"),
        (["--chars", "100000000", "--n", "1"], "argument --chars: no standard-library file is longer than 100000000"),
        (["--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),
    ],
)
def test_cli_bad_arguments_are_usage_errors_and_write_nothing(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stdlib_tasks.main(["--out_dir", str(tmp_path / "out"), "--tasks", "stdlib_lcc", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_checks_out_dir_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stdlib_tasks, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        stdlib_tasks.main(["--out_dir", str(target)])
    assert exit_info.value.code == 2
    assert f"argument --out_dir: {target} exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_needle_tasks_refuse_contexts_their_needles_would_fill(tmp_path, capsys):
    # four needle lines take up to 241 characters: at --chars 200 the context was the needles alone,
    # longer than asked, with no haystack
    with pytest.raises(SystemExit) as exit_info:  # before generating or writing anything
        stdlib_tasks.main(["--out_dir", str(tmp_path / "out"), "--n", "1", "--chars", "200",
                           "--tasks", "stdlib_lcc", "stdlib_niah_multikey"])
    assert exit_info.value.code == 2
    needles = stdlib_tasks.needle_chars(stdlib_tasks.MULTIKEY_NEEDLES)
    least = stdlib_tasks.min_chars("stdlib_niah_multikey")
    assert f"argument --chars: length 200 is too short for task 'stdlib_niah_multikey' (needs at least {least} " \
           f"characters: its 4 needle lines take up to {needles}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert needles == 4 * 53 + len("umbrella") + 3 * 7 and least == 2 * needles
    assert stdlib_tasks.min_chars("stdlib_niah") == stdlib_tasks.min_chars("stdlib_lcc") == stdlib_tasks.MIN_CHARS
    with pytest.raises(ValueError, match=r"length 200 is too short for task 'stdlib_niah_multikey'"):
        stdlib_tasks.generate("stdlib_niah_multikey", 1, [1000, 200])
    for r in stdlib_tasks.generate("stdlib_niah_multikey", 8, [least], seed=0):  # the least: code around the needles
        assert least - 200 <= len(r["context"]) <= least
        assert [line for line in r["context"].split("\n") if "special magic number" not in line]


def test_cli_repeated_list_flags_add_up(tmp_path):
    # nargs="+" alone keeps only the last --tasks / --chars given
    stdlib_tasks.main(["--out_dir", str(tmp_path), "--n", "2", "--chars", "1000", "--chars", "1500",
                       "--tasks", "stdlib_niah", "--tasks", "stdlib_niah_multikey", "stdlib_niah"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib_niah.jsonl", "stdlib_niah_multikey.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "stdlib_niah.jsonl").read_text().splitlines()]
    assert rows == stdlib_tasks.generate("stdlib_niah", 2, [1000, 1500], seed=0)
