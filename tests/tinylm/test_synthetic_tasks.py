"""The synthetic task generator: determinism, LongBench format, lengths with the shipped tokenizer."""

import json

import pytest

import synthetic_tasks
from longbench_eval import data
from tinylm.tokenizer import build_tokenizer

LENGTHS = [512, 1024, 2048]
N = 6  # two examples per length
SEEDS = [0, 3]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("seed", SEEDS)
def test_same_seed_writes_identical_files(tmp_path, seed):
    first = synthetic_tasks.write_tasks(tmp_path / "a", N, LENGTHS, seed)
    second = synthetic_tasks.write_tasks(tmp_path / "b", N, LENGTHS, seed)
    assert [p.name for p in first] == [f"{t}.jsonl" for t in synthetic_tasks.TASKS]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


def test_other_seed_other_examples_and_prefix_stability():
    a = synthetic_tasks.generate("passkey", N, LENGTHS, seed=0)
    b = synthetic_tasks.generate("passkey", N, LENGTHS, seed=1)
    assert [r["answers"] for r in a] != [r["answers"] for r in b]
    # example i does not depend on how many examples are asked for
    assert synthetic_tasks.generate("passkey", 2, LENGTHS, seed=0) == a[:2]


@pytest.mark.parametrize("task", synthetic_tasks.TASKS)
def test_records_have_longbench_fields(task):
    for i, r in enumerate(synthetic_tasks.generate(task, N, LENGTHS, seed=0)):
        assert set(r) == {"input", "context", "answers", "length", "all_classes", "dataset", "_id"}
        assert isinstance(r["input"], str) and r["input"].startswith("What is the ")
        assert isinstance(r["context"], str)
        assert isinstance(r["answers"], list) and len(r["answers"]) == 1
        answer = r["answers"][0]
        assert answer in synthetic_tasks.NUMBERS
        assert f" is {answer}." in r["context"]
        label = r["input"][len("What is the "): r["input"].index("?")]
        assert f"The {label} is {answer}." in r["context"]  # the asked label holds the answer
        assert r["length"] == len(r["context"].split())
        assert r["all_classes"] is None and r["dataset"] == task
        assert r["_id"].endswith(f"L{LENGTHS[i % len(LENGTHS)]}")
    ids = [r["_id"] for r in synthetic_tasks.generate(task, N, LENGTHS, seed=0)]
    assert len(set(ids)) == len(ids)


def test_multikey_holds_several_labelled_numbers():
    for r in synthetic_tasks.generate("multikey", N, LENGTHS, seed=0):
        numbers = [w.rstrip(".") for w in r["context"].split() if w[0].isdigit()]
        assert len(numbers) == 2 * synthetic_tasks.MULTIKEY_COUNT  # each needle states its number twice
        assert len(set(numbers)) == synthetic_tasks.MULTIKEY_COUNT  # distinct numbers


@pytest.mark.parametrize("task", synthetic_tasks.TASKS)
def test_prompt_lengths_in_requested_range(task, tokenizer):
    template = synthetic_tasks.load_table("dataset2prompt")[task]
    for i, r in enumerate(synthetic_tasks.generate(task, N, LENGTHS, seed=0)):
        prompt = template.format(**r)
        ids = tokenizer(prompt).input_ids
        assert len(ids) == synthetic_tasks.count_tokens(prompt)
        assert tokenizer.unk_token_id not in ids
        target = LENGTHS[i % len(LENGTHS)]
        assert target - 12 <= len(ids) <= target


def test_too_short_length_is_rejected():
    with pytest.raises(ValueError, match="too short"):
        synthetic_tasks.generate("multikey", 1, [40])
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic_tasks.generate("nope", 1)


def test_tables_cover_every_task():
    prompts = synthetic_tasks.load_table("dataset2prompt")
    maxlen = synthetic_tasks.load_table("dataset2maxlen")
    metric = synthetic_tasks.load_table("dataset2metric")
    for task in synthetic_tasks.TASKS:
        assert "{context}" in prompts[task] and "{input}" in prompts[task]
        assert maxlen[task] >= 4  # word marker + number + period + EOS
        assert metric[task] == "qa_f1_score"


def test_loads_through_the_longbench_loader_and_scores(tmp_path):
    synthetic_tasks.write_tasks(tmp_path, N, LENGTHS, seed=0)
    metrics = pytest.importorskip("metrics")
    for task in synthetic_tasks.TASKS:
        examples = data.load_examples(task, data_dir=tmp_path)
        assert len(examples) == N and examples[0]["index"] == 0
        metric = getattr(metrics, synthetic_tasks.load_table("dataset2metric")[task])
        answer = examples[0]["answers"][0]
        assert metric(f"{answer}.", answer) == 1.0
        assert metric("135", "246") == 0.0


def test_cli_writes_files(tmp_path):
    synthetic_tasks.main(["--out_dir", str(tmp_path), "--n", "3", "--lengths", "512", "--seed", "0"])
    for task in synthetic_tasks.TASKS:
        lines = (tmp_path / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and json.loads(lines[0])["dataset"] == task


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "argument --n: must be a positive integer, got 0"),
        (["--lengths", "0"], "argument --lengths: must be a positive integer, got 0"),
        (["--lengths", "512", "-5"], "argument --lengths: must be a positive integer, got -5"),
        (["--lengths", "40"], "argument --lengths: length 40 is too short for task 'passkey'"),
        (["--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),
    ],
)
def test_cli_bad_arguments_are_usage_errors_and_write_nothing(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synthetic_tasks.main(["--out_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_checks_out_dir_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthetic_tasks, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    target = tmp_path / "file"
    target.write_text("mine")
    for out_dir, message in ((target, f"{target} exists and is not a directory"),
                             (target / "sub", f"cannot create {target / 'sub'}: {target} is not a directory")):
        with pytest.raises(SystemExit) as exit_info:
            synthetic_tasks.main(["--out_dir", str(out_dir)])
        assert exit_info.value.code == 2
        assert f"argument --out_dir: {message}" in capsys.readouterr().err
    (tmp_path / "out" / "passkey.jsonl").mkdir(parents=True)  # a task's file is a directory
    with pytest.raises(SystemExit):
        synthetic_tasks.main(["--out_dir", str(tmp_path / "out")])
    assert f"argument --out_dir: {tmp_path / 'out' / 'passkey.jsonl'} is a directory" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_cli_repeated_list_flags_add_up(tmp_path):
    # nargs="+" alone kept only the last flag: --tasks passkey --tasks kv_retrieval wrote kv_retrieval only
    tasks = list(synthetic_tasks.TASKS)[:2]
    synthetic_tasks.main(["--out_dir", str(tmp_path), "--n", "2", "--lengths", "512", "--lengths", "640",
                          "--tasks", tasks[0], "--tasks", tasks[1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{task}.jsonl" for task in tasks)
    lengths = [json.loads(line)["length"] for line in (tmp_path / f"{tasks[0]}.jsonl").read_text().splitlines()]
    assert len(set(lengths)) == 2  # one example per given length
