"""benchmarks/bench_cpu.py runs (op level, tiny sizes): a smoke test, so a change to the cache's API
cannot leave the benchmark broken unnoticed."""

import importlib.util
import json
from pathlib import Path

import pytest

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
    errors = {line.split()[0]: float(line.split("error ")[1].split()[0]) for line in out.splitlines()
              if "key-sum error" in line}
    if "vnni-22" in errors:  # the CPU has VNNI: 22 bits keep float32's precision, 15 bits do not
        assert errors["vnni-22"] < 1e-5 < errors["vnni-15"]
        assert errors["(float32"] < 1e-5


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--op-tokens", "0"], "argument --op-tokens: must be comma-separated positive integers, got '0'"),
        (["--op-tokens=-5"], "argument --op-tokens: must be comma-separated positive integers, got '-5'"),
        (["--op-tokens", "abc"], "argument --op-tokens: must be comma-separated positive integers, got 'abc'"),
        (["--op-tokens", "4096,,8192"], "argument --op-tokens: must be comma-separated positive integers"),
        (["--model-tokens", "1024,0"],
         "argument --model-tokens: must be comma-separated positive integers, got '1024,0'"),
        (["--model-tokens=-5"], "argument --model-tokens: must be comma-separated positive integers, got '-5'"),
        (["--model-tokens", "abc"], "argument --model-tokens: must be comma-separated positive integers, got 'abc'"),
        (["--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
        (["--model-repeats", "0"], "argument --model-repeats: must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_work(argv, message, capsys, monkeypatch):
    bench = _load()
    monkeypatch.setattr(bench, "bench_ops", lambda *a: pytest.fail("the op benchmark ran"))
    monkeypatch.setattr(bench, "bench_model", lambda *a: pytest.fail("the model benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_json_path_is_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    bench = _load()
    monkeypatch.setattr(bench, "bench_ops", lambda *a: pytest.fail("the op benchmark ran"))
    target = tmp_path / "file"
    target.write_text("mine")
    for path, problem in ((tmp_path, f"{tmp_path} is a directory"),
                          (target / "bench.json", f"{target} exists and is not a directory")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--skip-model", "--json", str(path)])
        assert exit_info.value.code == 2
        assert f"argument --json: {problem}" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_model_decode_steps_alternate_between_methods():
    # Each method decoded its 8 steps in one go, so the load's drift over those seconds went into the
    # decode ratio (0.85-1.03x at 4k from run to run); the steps now alternate, paired per round.
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import models
    from tiny import tiny_model, tokens

    bench = _load()
    model = tiny_model()
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((type(cache).__name__, kwargs["input_ids"].shape[1]))

    model.register_forward_pre_hook(record, with_kwargs=True)
    config = models.QJLConfig(buffer_size=32, group_size=16)
    prefill, decode = bench.time_model(model, tokens(1, 80), config, repeats=2, decode_steps=3)
    assert all(len(prefill[m]) == 2 and len(decode[m]) == 6 for m in bench.METHODS)
    steps = [name for name, length in calls if length == 1]
    assert steps == ["DynamicCache", "QJLCache", "KIVICache"] * 6
    assert torch.is_grad_enabled()  # time_model's no_grad does not leak
