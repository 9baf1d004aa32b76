"""tinylm's command lines: tinylm.train and tinylm.evaluate refuse bad arguments with a usage error
(exit 2, naming the argument) before a model is built or loaded and before anything is written;
train never replaces a run it was not told to resume."""

import json

import pytest
import torch

import tinylm.evaluate as E
import tinylm.train as T

# A model that trains and evaluates in seconds on one thread (the eval set still spans 512-2048 tokens).
TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "64", "--heads", "2", "--kv_heads", "1",
        "--tokens_per_step", "256", "--eval_n", "1", "--threads", "1"]  # fmt: skip

TRAIN_ERRORS = [
    (["--eval_every", "0"], "argument --eval_every"),  # was a ZeroDivisionError after the first step
    (["--steps", "0"], "argument --steps"),
    (["--warmup", "0"], "argument --warmup"),  # lr_at divides by it
    (["--layers", "0"], "argument --layers"),
    (["--tokens_per_step", "-5"], "argument --tokens_per_step"),
    (["--eval_n", "0"], "argument --eval_n"),
    (["--threads", "0"], "argument --threads"),
    (["--exact_window", "-1"], "argument --exact_window"),
    (["--seed", "-1"], "argument --seed"),  # numpy's default_rng refuses negative seeds
    (["--lr", "0"], "argument --lr"),
    (["--lr", "nan"], "argument --lr"),
    (["--weight_decay", "-0.1"], "argument --weight_decay"),
    (["--p_multikey", "1.5"], "argument --p_multikey"),
    (["--key_noise", "-1"], "argument --key_noise"),
    (["--noise_start", "2"], "argument --noise_start"),
    (["--eval_noise", "inf"], "argument --eval_noise"),
    (["--max_minutes", "0"], "argument --max_minutes"),
    (["--stop_step", "0"], "argument --stop_step"),
    (["--heads", "4", "--kv_heads", "3"], "argument --kv_heads"),
    # --stages: an unpack / ValueError traceback after the model and eval set were built
    (["--stages", "1:96"], "argument --stages"),
    (["--stages", "0.5:96:192"], "argument --stages: fractions must sum to 1"),
    (["--stages", "0.5:96:x,0.5:96:192"], "argument --stages"),
    (["--stages", "0.5:192:96,0.5:96:192"], "argument --stages"),  # min > max
    (["--stages", "0:96:192,1:96:192"], "argument --stages"),  # an empty stage
    (["--stages", "1:8:96"], "argument --stages: length 8 is too short"),  # make_example failed mid-training
    (["--resume"], "argument --resume"),  # no checkpoint to resume from
    (["--export_only", "--export", "EXPORT"], "argument --export_only"),  # no checkpoint to export
    (["--export_only"], "--export_only needs --export"),
]


def _no_work(monkeypatch):
    """Make building a model (or loading a checkpoint) fail the test: errors must come before it."""
    def built(*args, **kwargs):
        pytest.fail("model built")

    monkeypatch.setattr(T, "LlamaForCausalLM", built)
    monkeypatch.setattr(T.torch, "load", built)


@pytest.mark.parametrize("argv, message", TRAIN_ERRORS)
def test_train_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    _no_work(monkeypatch)
    run_dir = tmp_path / "run"
    argv = [a.replace("EXPORT", str(tmp_path / "model")) for a in argv]
    with pytest.raises(SystemExit) as e:
        T.main(["--run_dir", str(run_dir), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()  # nothing written, not even args.json


@pytest.mark.parametrize("existing", ["checkpoint.pt", "history.json"])
def test_train_refuses_to_replace_a_run_without_resume(tmp_path, monkeypatch, capsys, existing):
    _no_work(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / existing).write_text("the previous run")
    with pytest.raises(SystemExit) as e:
        T.main(["--run_dir", str(run_dir), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --run_dir: {run_dir} already holds a run" in err
    assert "--resume" in err and "another --run_dir" in err
    assert [p.name for p in run_dir.iterdir()] == [existing]  # no args.json either
    assert (run_dir / existing).read_text() == "the previous run"


def test_train_refuses_an_unwritable_export_before_training(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        T.main(["--run_dir", str(tmp_path / "run"), "--export", str(tmp_path / "file" / "model"), *TINY])
    assert e.value.code == 2
    assert "argument --export" in capsys.readouterr().err


def test_parse_stages_is_cumulative_and_ends_at_one():
    assert T.parse_stages("0.3:96:192,0.7:160:640") == [(0.3, 96, 192), (1.0, 160, 640)]
    stages = T.parse_stages("0.1:96:96," * 9 + "0.1:96:96")  # float sum 0.9999999999999999
    assert stages[-1][0] == 1.0


def test_train_runs_resumes_and_keeps_a_run_it_was_not_told_to_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["--run_dir", str(run_dir), *TINY, "--eval_every", "1", "--warmup", "1"]
    T.main([*base, "--steps", "2"])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    with pytest.raises(SystemExit) as e:  # the same command again: refused, the run kept
        T.main([*base, "--steps", "1"])
    assert e.value.code == 2
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    assert json.loads((run_dir / "history.json").read_text()) == history
    capsys.readouterr()
    T.main([*base, "--steps", "3", "--resume"])  # --resume continues it
    assert "resumed at step 2" in capsys.readouterr().out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
    assert [row["step"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3]


EVALUATE_ERRORS = [
    (["--n", "0"], "argument --n"),
    (["--n", "-1"], "argument --n"),
    (["--lengths", "0"], "argument --lengths"),
    (["--lengths", "5"], "argument --lengths: length 5 is too short"),
    (["--sketch_bits", "7"], "argument --sketch_bits"),
    (["--sketch_bits", "0"], "argument --sketch_bits"),
    (["--sketch_bits", "64"], "argument --sketch_bits"),  # below the paper's outlier sketch m_o = 256
    (["--threads", "0"], "argument --threads"),
    (["--seed", "-1"], "argument --seed"),  # numpy's default_rng refuses negative seeds
    (["--methods", "exact", "bogus"], "argument --methods: unknown methods ['bogus']"),
    (["--methods", "qjl-m512"], "argument --methods: unknown methods ['qjl-m512']"),  # needs --sketch_bits 512
]


@pytest.mark.parametrize("argv, message", EVALUATE_ERRORS)
def test_evaluate_refuses_bad_arguments_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(E, "load", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        E.main(["--n", "1", "--lengths", "256", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluate_runs_the_shipped_model(capsys):
    if not (E.MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"no shipped model in {E.MODEL_DIR}")
    E.main(["--n", "1", "--lengths", "128", "--tasks", "passkey", "--methods", "exact", "--sketch_bits", "256"])
    out = capsys.readouterr().out
    assert "passkey@128 exact:" in out and "passkey@128 qjl-m256:" in out
    assert "| passkey | 128 |" in out
