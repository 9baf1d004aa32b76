"""benchmarks/differences.py: bad arguments and output paths are usage errors before the model
loads (a --json naming a directory was an IsADirectoryError after the whole measurement), and the
measurements reach the JSON (here on random stand-ins for the captured tensors)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LAYERS, Q_HEADS, KV_HEADS, DIM = 2, 6, 2, 64


def _load():
    spec = importlib.util.spec_from_file_location("differences", ROOT / "benchmarks" / "differences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def differences():
    return _load()


@pytest.fixture(autouse=True)
def _grad_mode():
    """main() turns autograd off for the process (it is a script): give later tests theirs back."""
    with torch.enable_grad():
        yield


def _fake_capture(tokens: int):
    gen = torch.Generator().manual_seed(0)
    records = {
        i: (torch.randn(1, Q_HEADS, tokens, DIM, generator=gen), torch.randn(1, KV_HEADS, tokens, DIM, generator=gen),
            torch.randn(1, KV_HEADS, tokens, DIM, generator=gen))
        for i in range(LAYERS)
    }
    info = {"model": "random", "tokens": tokens, "layers": LAYERS, "kv_heads": KV_HEADS, "q_heads": Q_HEADS,
            "head_dim": DIM}
    return records, info


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--json", "DIR"], "argument --json: DIR is a directory"),
        (["--json", "FILE/out.json"], "argument --json: FILE exists and is not a directory"),
        (["--tokens", "0"], "argument --tokens"),
        (["--tokens", "-32"], "argument --tokens"),
        (["--tokens", "100"], "--tokens must be a multiple of 32"),
        (["--softmax-rows", "0"], "argument --softmax-rows"),
        (["--tokens", "64", "--softmax-rows", "65"], "--softmax-rows in 1..tokens"),
        (["--generated", "-1"], "argument --generated"),
    ],
)
def test_bad_arguments_are_usage_errors_before_the_model_loads(differences, tmp_path, monkeypatch, capsys,
                                                               argv, message):
    monkeypatch.setattr(differences, "capture", lambda tokens: pytest.fail("model loaded"))
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    argv = [str(tmp_path / a) if a.startswith(("DIR", "FILE")) else a for a in argv]
    with pytest.raises(SystemExit) as e:
        differences.main(argv)
    assert e.value.code == 2
    message = message.replace("DIR", str(tmp_path / "DIR")).replace("FILE", str(tmp_path / "FILE"))
    assert message in capsys.readouterr().err


def test_measurements_reach_the_json(differences, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(differences, "capture", _fake_capture)
    out = tmp_path / "sub" / "differences.json"
    differences.main(["--tokens", "64", "--softmax-rows", "16", "--generated", "8", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res) >= {"setup", "norms", "sketch", "values", "ranking", "softmax", "value_window", "wall_s"}
    assert res["setup"]["tokens"] == 64 and res["value_window"]["generated_tokens"] == 8
    assert not list(out.parent.glob("*.tmp"))
    assert f"wrote {out}" in capsys.readouterr().out
