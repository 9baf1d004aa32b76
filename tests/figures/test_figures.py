"""The figure scripts' CPU defaults, and the timer discipline they rely on."""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import models
import plot_distortion
import plot_memory_peak
import plot_runtime
from figures import DeviceTimer
from models.distortion import (ORIGINAL_LAYERS, last_query_distortion, last_query_scores, map_layers,
                               relative_l2_error)

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
    # the figure shows what each cache allocated (as a GPU's peak memory would): its data and more
    allocated = data["results"]["qjl"]["allocated_bytes"]
    assert data["measure"] == "bytes allocated by the cache"
    assert all(a > b for a, b in zip(allocated, qjl)) and data["results"]["exact"]["allocated_bytes"] == exact


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
    assert (args.variant, args.num_layers, args.qjl_config) == ("original", 1, str(plot_runtime.ORIGINAL_QJL_CONFIG))
    tiny = plot_runtime.PRESETS["tiny"]
    assert (args.new_tokens, args.dtype) == (tiny["new_tokens"], tiny["dtype"])


# --- the original code's settings, offered as variants -------------------------------------------------------


@pytest.fixture
def pretend_gpu(monkeypatch):
    """parse_args refuses --device cuda without a GPU; past that check it only reads the device's type."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_runtime_defaults_to_the_originals_single_layer_at_m_160(device, pretend_gpu):
    args = plot_runtime.parse_args(["--device", device])
    assert (args.variant, args.num_layers) == ("original", 1)
    config = models.QJLConfig.from_json(args.qjl_config)
    # the original sets 15 initial layers at 160 bits, so its only layer (index 0) gets m = 160
    assert (config.initial_layers_count, config.key_quantization_bits_initial_layers) == (15, 160)
    assert config.layer_budget(0) == models.LayerBudget(160, 0, 0)
    assert (config.value_quantization_bits, config.group_size, config.buffer_size) == (2, 32, 128)
    if device == "cuda":  # the rest of the original's runtime settings
        assert (args.preset, args.dtype, args.new_tokens, args.repeats) == ("llama3-8b", "bfloat16", 64, 10)
        assert plot_runtime.lengths_between(args.min_len, args.max_len) == [2**i for i in range(9, 17)]


def test_runtime_ours_variant_and_explicit_flags_win():
    args = plot_runtime.parse_args(["--device", "cpu", "--variant", "ours"])
    assert models.QJLConfig.from_json(args.qjl_config).layer_budget(0) == models.LayerBudget(256, 0, 0)
    paper = str(plot_runtime.ROOT / "config" / "qjl_paper_llama2.json")
    args = plot_runtime.parse_args(["--device", "cpu", "--qjl_config", paper, "--num_layers", "2"])
    assert (args.variant, args.qjl_config, args.num_layers) == ("original", paper, 2)


def test_m_160_runs_through_the_cache():
    model = plot_runtime.build_model("tiny", 1, torch.device("cpu"), torch.float32)
    config = models.QJLConfig.from_json(plot_runtime.ORIGINAL_QJL_CONFIG)
    cache = models.make_cache("qjl", model.config, config)
    assert cache.layers[0].key_store.sketch.sketch_dim == 160
    m = plot_runtime.measure(model, "qjl", config, 256, 1)
    assert m.cache_bytes > 0


def test_memory_original_variant_is_the_full_depth_budget(pretend_gpu):
    gpu = plot_memory_peak.parse_args(["--device", "cuda"])
    cpu = plot_memory_peak.parse_args(["--device", "cpu"])
    assert (gpu.variant, gpu.num_layers, cpu.variant, cpu.num_layers) == ("original", 32, "ours", 1)
    args = plot_memory_peak.parse_args(["--device", "cpu", "--variant", "original"])
    assert args.num_layers == plot_memory_peak.FULL_DEPTH == 32
    config = models.QJLConfig.from_json(args.qjl_config)
    model = plot_runtime.build_model("tiny", args.num_layers, torch.device("cpu"), torch.float32)
    cache = models.make_cache("qjl", model.config, config)
    dims = [layer.key_store.sketch.sketch_dim for layer in cache.layers]
    assert dims == [512] * 15 + [256] * 17
    assert all(layer.key_store.budget.outlier_count == 0 for layer in cache.layers)
    # one committed block (a 32-token buffer, to keep the run short) per layer: the 15 initial layers
    # hold 512 sign bits per key, the others 256
    short = dataclasses.replace(config, buffer_size=32)
    full = plot_runtime.measure(model, "qjl", short, 32, 1).cache_bytes
    flat = plot_runtime.measure(model, "qjl", dataclasses.replace(short, initial_layers_count=0), 32, 1).cache_bytes
    assert full - flat == 15 * 32 * (512 - 256) // 8  # 15 layers x 1 KV head x 32 keys x 32 more bytes
    ours = models.QJLConfig.from_json(cpu.qjl_config)
    assert ours.layer_budget(0) == models.LayerBudget(256, 0, 0)


def test_original_layers_are_mapped_by_relative_depth():
    assert map_layers(ORIGINAL_LAYERS, 32) == [0, 1, 2, 4, 8, 16, 31]
    assert map_layers(ORIGINAL_LAYERS, 30) == [0, 1, 2, 4, 7, 15, 29]  # round(l * 29 / 31)
    assert map_layers(ORIGINAL_LAYERS, 2) == [0, 1]  # repeats dropped
    assert plot_distortion.layer_label(7, 30) == "layer 7 (orig. 8)"


def test_relative_l2_error_by_hand():
    exact = torch.tensor([[3.0, -4.0]])
    assert relative_l2_error(exact, exact) == 0.0
    assert relative_l2_error(exact * 1.1, exact) == pytest.approx(0.1)
    assert relative_l2_error(torch.tensor([[3.0, -1.0]]), exact) == pytest.approx(3.0 / 5.0)


def _heads(q_heads, kv_heads, tokens, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, q_heads, tokens, dim, generator=gen), torch.randn(1, kv_heads, tokens, dim, generator=gen)


def test_original_distortion_matches_a_hand_computation():
    queries, keys = _heads(2, 1, 40, 8)  # GQA 2:1; 32 keys sketched (one buffer), the last 8 exact
    sketch = models.QJLSketch(8, 16, seed=3)
    s = sketch.projection.double()
    q, k = queries[0, :, -1].double(), keys[0, 0].double()  # [2, 8], [40, 8]
    k_hat = (torch.pi / 2) ** 0.5 / 16 * k.norm(dim=-1, keepdim=True) * (torch.sign(k @ s.T) @ s)
    k_hat[32:] = k[32:]
    expected = torch.linalg.norm(q @ k_hat.T - q @ k.T) / torch.linalg.norm(q @ k.T)
    got = last_query_distortion(queries, keys, sketch, buffer_size=32, group_size=32)
    assert got == pytest.approx(expected.item(), rel=1e-5)
    estimate, exact = last_query_scores(queries, keys, sketch, buffer_size=32, group_size=32)
    assert estimate.shape == exact.shape == (1, 2, 1, 40)
    torch.testing.assert_close(estimate[..., 32:], exact[..., 32:])


def test_original_distortion_is_zero_for_exact_keys_and_small_for_large_m():
    queries, keys = _heads(2, 2, 256, 16, seed=1)
    # fewer tokens than one buffer: every key stays exact, as in the cache
    assert last_query_distortion(queries[:, :, :100], keys[:, :, :100], models.QJLSketch(16, 64)) == 0.0
    small = last_query_distortion(queries, keys, models.QJLSketch(16, 16), buffer_size=128)
    large = last_query_distortion(queries, keys, models.QJLSketch(16, 4096), buffer_size=128)
    assert large < 0.1 < small and large < small / 8  # error ~ 1 / sqrt(m): 256x the bits, ~1/16 the error


def test_distortion_original_variant_end_to_end(tmp_path, monkeypatch):
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    from models.capture import capture_queries_keys

    def fake_heads(name, tokens, layers):  # a tiny random model in place of SmolLM2 on real text
        assert (name, tokens, layers) == ("smollm2", 256, None)
        ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(0))
        records = capture_queries_keys(model, ids)
        return {i: records[i] for i in map_layers(ORIGINAL_LAYERS, 3)}, 3

    monkeypatch.setattr(plot_distortion, "text_model_heads", fake_heads)
    data = plot_distortion.main(["--variant", "original", "--tokens", "256", "--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "distortion_smollm2")
    assert data["layers"] == [0, 1, 2] and data["sketch_dims"] == [64 * i for i in range(1, 9)]
    assert data["bits_per_channel"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert "round(l * 2 / 31)" in data["layer_mapping"]
    for errors in data["results"].values():
        assert errors[-1] < errors[0] / 2


# --- command-line robustness: every argument and output path checked before the sweep ------------------------


class Interrupted(Exception):
    """Stands in for Ctrl-C (a real KeyboardInterrupt would stop pytest itself)."""


def _fake_sweep(monkeypatch, stop_at=None):
    """No model, and a measure() that takes no time (and raises Interrupted at ``stop_at`` tokens)."""

    def measure(model, method, qjl_config, seq_len, new_tokens, timer_factory=None):
        if seq_len == stop_at:
            raise Interrupted
        return plot_runtime.Measurement(seq_len * 1e-3, new_tokens * 1e-3, seq_len, None)

    monkeypatch.setattr(plot_runtime, "build_model", lambda *a, **k: None)
    monkeypatch.setattr(plot_runtime, "measure", measure)


SHORT_SWEEP = ["--device", "cpu", "--min_len", "16", "--max_len", "64", "--repeats", "1", "--new_tokens", "1"]
SHORT_MEMORY_SWEEP = ["--device", "cpu", "--min_len", "16", "--max_len", "64", "--new_tokens", "1"]  # no --repeats: measured once


def test_runtime_json_is_written_after_each_length(tmp_path, monkeypatch):
    _fake_sweep(monkeypatch, stop_at=64)
    with pytest.raises(Interrupted):  # interrupted during the third length
        plot_runtime.main([*SHORT_SWEEP, "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "runtime_tiny.json").read_text())
    assert saved["lengths"] == [16, 32] and saved["complete"] is False
    assert all(r["cache_bytes"] == [16, 32] for r in saved["results"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["runtime_tiny.json"]  # no temporary file left, no figure yet
    _fake_sweep(monkeypatch)
    data = plot_runtime.main([*SHORT_SWEEP, "--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "runtime_tiny")
    assert data["lengths"] == [16, 32, 64] and data["complete"] is True


def test_runtime_measures_a_repeated_method_once(tmp_path, monkeypatch):
    assert plot_runtime.parse_args(["--device", "cpu", "--methods", "qjl", "exact", "qjl"]).methods == ["qjl", "exact"]
    _fake_sweep(monkeypatch)
    data = plot_runtime.main([*SHORT_SWEEP, "--methods", "qjl", "qjl", "--output_dir", str(tmp_path)])
    assert data == _outputs(tmp_path, "runtime_tiny")
    assert list(data["results"]) == ["qjl"] and data["results"]["qjl"]["cache_bytes"] == [16, 32, 64]


def test_runtime_checks_the_output_dir_before_the_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plot_runtime, "build_model", lambda *a, **k: pytest.fail("model built before the check"))
    target = tmp_path / "file"
    target.write_text("mine")
    (tmp_path / "out" / "runtime_tiny.png").mkdir(parents=True)
    for output_dir, problem in ((target, f"{target} exists and is not a directory"),
                                (target / "sub", f"cannot create {target / 'sub'}: {target} is not a directory"),
                                (tmp_path / "out", f"{tmp_path / 'out' / 'runtime_tiny.png'} is a directory")):
        with pytest.raises(SystemExit) as exit_info:
            plot_runtime.main([*SHORT_SWEEP, "--output_dir", str(output_dir)])
        assert exit_info.value.code == 2
        assert f"argument --output_dir: {problem}" in capsys.readouterr().err
    assert target.read_text() == "mine"


@pytest.mark.parametrize(
    "device, gpus, message",
    [
        ("banana", 0, "argument --device: not a device: 'banana' (use cpu or cuda[:N])"),
        ("mps", 0, "argument --device: must be cpu or cuda[:N], got 'mps'"),
        ("cuda", 0, "argument --device: 'cuda': no CUDA GPU is available here"),
        ("cuda:1", 1, "argument --device: 'cuda:1': this machine has 1 CUDA device(s)"),
    ],
)
def test_runtime_refuses_a_device_it_cannot_use(device, gpus, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for parse in (plot_runtime.parse_args, plot_memory_peak.parse_args):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--device", device])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "cannot read it (No such file or directory)"),
        ("[1, 2]", "a QJLConfig file holds a JSON object of fields, got a list"),
        ('{"group_size": 32,', "not valid JSON"),
        ('{"bogus": 1}', "unknown QJLConfig keys ['bogus']"),
        ('{"group_size": 48}', "buffer_size must be a positive multiple of group_size (48), got 128"),
        ('{"group_size": "32"}', "group_size must be an int"),
        ('{"outlier_count_general": 200}', "outlier_count_general (200) exceeds head_dim (128)"),  # the presets' d
    ],
)
def test_runtime_refuses_a_bad_qjl_config_naming_the_file(content, problem, tmp_path, capsys):
    path = tmp_path / "qjl.json"
    if content is not None:
        path.write_text(content)
    for parse in (plot_runtime.parse_args, plot_memory_peak.parse_args):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--device", "cpu", "--qjl_config", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --qjl_config: {path}" in err and problem in err


def test_methods_that_cannot_run_are_usage_errors_before_the_model(tmp_path, capsys, monkeypatch):
    # they were tracebacks from make_cache after the model was built and the other methods warmed up
    monkeypatch.setattr(plot_runtime, "build_model", lambda *a, **k: pytest.fail("model built before the check"))
    monkeypatch.setattr(models.factory, "quanto_available", lambda: False)
    exact_values = tmp_path / "v16.json"
    exact_values.write_text('{"value_quantization_bits": 16}')
    for argv, message in (
        (["--methods", "exact", "quanto"], "quanto: method 'quanto' needs optimum-quanto: pip install optimum-quanto"),
        (["--qjl_config", str(exact_values), "--methods", "exact", "qjl", "kivi"],
         f"--qjl_config {exact_values}: kivi: method 'kivi' quantizes keys and values to 2 or 4 bits, got 16"),
    ):
        for main, sweep in ((plot_runtime.main, SHORT_SWEEP), (plot_memory_peak.main, SHORT_MEMORY_SWEEP)):
            with pytest.raises(SystemExit) as exit_info:
                main([*sweep, *argv, "--output_dir", str(tmp_path / "out")])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert "argument --methods: cannot run on preset tiny with --qjl_config " in err and message in err
    assert not (tmp_path / "out").exists()
    args = plot_runtime.parse_args(["--device", "cpu", "--qjl_config", str(exact_values), "--methods", "exact", "qjl"])
    assert args.methods == ["exact", "qjl"]  # QJL keeps exact values


def test_repeated_list_flags_add_up(small_models, tmp_path, capsys, monkeypatch):
    # nargs="+" alone kept only the last flag: --methods exact --methods kivi measured kivi only
    args = plot_runtime.parse_args(["--device", "cpu", "--methods", "exact", "--methods", "kivi", "exact"])
    assert args.methods == ["exact", "kivi"]
    assert plot_runtime.parse_args(["--device", "cpu"]).methods == ["exact", "qjl", "kivi"]
    assert plot_memory_peak.parse_args(["--device", "cpu", "--methods", "qjl", "--methods", "exact"]).methods == [
        "qjl", "exact"]
    import models.capture

    monkeypatch.setattr(models.capture, "capture_queries_keys", lambda *a, **k: pytest.fail("model ran"))
    with pytest.raises(SystemExit) as exit_info:  # --layers 7 is kept, and checked against the model
        plot_distortion.main(["--model", str(small_models["d64"]), "--tokens", "64", "--layers", "7", "--layers", "0",
                              "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --layers: [7] not in the model's 2 layers (0..1)" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**63), str(-(2**63) - 1)])
def test_distortion_seed_out_of_torch_range_is_a_usage_error(seed, tmp_path, capsys, monkeypatch):
    # 10**20 was an "Overflow when unpacking long long" traceback from the key generator
    monkeypatch.setattr(plot_distortion, "synthetic_heads", lambda *a, **k: pytest.fail("keys made before the check"))
    with pytest.raises(SystemExit) as exit_info:
        plot_distortion.main(["--seed", seed, "--tokens", "64", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument --seed: must be an integer in [-2**63, 2**63), got {seed}" in capsys.readouterr().err


def test_distortion_takes_negative_and_64_bit_seeds():
    # torch.Generator.manual_seed takes [-2**63, 2**64): a negative --seed worked and still does
    for seed in (-1, -(2**63), 2**63 - 1):  # the queries use seed + 1
        heads = plot_distortion.synthetic_heads(32, 16, 2, seed)
        plot_distortion.layer_errors(*heads[0], 16, 2, 8, seed, 2)


def test_runtime_max_len_is_bounded_as_the_help_says(capsys):
    assert plot_runtime.parse_args(["--device", "cpu", "--max_len", "131072"]).max_len == plot_runtime.MAX_LEN == 131072
    with pytest.raises(SystemExit) as exit_info:
        plot_runtime.parse_args(["--device", "cpu", "--max_len", "262144"])
    assert exit_info.value.code == 2
    assert "argument --max_len: must be at most 131072, got 262144" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--head_dim", "7"], "argument --head_dim: must be a multiple of 8 in [8, 256]"),
        (["--head_dim", "300"], "argument --head_dim: must be a multiple of 8 in [8, 256]"),
        (["--head_dim", "0"], "argument --head_dim: must be a positive integer, got 0"),
        (["--head_dim", "16", "--outlier_count", "20"],
         "argument --outlier_count: must be at most --head_dim (16), got 20"),
    ],
)
def test_distortion_refuses_synthetic_keys_it_cannot_sketch(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_distortion.main([*argv, "--tokens", "64", "--queries", "4", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """Two saved random Llamas: 2 layers of head_dim 64, and 1 layer of head_dim 12 (no sketch fits it)."""
    paths = {}
    shared = dict(num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    for name, config in (
        ("d64", LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=64, **shared)),
        ("d12", LlamaConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, head_dim=12, **shared)),
    ):
        torch.manual_seed(0)
        paths[name] = tmp_path_factory.mktemp(name) / "model"
        LlamaForCausalLM(config).save_pretrained(paths[name])
    return paths


def test_distortion_checks_the_arguments_against_the_model_before_running_it(small_models, tmp_path, capsys,
                                                                               monkeypatch):
    import models.capture

    monkeypatch.setattr(models.capture, "capture_queries_keys",
                        lambda *a, **k: pytest.fail("model ran before the check"))
    for model, argv, message in (
        ("d64", ["--layers", "0", "7"], "argument --layers: [7] not in the model's 2 layers (0..1)"),
        ("d64", ["--outlier_count", "65"],
         "argument --outlier_count: must be at most the model's head_dim (64), got 65"),
        ("d12", [], "argument --model: its head_dim must be a multiple of 8 in [8, 256]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            plot_distortion.main(["--model", str(small_models[model]), "--tokens", "64", *argv,
                                  "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_distortion_original_variant_checks_the_layers_before_running_the_model(tmp_path, capsys, monkeypatch):
    import models.capture
    import models.pretrained

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=64)

    def tokenizer(text, return_tensors):
        return type("Encoding", (), {"input_ids": torch.zeros(1, 300, dtype=torch.long)})()

    monkeypatch.setattr(models.pretrained, "load_tokenizer", lambda name: tokenizer)
    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: (LlamaForCausalLM(config), tokenizer))
    monkeypatch.setattr(models.capture, "capture_queries_keys",
                        lambda *a, **k: pytest.fail("model ran before the check"))
    with pytest.raises(SystemExit) as exit_info:
        plot_distortion.main(["--variant", "original", "--layers", "1", "5", "--tokens", "256",
                              "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --layers: [5] not in the model's 3 layers (0..2)" in capsys.readouterr().err


def test_distortion_original_variant_checks_the_token_count_before_loading_the_model(tmp_path, capsys, monkeypatch):
    # more --tokens than the text has was a ValueError traceback after the model loaded
    import models.pretrained

    def tokenizer(text, return_tensors):
        return type("Encoding", (), {"input_ids": torch.zeros(1, 300, dtype=torch.long)})()

    monkeypatch.setattr(models.pretrained, "load_tokenizer", lambda name: tokenizer)
    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        plot_distortion.main(["--variant", "original", "--tokens", "400", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --tokens: the standard library's sources gave only 300 tokens, fewer than 400" in (
        capsys.readouterr().err)


def test_distortion_checks_the_output_dir_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plot_distortion, "synthetic_heads", lambda *a, **k: pytest.fail("keys made before the check"))
    monkeypatch.setattr(plot_distortion, "text_model_heads", lambda *a, **k: pytest.fail("model ran before the check"))
    target = tmp_path / "file"
    target.write_text("mine")
    for argv in ([], ["--variant", "original"]):
        with pytest.raises(SystemExit) as exit_info:
            plot_distortion.main([*argv, "--output_dir", str(target)])
        assert exit_info.value.code == 2
        assert f"argument --output_dir: {target} exists and is not a directory" in capsys.readouterr().err


def test_runtime_names_the_cpu_kernels_when_they_run(tmp_path):
    # The label came from backend_for, which knows only GPU backends: a run on the C++ CPU kernels and
    # a run forced to the references both said "reference".
    import qjl_kernel
    from qjl_kernel import ops

    with qjl_kernel.use_backend("reference"):
        assert qjl_kernel.ops_label("cpu") == "reference"
    if ops._HAS_CPU_KERNELS and ops.forced_backend() == "auto":
        assert qjl_kernel.ops_label("cpu") == f"cpu kernels ({qjl_kernel.cpu_isa()})"
        data = plot_runtime.main([*SHORT_SWEEP, "--output_dir", str(tmp_path)])
        assert data["backend"] == f"cpu kernels ({qjl_kernel.cpu_isa()})"


def test_memory_takes_no_repeats(capsys):
    # --repeats (shared with the runtime plot) was accepted and ignored: memory is measured once per point
    with pytest.raises(SystemExit) as exit_info:
        plot_memory_peak.parse_args(["--device", "cpu", "--repeats", "5"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --repeats 5" in capsys.readouterr().err
    assert plot_runtime.parse_args(["--device", "cpu", "--repeats", "5"]).repeats == 5
