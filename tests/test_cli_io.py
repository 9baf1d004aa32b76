"""cli_io: the command-line scripts' output-path check and atomic JSON writes."""

import json
from pathlib import Path

import pytest

import cli_io


def test_check_output_paths_accepts_what_can_be_written(tmp_path):
    cli_io.check_output_paths(tmp_path)  # an existing directory
    cli_io.check_output_paths(tmp_path / "a" / "b", ["x.json"])  # to be created
    (tmp_path / "x.json").write_text("{}")
    cli_io.check_output_paths(tmp_path, ["x.json", "y.png"])  # an existing file is overwritten
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_write_json_atomic_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    path = cli_io.write_json_atomic(tmp_path / "sub" / "r.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    real_write_text = Path.write_text

    def crash_half_way(self, text, *args, **kwargs):  # a kill in the middle of writing the file
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise InterruptedError

    monkeypatch.setattr(Path, "write_text", crash_half_way)
    with pytest.raises(InterruptedError):
        cli_io.write_json_atomic(path, {"a": [3, 4, 5, 6, 7, 8]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file, whole


def test_seed_int_takes_what_torch_seeds_with(capsys):
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=cli_io.seed_int)
    for seed in (0, -1, -(2**63), 2**63 - 1):
        assert parser.parse_args(["--seed", str(seed)]).seed == seed
        torch.Generator().manual_seed(seed)  # what the scripts do with it
    for text in ("99999999999999999999", str(2**63), str(-(2**63) - 1), "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seed", text])
        shown = repr(text) if text == "x" else text
        assert f"argument --seed: must be an integer in [-2**63, 2**63), got {shown}" in capsys.readouterr().err


def test_check_output_paths_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        cli_io.check_output_paths(tmp_path / "file")
    with pytest.raises(ValueError, match="is not a directory"):
        cli_io.check_output_paths(tmp_path / "file" / "below")
    (tmp_path / "d" / "r.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="r.json is a directory"):
        cli_io.check_output_paths(tmp_path / "d", ["r.json"])


def test_interruptible_turns_ctrl_c_into_a_message_and_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert cli_io.interruptible(interrupted, "the rows so far are saved") == 130
    assert "interrupted: the rows so far are saved" in capsys.readouterr().err
    assert cli_io.interruptible(lambda: {"a": 1}, "unused") == 0


@pytest.mark.parametrize("script", ["perplexity.py", "plot_runtime.py", "plot_memory_peak.py", "plot_distortion.py"])
def test_scripts_end_with_a_message_on_ctrl_c(script):
    """A SIGINT while the script runs gives the message and exit status 130, not a traceback."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # The script's main replaced by a wait that says when it started, then interrupted: the __main__
    # block's handling is what is tested.
    code = ("import runpy, sys, time; sys.argv = [%r]; import cli_io; real = cli_io.interruptible\n"
            "def waiting():\n    print('ready', flush=True)\n    time.sleep(120)\n"
            "cli_io.interruptible = lambda main, kept: real(waiting, kept)\n"
            "runpy.run_path(%r, run_name='__main__')\n") % (script, script)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: " in err and "Traceback" not in err
