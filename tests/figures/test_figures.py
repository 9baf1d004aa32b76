"""The figure scripts' CPU defaults, and the timer discipline they rely on."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import plot_distortion
import plot_memory_peak
import plot_runtime
from figures import DeviceTimer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outputs(tmp_path, stem):
    json_path, png_path = tmp_path / f"{stem}.json", tmp_path / f"{stem}.png"
    assert png_path.read_bytes()[:8] == PNG_MAGIC and png_path.stat().st_size > 10_000
    return json.loads(json_path.read_text())


def test_timer_synchronizes_before_every_clock_reading():
    calls = []
    ticks = iter([10.0, 12.5])

    def clock():
        calls.append("clock")
        return next(ticks)

    with DeviceTimer("cpu", synchronize=lambda: calls.append("sync"), clock=clock) as timer:
        calls.append("work")
    assert calls == ["sync", "clock", "work", "sync", "clock"]
    assert timer.seconds == 2.5


def test_measure_times_prefill_and_decode_separately():
    seen = []

    class RecordingTimer(DeviceTimer):
        def __enter__(self):
            seen.append("enter")
            return super().__enter__()

    model = plot_runtime.build_model("tiny", 1, torch.device("cpu"), torch.float32)
    config = plot_runtime.models.QJLConfig.from_json(plot_runtime.DEFAULT_QJL_CONFIG)
    m = plot_runtime.measure(model, "qjl", config, 256, 3, timer_factory=RecordingTimer)
    assert seen == ["enter", "enter"]
    assert m.encode_s > 0 and m.decode_s > 0 and m.cache_bytes > 0 and m.peak_bytes is None


def test_runtime_default_writes_png_and_json(tmp_path):
    data = plot_runtime.main(["--device", "cpu", "--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "runtime_tiny")
    assert data["lengths"] == [256, 512, 1024, 2048]
    for method in ("exact", "qjl", "kivi"):
        r = data["results"][method]
        assert all(t > 0 for t in r["encode_s"] + r["decode_s"])
        # total is the median over runs of encode + decode; since every run's sum exceeds both of its
        # parts, it is at least each part's median (order statistics are monotone). A closeness check
        # against the sum of the medians fails on a loaded machine, where runs vary a lot.
        for total, encode, decode in zip(r["total_s"], r["encode_s"], r["decode_s"]):
            assert total >= max(encode, decode)


def test_memory_default_shows_the_compressed_caches_smaller(tmp_path):
    data = plot_memory_peak.main(["--device", "cpu", "--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "memory_tiny")
    exact, qjl = data["results"]["exact"]["cache_bytes"], data["results"]["qjl"]["cache_bytes"]
    assert exact == sorted(exact) and qjl[-1] * 4 < exact[-1]


def test_distortion_falls_with_sketch_size(tmp_path):
    data = plot_distortion.main(["--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "distortion_synthetic")
    plain = data["results"]["no outliers"]
    assert all(a > b for a, b in zip(plain, plain[1:]))
    with_outliers = data["results"]["8 outliers"]
    assert with_outliers[-1] < with_outliers[0] and all(o < p for o, p in zip(with_outliers, plain))


def test_distortion_from_a_model_run(tmp_path):
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    data = plot_distortion.main(["--model", str(tmp_path / "model"), "--tokens", "128", "--queries", "16",
                                 "--output_dir", str(tmp_path)])
    assert data["layers"] == [0, 1] and data["head_dim"] == 64
    plain = data["results"]["no outliers"]
    assert plain[-1] < plain[0]


@pytest.mark.parametrize(
    "main,argv,flag",
    [
        (plot_runtime.parse_args, ["--repeats", "0"], "--repeats"),
        (plot_runtime.parse_args, ["--new_tokens", "0"], "--new_tokens"),
        (plot_runtime.parse_args, ["--min_len", "0"], "--min_len"),
        (plot_runtime.parse_args, ["--max_len", "-4"], "--max_len"),
        (plot_runtime.parse_args, ["--num_layers", "0"], "--num_layers"),
        (plot_memory_peak.main, ["--new_tokens", "0"], "--new_tokens"),
        (plot_distortion.main, ["--tokens", "0"], "--tokens"),
        (plot_distortion.main, ["--queries", "0"], "--queries"),
        (plot_distortion.main, ["--group_size", "0"], "--group_size"),
        (plot_distortion.main, ["--outlier_count", "-1"], "--outlier_count"),
        (plot_distortion.main, ["--layers", "-1"], "--layers"),
    ],
)
def test_out_of_range_knobs_are_usage_errors(main, argv, flag, capsys):
    # `--repeats 0` used to become 3 and `--new_tokens 0` the preset's 8, silently
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", *argv] if main is not plot_distortion.main else argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a" in capsys.readouterr().err


def test_given_knobs_are_kept_and_missing_ones_defaulted():
    args = plot_runtime.parse_args(["--device", "cpu", "--repeats", "1", "--new_tokens", "2", "--min_len", "16",
                                    "--max_len", "32"])
    assert (args.repeats, args.new_tokens, args.min_len, args.max_len) == (1, 2, 16, 32)
    args = plot_runtime.parse_args(["--device", "cpu"])
    assert (args.preset, args.repeats, args.min_len, args.max_len) == ("tiny", 3, 256, 2048)
    tiny = plot_runtime.PRESETS["tiny"]
    assert (args.new_tokens, args.dtype) == (tiny["new_tokens"], tiny["dtype"])
