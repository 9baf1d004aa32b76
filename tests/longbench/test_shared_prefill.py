"""One exact prefill shared by every method gives the tokens and caches of separate runs."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny import tiny_model, tokens  # noqa: E402

import models  # noqa: E402
from longbench_eval import generation  # noqa: E402
from models import QJLConfig  # noqa: E402

# Small sketches and buffers, so a 300-token prompt commits several blocks.
CONFIG = QJLConfig(
    key_quantization_bits=64, key_quantization_bits_initial_layers=128, initial_layers_count=1,
    outlier_sketch_dim_general=64, outlier_sketch_dim_initial_layers=64, buffer_size=64,
)  # fmt: skip


class IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids.tolist())


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.mark.parametrize("method", ["exact", "qjl", "kivi"])
@pytest.mark.parametrize("prompt_length", [300, 64, 20])
def test_generation_after_a_shared_prefill_equals_a_separate_run(model, method, prompt_length):
    ids = tokens(1, prompt_length, seed=prompt_length)[0].tolist()
    with torch.no_grad():
        separate = generation.generate(model, IdsTokenizer(), ids, method, CONFIG, 30, [0])
        shared = generation.prefill(model, ids, [0])
        after = generation.generate_after_prefill(model, IdsTokenizer(), shared, method, CONFIG, 30, [0])
    assert after.text == separate.text and after.new_tokens == separate.new_tokens > 1
    assert after.memory == separate.memory


def test_the_prefill_cache_is_left_unchanged_for_the_next_method(model):
    ids = tokens(1, 200, seed=9)[0].tolist()
    with torch.no_grad():
        shared = generation.prefill(model, ids, [0])
        before = [(layer.keys.clone(), layer.values.clone()) for layer in shared.cache.layers]
        for method in ("qjl", "kivi", "exact"):
            generation.generate_after_prefill(model, IdsTokenizer(), shared, method, CONFIG, 10, [0])
    assert shared.cache.get_seq_length() == 200
    for (k, v), layer in zip(before, shared.cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_stop_token_first_and_one_new_token(model):
    ids = tokens(1, 100, seed=4)[0].tolist()
    with torch.no_grad():
        first = generation.generate(model, IdsTokenizer(), ids, "qjl", CONFIG, 1, [0]).text
        stop = int(first)
        separate = generation.generate(model, IdsTokenizer(), ids, "qjl", CONFIG, 8, [stop])
        shared = generation.prefill(model, ids, [stop])
        after = generation.generate_after_prefill(model, IdsTokenizer(), shared, "qjl", CONFIG, 8, [stop])
        # min_new_tokens forbids stopping at once, as generate does
        separate_min = generation.generate(model, IdsTokenizer(), ids, "qjl", CONFIG, 8, [stop], min_new_tokens=2)
        shared_min = generation.prefill(model, ids, [stop], min_new_tokens=2)
        after_min = generation.generate_after_prefill(model, IdsTokenizer(), shared_min, "qjl", CONFIG, 8, [stop], 2)
        one = generation.generate_after_prefill(model, IdsTokenizer(), generation.prefill(model, ids, [0]), "qjl",
                                                CONFIG, 1, [0])  # fmt: skip
    assert shared.stopped and (after.text, after.new_tokens) == (separate.text, separate.new_tokens) == (first, 1)
    assert not shared_min.stopped and after_min.text == separate_min.text and after_min.new_tokens >= 2
    assert (one.text, one.new_tokens) == (first, 1)


def test_prefilled_cache_equals_the_prompt_step(model):
    ids = tokens(1, 200, seed=2)
    with torch.no_grad():
        prompt = models.make_cache("exact", model.config)
        model(ids, **models.cache_kwargs(model, prompt))
        loaded = models.prefilled_cache("qjl", model.config, CONFIG, prompt)
        direct = models.make_cache("qjl", model.config, CONFIG)
        model(ids, **models.cache_kwargs(model, direct))
    assert loaded.memory_report() == direct.memory_report()
    for a, b in zip(loaded.layers, direct.layers):
        a.settle()  # what the next update does first
        b.settle()
        assert a.key_store.num_committed == b.key_store.num_committed == 192
        assert torch.equal(a.key_store.residual, b.key_store.residual)
        assert torch.equal(a.dense_values(), b.dense_values())
