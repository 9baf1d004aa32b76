"""perplexity.py on a tiny random Llama (no downloads): chunked == one-by-one, exact == a cacheless
forward pass, measured bits, resume, argument errors and the figure."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import models
import perplexity as P
from models.accounting import qjl_bit_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB, LAYERS, HEAD_DIM = 97, 2, 64
TOKENS, PROMPT, CHUNK = 300, 64, 32
TINYLM = Path(__file__).resolve().parents[1] / "tinylm" / "model"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def model():
    """tests/models/tiny.py's tiny_model(): 2 layers, 4 query / 2 KV heads of head_dim 64, "qjl" attention."""
    config = LlamaConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=8192,
        initializer_range=0.08, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(models.ATTN_IMPLEMENTATION)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sweep():
    """The default sweep with buffer 32 / group 16, so 300 tokens commit several key buffers."""
    return {c.name: c for c in P.default_sweep(LAYERS, group_size=16, buffer_size=32)}


SETTINGS = dict(model="tiny", dtype="float32", tokens=TOKENS, prompt=PROMPT, chunk=CHUNK, ids_sha256="x")


# --- the sweep ------------------------------------------------------------------------------------
def test_default_sweep_is_the_paper_grid_and_fits_smollm2():
    sweep = P.default_sweep(30)
    names = [c.name for c in sweep]
    assert len(names) == len(set(names)) == 18
    by = {c.name: c for c in sweep}
    assert by["qjl-paper"].qjl == models.QJLConfig().scaled_to_layers(30)
    assert by["qjl-paper"].qjl.initial_layers_count == 14
    for m in P.SKETCH_SIZES:
        on, off = by[f"qjl-m{m}-o8-v2"].qjl, by[f"qjl-m{m}-o0-v2"].qjl
        assert on.key_quantization_bits == on.key_quantization_bits_initial_layers == m
        assert (on.outlier_count_general, on.outlier_sketch_dim_general) == (8, min(m, 256))
        assert (on.outlier_count_initial_layers, on.outlier_sketch_dim_initial_layers) == (8, min(m, 128))
        assert off.outlier_count_general == off.outlier_count_initial_layers == 0
        assert on.value_quantization_bits == off.value_quantization_bits == 2
        assert on.initial_layers_count == 14
    assert {n: by[n].family for n in ("exact", "qjl-paper", "qjl-m64-o0-v2", "qjl-m256-o8-v16", "kivi-4")} == {
        "exact": "exact", "qjl-paper": "qjl-outliers", "qjl-m64-o0-v2": "qjl-no-outliers",
        "qjl-m256-o8-v16": "qjl-exact-values", "kivi-4": "kivi"}
    assert by["kivi-2"].settings() == {"bits": 2, "group_size": 32, "buffer_size": 128}
    for c in sweep:  # every configuration runs on SmolLM2's head_dim 64
        if c.method == "qjl":
            c.qjl.check_head_dim(64)


def test_select_by_names_and_patterns(sweep):
    configs = list(sweep.values())
    assert [c.name for c in P.select(configs, None)] == list(sweep)
    assert [c.name for c in P.select(configs, ["kivi-4", "exact"])] == ["exact", "kivi-4"]  # sweep order
    assert [c.name for c in P.select(configs, ["qjl-m*-o0-v2"])] == [f"qjl-m{m}-o0-v2" for m in P.SKETCH_SIZES]
    with pytest.raises(ValueError, match=r"unknown configuration name\(s\) \['qjl-m999', 'nope'\].*qjl-paper"):
        P.select(configs, ["exact", "qjl-m999", "nope"])


# --- perplexity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qjl-paper", "qjl-m64-o0-v2", "qjl-m256-o8-v16", "kivi-2"])
def test_chunked_equals_one_by_one(model, ids, sweep, name):
    config = sweep[name]
    cache = config.make_cache(model.config)
    chunked = P.perplexity_of(model, ids, cache, PROMPT, CHUNK)
    # the run compressed keys (and values, unless exact) far behind the buffer
    layer = cache.layers[-1]
    layer.settle()  # what the next update would do first
    assert layer.key_store.num_committed == TOKENS // 32 * 32 and layer.key_store.seq_len == TOKENS
    assert layer.value_store.num_quantized == (0 if config.qjl.value_quantization_bits == 16 else TOKENS - 32)
    one_by_one = P.perplexity_of(model, ids, config.make_cache(model.config), PROMPT, 1)
    uneven = P.perplexity_of(model, ids, config.make_cache(model.config), PROMPT, 50)  # chunks cross buffers
    assert chunked.tokens == one_by_one.tokens == TOKENS - PROMPT
    torch.testing.assert_close(chunked.nll, one_by_one.nll, rtol=0, atol=2e-5)
    torch.testing.assert_close(uneven.nll, one_by_one.nll, rtol=0, atol=2e-5)
    assert chunked.ppl == pytest.approx(one_by_one.ppl, rel=1e-6)


