"""--tokenizer slow (sentencepiece, LongBench's choice) against the sentencepiece library itself,
and against the fast (converted) tokenizer, on a tiny sentencepiece BPE model trained here."""

import json

import pytest
from longbench_tiny import save_sentencepiece_tokenizer, save_tiny_sentencepiece_model, write_longbench_data
from transformers import GenerationConfig

import longbench
from longbench_eval import generation, prompting, records, tables
from longbench_eval.prompting import VICUNA_SYSTEM, build_prompt, encode, resolve_chat_format, truncate_middle
from longbench_eval.tokenization import SentencePieceLlamaTokenizer, load_tokenizer, tokenizer_kind

spm = pytest.importorskip("sentencepiece", reason="--tokenizer slow needs sentencepiece (requirements.txt)")

TEMPLATES = tables.load_tables().dataset2prompt
# LongBench's chat format for each model family (no chat template in a sentencepiece tokenizer dir)
MODELS = {"longchat-v1.5-7b-32k": "vicuna", "llama2-7b-chat-4k": "llama2"}
DATASETS = ("qasper", "hotpotqa", "multifieldqa_zh", "trec", "lcc")  # trec, lcc: no chat formatting
LEGACY = (None, False)  # tokenizer_config.json without "legacy" (v4 default: True), and "legacy": false
EXAMPLE = {
    "context": "The story of a fox, 1984.\n\n  Indented  twice, then\ttab.\n    return x  +  42\n请阅读 🙂 naïve",
    "input": "What did the fox read?",
    "answers": ["a"], "length": 3, "_id": "x", "index": 0,
}  # fmt: skip


@pytest.fixture(scope="module", params=LEGACY, ids=lambda v: f"legacy={v}")
def tokenizer_dir(request, tmp_path_factory):
    return save_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"), legacy=request.param)


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def slow(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir), "slow")


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir), "fast")


