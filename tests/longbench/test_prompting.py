"""Prompt rules: middle truncation, chat formatting, stop tokens, prompt budget, dataset lists."""

import pytest
from longbench_tiny import CHAT_TEMPLATE, byte_tokenizer
from transformers import GenerationConfig

from longbench_eval import prompting, tables
from longbench_eval.prompting import VICUNA_SYSTEM, build_prompt, encode, resolve_chat_format, truncate_middle

TEMPLATES = tables.load_tables().dataset2prompt
EXAMPLE = {"context": "CTX", "input": "Q?", "answers": ["a"], "length": 3, "_id": "x", "index": 0}


@pytest.fixture(scope="module")
def plain():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat():
    return byte_tokenizer(CHAT_TEMPLATE)


def test_truncate_middle(plain):
    # "abcdefghij" -> [<s>, a, ..., j]: 11 ids > 6; half = 3: first 3 ids [<s>, a, b] decode (special
    # tokens skipped) to "ab", last 3 to "hij"
    assert truncate_middle(plain, "abcdefghij", 6) == "abhij"
    assert truncate_middle(plain, "abcdefghij", 7) == "abhij"  # half = int(7 / 2) = 3
    assert truncate_middle(plain, "abcde", 6) == "abcde"  # 6 ids fit: unchanged
    assert truncate_middle(plain, "abcdefghij", 11) == "abcdefghij"


def test_chat_template_tokenizer(chat):
    assert resolve_chat_format("auto", chat, ["longchat-v1.5-7b-32k"]) == "tokenizer"  # template wins
    text, add_special = build_prompt(chat, EXAMPLE, "hotpotqa", TEMPLATES["hotpotqa"], 10_000, "tokenizer")
    prompt = TEMPLATES["hotpotqa"].format(**EXAMPLE)
    assert text == f"<s><|user|>{prompt}<|assistant|>" and add_special is False
    ids = encode(chat, text, add_special)
    assert ids[0] == chat.bos_token_id and ids.count(chat.bos_token_id) == 1  # the template's BOS only


def test_no_template_longchat_uses_vicuna(plain):
    fmt = resolve_chat_format("auto", plain, ["longchat-v1.5-7b-32k", "lmsys/longchat-7b-v1.5-32k"])
    assert fmt == "vicuna"
    text, add_special = build_prompt(plain, EXAMPLE, "qasper", TEMPLATES["qasper"], 10_000, fmt)
    assert text == f"{VICUNA_SYSTEM} USER: {TEMPLATES['qasper'].format(**EXAMPLE)} ASSISTANT:"
    assert add_special is True and encode(plain, text, add_special)[0] == plain.bos_token_id


def test_other_name_rules(plain):
    assert resolve_chat_format("auto", plain, ["llama2-7b-chat-4k"]) == "llama2"
    assert resolve_chat_format("auto", plain, ["my-base-model"]) == "none"
    text, _ = build_prompt(plain, EXAMPLE, "qasper", TEMPLATES["qasper"], 10_000, "llama2")
    assert text == f"[INST]{TEMPLATES['qasper'].format(**EXAMPLE)}[/INST]"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_chat_format("tokenizer", plain, ["x"])


@pytest.mark.parametrize("dataset", ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"])
def test_few_shot_and_code_tasks_skip_chat(chat, dataset):
    text, add_special = build_prompt(chat, EXAMPLE, dataset, TEMPLATES[dataset], 10_000, "tokenizer")
    assert text == TEMPLATES[dataset].format(**EXAMPLE) and add_special is True


def test_truncation_happens_before_chat_formatting(plain):
    example = dict(EXAMPLE, context="x" * 500)
    prompt = TEMPLATES["qasper"].format(**example)
    text, _ = build_prompt(plain, example, "qasper", TEMPLATES["qasper"], 100, "vicuna")
    # the template is cut to 50 + 50 tokens (one byte each, BOS among the first 50), then wrapped
    assert text == f"{VICUNA_SYSTEM} USER: {prompt[:49] + prompt[-50:]} ASSISTANT:"


def test_stop_tokens(plain):
    config = GenerationConfig(eos_token_id=plain.eos_token_id)
    newline = plain.encode("\n", add_special_tokens=False)[-1]
    assert prompting.stop_token_ids(plain, config, "qasper") == [plain.eos_token_id]
    assert prompting.stop_token_ids(plain, config, "samsum") == [plain.eos_token_id, newline]
    both = GenerationConfig(eos_token_id=[7, plain.eos_token_id])
    assert prompting.stop_token_ids(plain, both, "qasper") == [7, plain.eos_token_id]


def test_model_names_and_prompt_budget():
    lb = tables.load_tables()
    key = tables.resolve_model("longchat-v1.5-7b-32k", lb.model2path)
    assert key == tables.ModelSpec("longchat-v1.5-7b-32k", "lmsys/longchat-7b-v1.5-32k")
    assert tables.resolve_model("lmsys/longchat-7b-v1.5-32k", lb.model2path) == key  # hub id -> LongBench key
    local = tables.resolve_model("/models/longchat-7b-v1.5-32k/", lb.model2path)
    assert local.key == "longchat-7b-v1.5-32k"
    assert tables.prompt_budget(key, lb.model2maxlen, 32768)[0] == 31500
    assert tables.prompt_budget(local, lb.model2maxlen, 32768)[0] == 31500  # by directory name
    assert tables.prompt_budget(tables.resolve_model("meta-llama/Llama-2-7b-chat-hf", lb.model2path),
                                lb.model2maxlen, 4096)[0] == 3500  # fmt: skip
    unknown = tables.resolve_model("/tmp/tiny", lb.model2path)
    assert tables.prompt_budget(unknown, lb.model2maxlen, 4096)[0] == 3596  # 4096 - 500
    assert tables.prompt_budget(unknown, lb.model2maxlen, 256)[0] == 128  # small models: half
    assert tables.prompt_budget(key, lb.model2maxlen, 32768, override=64) == (64, "--max_length")
    with pytest.raises(ValueError, match="--max_length"):
        tables.prompt_budget(unknown, lb.model2maxlen, None)


def test_tables_and_dataset_selection():
    lb = tables.load_tables()
    synthetic = set(tables.synthetic_datasets())
    assert synthetic == {"passkey", "multikey", "stdlib_lcc", "stdlib_niah", "stdlib_niah_multikey"}
    assert set(lb.dataset2prompt) == set(lb.dataset2maxlen) == set(tables.LONGBENCH_DATASETS) | synthetic
    assert tables.select_datasets(["synthetic", "passkey", "qasper"], False) == ["passkey", "multikey", "qasper"]
    assert tables.select_datasets(["stdlib"], False) == ["stdlib_lcc", "stdlib_niah", "stdlib_niah_multikey"]
    with pytest.raises(ValueError, match="unknown LongBench-E dataset 'passkey'"):
        tables.select_datasets(["passkey"], True)
    assert lb.dataset2maxlen["gov_report"] == 512 and lb.dataset2maxlen["hotpotqa"] == 32
    assert tables.select_datasets(["all"], True) == list(tables.LONGBENCH_E_DATASETS)
    assert len(tables.select_datasets(None, False)) == 21
    assert tables.select_datasets(["qasper,trec", "qasper"], False) == ["qasper", "trec"]
    with pytest.raises(ValueError, match="unknown LongBench-E dataset 'lsht'"):
        tables.select_datasets(["lsht"], True)