def test_compression_changes_the_nll(model, ids, sweep):
    exact = P.perplexity_of(model, ids, sweep["exact"].make_cache(model.config), PROMPT, CHUNK)
    qjl = P.perplexity_of(model, ids, sweep["qjl-m64-o0-v2"].make_cache(model.config), PROMPT, CHUNK)
    # the first scored token comes from the prompt's last logit: exact attention in every cache
    assert qjl.nll[0].item() == pytest.approx(exact.nll[0].item(), abs=1e-5)
    assert (qjl.nll - exact.nll).abs().max() > 1e-3


def test_exact_equals_one_forward_pass_without_cache(model, ids, sweep):
    got = P.perplexity_of(model, ids, sweep["exact"].make_cache(model.config), PROMPT, CHUNK)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    nll = F.cross_entropy(logits[PROMPT - 1:-1], ids[0, PROMPT:], reduction="none").double()
    assert got.tokens == TOKENS - PROMPT
    torch.testing.assert_close(got.nll, nll, rtol=0, atol=1e-5)
    assert got.ppl == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-6)
    assert got.mean_nll == pytest.approx(nll.mean().item(), rel=1e-6)
    torch.testing.assert_close(P.full_forward_perplexity(model, ids[0], PROMPT).nll, nll)


def test_records_hold_measured_bits_and_bytes(model, ids, sweep):
    rec = {n: P.evaluate(model, ids, sweep[n], PROMPT, CHUNK)
           for n in ("exact", "qjl-paper", "qjl-m256-o8-v16", "kivi-2")}
    exact = rec["exact"]
    assert (exact["kv_bits_per_channel"], exact["nominal_kv_bits_fp16"], exact["config"]) == (16.0, 16.0, {})
    assert exact["kv_bytes"] == 2 * LAYERS * 2 * TOKENS * HEAD_DIM * 4  # float32 K and V
    assert exact["fp16_kv_bytes"] == exact["kv_bytes"] // 2
    for r in rec.values():
        assert r["scored_tokens"] == TOKENS - PROMPT and r["seconds"] > 0
        assert r["ppl"] == pytest.approx(2.718281828 ** r["mean_nll"])
        assert 0 < r["kv_bytes"] and r["kv_bits_per_channel"] > 0
    # measured in the model's dtype: float32 norms / scales, so 32-bit storage accounting
    paper = sweep["qjl-paper"].qjl
    assert rec["qjl-paper"]["config"] == paper.to_dict()
    assert rec["qjl-paper"]["kv_bits_per_channel"] == pytest.approx(
        qjl_bit_report(paper, LAYERS, HEAD_DIM, storage_bits=32).kv_bits_per_channel)
    assert rec["qjl-paper"]["nominal_kv_bits_fp16"] == pytest.approx(
        qjl_bit_report(paper, LAYERS, HEAD_DIM).kv_bits_per_channel)
    assert rec["qjl-paper"]["kv_bytes"] < exact["kv_bytes"] / 2
    v16 = rec["qjl-m256-o8-v16"]
    assert v16["value_bits_per_channel"] == 16.0
    assert v16["kv_bits_per_channel"] == pytest.approx((v16["key_bits_per_channel"] + 16) / 2)
    assert rec["kivi-2"]["config"] == {"bits": 2, "group_size": 16, "buffer_size": 32}
    assert rec["kivi-2"]["key_bits_per_channel"] == pytest.approx(2 + 2 * 32 / 16)


# --- resume ---------------------------------------------------------------------------------------
REAL_EVALUATE = P.evaluate


class Interrupted(Exception):
    """Stands in for Ctrl-C (a real KeyboardInterrupt would stop pytest itself)."""


def _counting(monkeypatch, path, fail_on=None):
    """Wrap perplexity.evaluate: record the names run and how many records the JSON had then."""
    calls = []

    def evaluate(model, ids, config, prompt, chunk):
        before = len(json.loads(path.read_text())["results"]) if path.exists() else 0
        calls.append((config.name, before))
        if config.name == fail_on:
            raise Interrupted
        return REAL_EVALUATE(model, ids, config, prompt, chunk)

    monkeypatch.setattr(P, "evaluate", evaluate)
    return calls


