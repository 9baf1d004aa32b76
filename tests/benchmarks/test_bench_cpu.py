"""benchmarks/bench_cpu.py runs (op level, tiny sizes): a smoke test, so a change to the cache's API
cannot leave the benchmark broken unnoticed."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_level_runs_and_reports_every_shape(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _load().main(["--skip-model", "--op-tokens", "300", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["op"]
    assert rows and all(r["tokens"] == 300 for r in rows)
    assert "ratio" in capsys.readouterr().out