def test_kinds(slow, fast, sp):
    assert isinstance(slow, SentencePieceLlamaTokenizer) and tokenizer_kind(slow) == "slow"
    assert tokenizer_kind(fast) == "fast" and not isinstance(fast, SentencePieceLlamaTokenizer)
    assert (slow.bos_token_id, slow.eos_token_id, slow.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert len(slow) == sp.get_piece_size()
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        load_tokenizer("x", "sentencepiece")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model_name", MODELS)
def test_slow_ids_are_sentencepiece_ids(slow, fast, sp, model_name, dataset):
    chat_format = resolve_chat_format("auto", slow, [model_name])
    assert chat_format == MODELS[model_name]
    text, add_special = build_prompt(slow, EXAMPLE, dataset, TEMPLATES[dataset], 10_000, chat_format)
    if dataset not in tables.NO_CHAT_DATASETS:
        assert text.startswith(f"{VICUNA_SYSTEM} USER: " if chat_format == "vicuna" else "[INST]")
    expected = [sp.bos_id()] + sp.encode(text)
    assert encode(slow, text, add_special) == expected
    # the fast (converted) tokenizer still works, and agrees on these prompts
    fast_text, fast_add_special = build_prompt(fast, EXAMPLE, dataset, TEMPLATES[dataset], 10_000, chat_format)
    assert fast_text == text and encode(fast, fast_text, fast_add_special) == expected


@pytest.mark.parametrize("model_name", MODELS)
def test_middle_truncation_counts_sentencepiece_tokens(slow, sp, model_name):
    # LongBench keeps the decoded first and last int(max_length / 2) tokens; the tokens are
    # sentencepiece's (BOS is among the first half and skipped when decoding).
    prompt = TEMPLATES["qasper"].format(**EXAMPLE)
    ids = [sp.bos_id()] + sp.encode(prompt)
    for max_length in range(20, len(ids), 7):
        half = max_length // 2
        head, tail = sp.decode(ids[1:half]), sp.decode(ids[-half:])
        truncated = truncate_middle(slow, prompt, max_length)
        # v4's slow LlamaTokenizer drops the first piece's dummy prefix and, with legacy=True,
        # sentencepiece's decoder one more leading space when that piece was whitespace only
        assert truncated.startswith(head) and truncated[len(head) :] in {tail, tail.removeprefix(" ")}
        text, _ = build_prompt(slow, EXAMPLE, "qasper", TEMPLATES["qasper"], max_length, MODELS[model_name])
        assert truncated in text
    assert truncate_middle(slow, prompt, len(ids)) == prompt


def test_decode_and_stop_tokens(slow, sp):
    text = "The fox read 42 pages.\n    return x  +  1 请 🙂"
    ids = sp.encode(text)
    assert slow.decode([sp.bos_id(), *ids, sp.eos_id()], skip_special_tokens=True) == sp.decode(ids) == text
    newline = sp.encode("\n")[-1]  # LongBench's samsum stop token: the byte-fallback piece <0x0A>
    assert sp.id_to_piece(newline) == "<0x0A>"
    config = GenerationConfig(eos_token_id=sp.eos_id())
    assert prompting.stop_token_ids(slow, config, "samsum") == [sp.eos_id(), newline]


def test_fast_drops_the_dummy_prefix_before_leading_whitespace(slow, fast, sp):
    # The converted tokenizer's Metaspace pre-tokenizer adds no "▁" when the text starts with a
    # space; sentencepiece always adds one. (LongBench's templates start with text, so its prompts
    # are not affected; any text passed to the tokenizer is.)
    text = "  two leading spaces"
    expected = [sp.bos_id()] + sp.encode(text)
    assert encode(slow, text, True) == expected
    assert encode(fast, text, True) != expected
    assert "".join(sp.id_to_piece(i) for i in expected[1:]).count("▁") == text.count(" ") + 1
    assert "".join(fast.convert_ids_to_tokens(encode(fast, text, True)[1:])).count("▁") == text.count(" ")


def test_middle_truncation_differs_when_the_tail_starts_with_whitespace(tokenizer_dir, slow, fast, sp):
    # Cut so that the kept tail starts with the whitespace-only piece "▁▁" of "is  42": v4's slow
    # LlamaTokenizer (legacy=True, the default of configs without "legacy") loses both spaces
    # there, the fast tokenizer only one: different prompt text, different ids. With
    # "legacy": false the sentencepiece model has no dummy prefix and both keep one space.
    prompt = "Read this. " + "the story of a fox who reads long documents " * 4 + "The answer is  42."
    ids = [sp.bos_id()] + sp.encode(prompt)
    pieces = [sp.id_to_piece(i) for i in ids]
    cut = len(pieces) - 1 - pieces[::-1].index("▁▁")
    assert pieces[cut + 1 :] == ["4", "2", "."] and cut > len(ids) - cut
    max_length = 2 * (len(ids) - cut)
    assert encode(fast, prompt, True) == ids  # the same tokens before the cut
    head = sp.decode(ids[1 : len(ids) - cut])
    slow_text, fast_text = truncate_middle(slow, prompt, max_length), truncate_middle(fast, prompt, max_length)
    assert fast_text == head + " 42."
    if json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("legacy", True):
        assert slow_text == head + "42."
        assert encode(slow, slow_text, True) != encode(fast, fast_text, True)
    else:
        assert slow_text == fast_text


# --- the driver ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory):
    return save_tiny_sentencepiece_model(tmp_path_factory.mktemp("tiny-spm-llama"))


def cli(model_dir, data_dir, out, *extra) -> list[str]:
    return [
        "--model_name", str(model_dir), "--dtype", "float32", "--data_dir", str(data_dir), "--output_dir", str(out),
        "--max_length", "160", "--max_new_tokens", "3", "--method", "exact", "--dataset_name", "qasper", *extra,
    ]  # fmt: skip


def settings_and_predictions(out, model_dir):
    directory = next(out.glob(f"{model_dir.name}/longbench/exact/qasper"))
    return json.loads((directory / records.SETTINGS).read_text()), records.read_records(directory / records.PREDICTIONS)


def test_driver_records_the_tokenizer_and_refuses_another(spm_model_dir, tmp_path, capsys):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 2})
    out = tmp_path / "out"
    assert longbench.main(cli(spm_model_dir, data_dir, out)) == 0  # default: slow
    assert "tokenizer slow" in capsys.readouterr().out
    settings, preds = settings_and_predictions(out, spm_model_dir)
    assert settings["tokenizer"] == "slow"
    sp = spm.SentencePieceProcessor(model_file=str(spm_model_dir / "tokenizer.model"))
    slow = load_tokenizer(str(spm_model_dir), "slow")
    examples = [json.loads(line) for line in (data_dir / "qasper.jsonl").read_text().splitlines()]
    for example, pred in zip(examples, preds, strict=True):
        text, _ = build_prompt(slow, example, "qasper", TEMPLATES["qasper"], 160, "none")
        assert pred["prompt_tokens"] == 1 + len(sp.encode(text))

    assert longbench.main(cli(spm_model_dir, data_dir, out, "--tokenizer", "fast")) == 1
    assert "other settings (differences: ['tokenizer']" in capsys.readouterr().err
    assert longbench.main(cli(spm_model_dir, data_dir, tmp_path / "fast", "--tokenizer", "fast")) == 0
    assert settings_and_predictions(tmp_path / "fast", spm_model_dir)[0]["tokenizer"] == "fast"


def test_driver_without_sentencepiece_model_says_so(tiny_model_dir, tmp_path, capsys):
    data_dir = write_longbench_data(tmp_path / "data", {"qasper": 1})
    assert longbench.main(cli(tiny_model_dir, data_dir, tmp_path / "out", "--tokenizer", "slow")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sentencepiece" in line]
    assert len(lines) == 1 and "has no sentencepiece tokenizer.model; using its only tokenizer" in lines[0]
    assert settings_and_predictions(tmp_path / "out", tiny_model_dir)[0]["tokenizer"] == "fast"


def test_smollm2_keeps_its_gguf_tokenizer(monkeypatch):
    calls = []

    class Model:
        def to(self, device):
            return self

    tokenizer = object()
    monkeypatch.setattr(generation, "load_causal_lm", lambda *a: calls.append(a) or (Model(), tokenizer))
    _, loaded = generation.load_model_and_tokenizer("smollm2", "float32", None, tokenizer="slow")
    assert loaded is tokenizer and calls[0][0] == "smollm2" and tokenizer_kind(loaded) == "fast"