def test_json_after_each_configuration_and_resume(model, ids, sweep, tmp_path, monkeypatch):
    path = tmp_path / P.JSON_NAME
    configs = [sweep[n] for n in ("exact", "qjl-m64-o0-v2", "kivi-2")]
    kwargs = dict(prompt=PROMPT, chunk=CHUNK, settings=SETTINGS, output=tmp_path, progress=False)

    calls = _counting(monkeypatch, path, fail_on="kivi-2")
    with pytest.raises(Interrupted):  # interrupted at the third configuration
        P.run_sweep(model, ids, configs, **kwargs)
    assert calls == [("exact", 0), ("qjl-m64-o0-v2", 1), ("kivi-2", 2)]  # written after each one
    saved = json.loads(path.read_text())
    assert saved["settings"] == SETTINGS and [r["name"] for r in saved["results"]] == ["exact", "qjl-m64-o0-v2"]

    calls = _counting(monkeypatch, path)
    data = P.run_sweep(model, ids, configs, **kwargs)  # resumes: only the missing one runs
    assert calls == [("kivi-2", 2)]
    assert [r["name"] for r in data["results"]] == ["exact", "qjl-m64-o0-v2", "kivi-2"]
    assert json.loads(path.read_text()) == data
    assert data["results"][:2] == saved["results"]

    calls = _counting(monkeypatch, path)
    assert P.run_sweep(model, ids, configs, **kwargs) == data and calls == []  # all done: nothing runs

    with pytest.raises(ValueError, match=r"tokens: 300 there, 280 now\); refusing to mix them"):
        P.run_sweep(model, ids[:, :280], configs, **{**kwargs, "settings": {**SETTINGS, "tokens": 280}})
    with pytest.raises(ValueError, match=r"chunk: 32 there, 16 now.*model: 'tiny' there, 'other' now"):
        P.run_sweep(model, ids, configs, **{**kwargs, "settings": {**SETTINGS, "chunk": 16, "model": "other"}})
    other = P.SweepConfig("kivi-2", "kivi", models.QJLConfig(value_quantization_bits=2, group_size=32, buffer_size=32))
    with pytest.raises(ValueError, match=r"'kivi-2' was run with other settings \(group_size: 16 there, 32 now\)"):
        P.run_sweep(model, ids, [other], **kwargs)
    assert calls == [] and json.loads(path.read_text()) == data  # refusals leave the file alone


def test_a_foreign_json_is_refused(model, ids, tmp_path):
    (tmp_path / P.JSON_NAME).write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a perplexity.py results file"):
        P.run_sweep(model, ids, [], prompt=PROMPT, chunk=CHUNK, settings=SETTINGS, output=tmp_path, progress=False)


@pytest.mark.parametrize("content, match", [
    ('{"settings": {', r"is not valid JSON \(line 1: .*\); refusing to overwrite it"),
    ("[1, 2]", "is not a perplexity.py results file"),
    ('{"settings": 5, "results": []}', "is not a perplexity.py results file"),
    ('{"settings": {}, "results": [{"ppl": 1.0}]}', "is not a perplexity.py results file"),
])  # fmt: skip
def test_an_unreadable_results_file_is_refused_by_name_and_left_alone(model, ids, tmp_path, content, match):
    path = tmp_path / P.JSON_NAME
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + match):
        P.run_sweep(model, ids, [], prompt=PROMPT, chunk=CHUNK, settings=SETTINGS, output=tmp_path, progress=False)
    assert path.read_text() == content


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, prompt, chunk, match", [
    (64, 64, 32, r"tokens \(64\) must exceed prompt \(64\)"),
    (10, 64, 32, r"tokens \(10\) must exceed prompt \(64\)"),
    (300, 64, 0, "chunk must be a positive number of tokens, got 0"),
    (300, 64, -5, "chunk must be a positive"),
    (300, 0, 32, "prompt must be at least 1 token"),
    (300.0, 64, 32, "tokens must be an int"),
])  # fmt: skip
def test_bad_lengths(tokens, prompt, chunk, match):
    with pytest.raises(ValueError, match=match):
        P.check_lengths(tokens, prompt, chunk)


def test_bad_inputs_to_the_core(model, ids, sweep, tmp_path):
    cache = sweep["exact"].make_cache(model.config)
    with pytest.raises(ValueError, match=r"tokens \(300\) must exceed prompt \(300\)"):
        P.perplexity_of(model, ids, cache, TOKENS, CHUNK)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        P.perplexity_of(model, ids, cache, PROMPT, 0)
    with pytest.raises(ValueError, match=r"one sequence, shape \[T\] or \[1, T\], got \(2, 300\)"):
        P.perplexity_of(model, ids.expand(2, -1), cache, PROMPT, CHUNK)
    with pytest.raises(ValueError, match=r"tokens \(300\) must exceed prompt \(512\)"):
        P.run_sweep(model, ids, [], prompt=512, chunk=CHUNK, settings=SETTINGS, output=tmp_path, progress=False)
    assert not (tmp_path / P.JSON_NAME).exists()


