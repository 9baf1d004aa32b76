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


def test_check_output_paths_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        cli_io.check_output_paths(tmp_path / "file")
    with pytest.raises(ValueError, match="is not a directory"):
        cli_io.check_output_paths(tmp_path / "file" / "below")
    (tmp_path / "d" / "r.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="r.json is a directory"):
        cli_io.check_output_paths(tmp_path / "d", ["r.json"])
