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


def test_ratio_pairs_the_calls_of_each_round():
    # Round 2 ran under load (both calls slow): paired, its ratio is 1 like the others'; the ratio of
    # the medians (2 / 1.5) would not be.
    times = {"exact": [1.0, 10.0, 2.0], "qjl": [1.0, 10.0, 2.0]}
    bench = _load()
    assert bench.paired_ratio(times, "qjl", "exact") == 1.0
    assert bench.paired_ratio({"exact": [1.0, 2.0, 4.0], "qjl": [3.0, 1.0, 2.0]}, "qjl", "exact") == 0.5


def test_cpu_peak_reports_a_bound_for_every_shape(capsys):
    spec = importlib.util.spec_from_file_location("cpu_peak", ROOT / "benchmarks" / "cpu_peak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tokens", "32768", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    if "nothing measured" in out:  # no compiler or no AVX-512 here: said so, measured nothing
        return
    bounds = [float(line.split()[-2]) for line in out.splitlines() if line.rstrip().endswith(" ms")]
    assert len(bounds) == 4 and all(b > 0 for b in bounds)
    # initial layers score 640 bits per key, general ones 512: the bound scales with them
    assert abs(bounds[1] / bounds[0] - 640 / 512) < 1e-2


def test_prefill_timing_includes_the_prompts_compression():
    # A compressed cache commits the prompt's complete blocks at the start of the next step; the
    # benchmark's prefill must do that work inside its timing, not leave it to the first decode step.
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import models
    from tiny import tiny_model, tokens

    bench = _load()
    model = tiny_model()
    for cache in (models.QJLCache(model.config, models.QJLConfig(buffer_size=32)),
                  models.KIVICache(model.config, 2, 32, 32)):
        with torch.no_grad():
            model(input_ids=tokens(1, 100), use_cache=True, **models.cache_kwargs(model, cache))
        layer = cache.layers[0]
        assert layer.key_store.num_committed == 0 and layer.value_store.num_quantized == 0  # deferred
        bench.compress_prompt(cache)
        assert layer.key_store.num_committed == 96 and layer.value_store.num_quantized == 100 - 32
    bench.compress_prompt(models.make_cache("exact", model.config, None))  # exact layers: nothing to do