def test_text_shorter_than_tokens():
    class FewTokens:  # a tokenizer that yields 10 tokens for any text
        def __call__(self, text, **kwargs):
            return type("Encoding", (), {"input_ids": torch.zeros(1, 10, dtype=torch.long)})()

    with pytest.raises(ValueError, match="only 10 tokens with this tokenizer, fewer than --tokens 300"):
        P.text_ids(FewTokens(), 300)


@pytest.mark.parametrize("argv, match", [
    (["--tokens", "100", "--prompt", "256"], r"tokens \(100\) must exceed prompt \(256\)"),
    (["--chunk", "0"], "chunk must be a positive"),
    (["--methods", "exact", "qjl-bogus"], r"--methods: unknown configuration name\(s\) \['qjl-bogus'\]"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
])  # fmt: skip
def test_cli_rejects_bad_arguments_before_loading_a_model(argv, match, capsys, monkeypatch):
    import models.pretrained

    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        P.main(argv + ["--no-figure"])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def _stored_results(directory, **settings):
    """A results file in ``directory`` made with the CLI's default settings, ``settings`` replaced."""
    defaults = dict(model="smollm2", dtype="float32", tokens=4096, prompt=256, chunk=128,
                    text=f"python {sys.version_info.major}.{sys.version_info.minor} standard-library sources",
                    ids_sha256="x", num_layers=30)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / P.JSON_NAME
    path.write_text(json.dumps({"format": 1, "settings": {**defaults, **settings}, "results": []}))
    return path


def test_cli_checks_the_output_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import models.pretrained

    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    target = tmp_path / "file"
    target.write_text("mine")
    corrupt = tmp_path / "corrupt" / P.JSON_NAME
    corrupt.parent.mkdir()
    corrupt.write_text('{"settings": {')
    (tmp_path / "figure" / P.FIGURE_NAME).mkdir(parents=True)
    cases = [
        (target, [], f"{target} exists and is not a directory"),
        (tmp_path / "corrupt", [], f"{corrupt} is not valid JSON (line 1: "),
        (tmp_path / "other", ["--chunk", "64"],
         f"{tmp_path / 'other' / P.JSON_NAME} holds results of other settings (chunk: 128 there, 64 now)"),
    ]
    if HAS_MATPLOTLIB:
        cases.append((tmp_path / "figure", [], f"{tmp_path / 'figure' / P.FIGURE_NAME} is a directory"))
    _stored_results(tmp_path / "other")
    for output, extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            P.main(["--output", str(output), *extra] + ([] if output.name == "figure" else ["--no-figure"]))
        assert exit_info.value.code == 2
        assert f"argument --output: {message}" in capsys.readouterr().err
    assert target.read_text() == "mine" and corrupt.read_text() == '{"settings": {'  # left alone
    monkeypatch.setattr(models.pretrained, "load_tokenizer", lambda name: ManyTokens())  # checked before the model
    with pytest.raises(pytest.fail.Exception, match="model loaded"):  # the same settings: resumed, so it loads
        P.main(["--output", str(tmp_path / "other"), "--no-figure"])


class ManyTokens:  # a tokenizer that yields 10**6 tokens for any text
    def __call__(self, text, **kwargs):
        return type("Encoding", (), {"input_ids": torch.zeros(1, 10**6, dtype=torch.long)})()


@pytest.mark.skipif(not (TINYLM / "config.json").exists(), reason="the embedded tinylm/model is missing")
def test_cli_refuses_more_tokens_than_the_text_has_before_loading_the_model(tmp_path, capsys, monkeypatch):
    # it was a ValueError traceback after the model loaded (and the whole standard library was tokenized)
    import models.pretrained

    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(P, "stdlib_text", lambda min_chars: "def f(x):\n    return x + 1\n" * 20)  # a short text
    with pytest.raises(SystemExit) as exit_info:
        P.main(["--model", str(TINYLM), "--tokens", "100000000", "--methods", "exact", "--output", str(tmp_path / "o"),
                "--no-figure"])
    assert exit_info.value.code == 2
    assert re.search(r"argument --tokens: the standard-library text has only \d+ tokens with this tokenizer, fewer "
                     r"than --tokens 100000000", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_repeated_methods_add_up():
    args = P.build_parser().parse_args(["--methods", "exact", "--methods", "kivi-*", "qjl-paper"])
    assert args.methods == ["exact", "kivi-*", "qjl-paper"]
    assert P.build_parser().parse_args([]).methods is None  # the whole sweep


@pytest.mark.skipif(not (TINYLM / "config.json").exists(), reason="the embedded tinylm/model is missing")
def test_cli_refuses_results_of_another_text_before_running(tmp_path, capsys, monkeypatch):
    # the text's digest and the depth are known once the model (its tokenizer) is loaded: checked then,
    # before any configuration runs
    monkeypatch.setattr(P, "evaluate", lambda *a, **k: pytest.fail("a configuration ran"))
    _stored_results(tmp_path, model=str(TINYLM), tokens=300, prompt=64, chunk=64, ids_sha256="0000", num_layers=3)
    with pytest.raises(SystemExit) as exit_info:
        P.main(["--model", str(TINYLM), "--tokens", "300", "--prompt", "64", "--chunk", "64", "--output", str(tmp_path),
                "--methods", "exact", "--no-figure"])
    assert exit_info.value.code == 2
    assert re.search(r"argument --output: .*holds results of other settings \(ids_sha256: '0000' there, '[0-9a-f]{16}' "
                     r"now\)", capsys.readouterr().err)


def test_missing_matplotlib_fails_early_with_a_clear_message(monkeypatch, tmp_path):
    import models.pretrained

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ModuleNotFoundError, match="needs matplotlib: `pip install matplotlib`, or pass --no-figure"):
        P.main(["--output", str(tmp_path)])
    with pytest.raises(ModuleNotFoundError, match="pass --no-figure"):
        P.plot({"settings": SETTINGS, "results": []}, tmp_path / "x.png")


# --- figure and CLI -------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the figure is optional)")
def test_figure(model, ids, sweep, tmp_path):
    configs = [sweep[n] for n in ("exact", "qjl-paper", "qjl-m64-o0-v2", "qjl-m256-o8-v16", "kivi-2")]
    data = P.run_sweep(model, ids, configs, prompt=PROMPT, chunk=CHUNK, settings=SETTINGS, output=tmp_path,
                       progress=False)
    path = P.plot(data, tmp_path / P.FIGURE_NAME)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


@pytest.mark.skipif(not (TINYLM / "config.json").exists(), reason="the embedded tinylm/model is missing")
def test_cli_end_to_end_on_a_local_model(tmp_path, capsys, monkeypatch):
    argv = ["--model", str(TINYLM), "--tokens", "300", "--prompt", "64", "--chunk", "64", "--output", str(tmp_path),
            "--methods", "exact", "kivi-2", "qjl-m64-o0-v2"] + ([] if HAS_MATPLOTLIB else ["--no-figure"])
    data = P.main(argv)
    assert [r["name"] for r in data["results"]] == ["exact", "qjl-m64-o0-v2", "kivi-2"]
    settings = data["settings"]
    assert (settings["tokens"], settings["prompt"], settings["chunk"], settings["num_layers"]) == (300, 64, 64, 3)
    assert json.loads((tmp_path / P.JSON_NAME).read_text()) == data
    assert all(r["scored_tokens"] == 236 for r in data["results"])
    if HAS_MATPLOTLIB:
        assert (tmp_path / P.FIGURE_NAME).read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "qjl-m64-o0-v2" in out and "kv b/ch" in out
    again = P.main(argv + ["--no-figure"])  # resumes: nothing new to run
    assert again == data
    import models.pretrained

    monkeypatch.setattr(models.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:  # other settings: refused before loading the model
        P.main(argv[:4] + ["--prompt", "32"] + argv[6:] + ["--no-figure"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --output: " in err and "refusing to mix them" in err and "prompt: 64 there, 32 now" in err


def test_a_second_run_into_the_same_output_is_refused(tmp_path, capsys, monkeypatch):
    # Two runs into one --output each rewrote perplexity.json from their own copy: the run that
    # finished last dropped the other's finished configurations.
    import models.pretrained
    from longbench_eval.records import DirectoryLock

    monkeypatch.setattr(models.pretrained, "load_tokenizer", lambda *a, **k: pytest.fail("work started"))
    with DirectoryLock(tmp_path / "out"):  # the first run, still going
        with pytest.raises(SystemExit) as exit_info:
            P.main(["--output", str(tmp_path / "out"), "--no-figure"])
    assert exit_info.value.code == 2
    assert f"argument --output: {tmp_path / 'out'} is in use by another run (pid " in capsys.readouterr().err
