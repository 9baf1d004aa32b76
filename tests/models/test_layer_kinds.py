"""Layer kinds and attention variants beyond Llama: sliding-window layers (Mistral, Qwen2 with
``use_sliding_window``, Gemma2, GPT-OSS), logit softcapping (Gemma2), attention sinks (GPT-OSS),
and padding under attention functions other than ``"qjl"``."""

import pytest
import torch

import models
from tiny import exact_cache, step_logits, tiny_model, tokens

WINDOW = 16
# buffer_size covers every sequence below: nothing is compressed, so the cache must equal DynamicCache
COVERING = dict(buffer_size=256, value_quantization_bits=16)
# a small buffer: the full-attention layers compress
SMALL = dict(buffer_size=32, key_quantization_bits=256, key_quantization_bits_initial_layers=256,
             value_quantization_bits=2)

SLIDING_MODELS = {
    "mistral": lambda: tiny_model("mistral", sliding_window=WINDOW),  # every layer slides
    "qwen2": lambda: tiny_model("qwen2", layers=3, use_sliding_window=True, max_window_layers=1,
                                sliding_window=WINDOW),  # full, sliding, sliding
    "gemma2": lambda: tiny_model("gemma2", layers=4, sliding_window=WINDOW),  # sliding, full, ...; softcap
    "gpt_oss": lambda: tiny_model("gpt_oss", layers=4, sliding_window=WINDOW),  # sliding, full, ...; sinks
}
METHODS = ["qjl", "kivi"]


def _cache(method, model, **config):
    return models.make_cache(method, model.config, models.QJLConfig(**config))


def _held(layer):
    return layer.memory().nbytes


@pytest.mark.parametrize("arch", list(SLIDING_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_sliding_layers_hold_the_window_only(arch, method):
    model = SLIDING_MODELS[arch]()
    ids = tokens(2, 100)
    cache = _cache(method, model, **COVERING) if method == "qjl" else \
        models.KIVICache(model.config, 2, 32, 256)
    got = step_logits(model, cache, ids, [40] + [1] * 60)
    exact = exact_cache(model)
    torch.testing.assert_close(got, step_logits(model, exact, ids, [40] + [1] * 60), rtol=1e-4, atol=1e-4)
    assert cache.is_sliding == exact.is_sliding and any(cache.is_sliding)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    for layer, reference in zip(cache.layers, exact.layers):
        if layer.is_sliding:
            # what DynamicCache holds: the newest WINDOW - 1 tokens, exact
            assert _held(layer) == 2 * 2 * heads * (WINDOW - 1) * dim * 4  # fp32 keys + values, batch 2
            assert _held(layer) == reference.keys.nbytes + reference.values.nbytes
    report = models.memory_report(cache)
    assert report.nbytes == sum(_held(layer) for layer in cache.layers)


@pytest.mark.parametrize("arch", list(SLIDING_MODELS))
@pytest.mark.parametrize("lookup", [None, 4])
def test_generate_matches_dynamic_cache(arch, lookup):
    # lookup: prompt-lookup decoding, which crops rejected drafts from the sliding layers past the window
    model = SLIDING_MODELS[arch]()
    ids = tokens(1, 30)
    ids = torch.cat([ids, ids[:, :15]], dim=1)  # repeats for prompt lookup to draft from
    outs = []
    for cache in (exact_cache(model), _cache("qjl", model, **COVERING)):
        outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                   prompt_lookup_num_tokens=lookup, **models.cache_kwargs(model, cache)))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_mixed_model_compresses_full_layers_only():
    # 5 sliding : 1 full, as Gemma3; at 512 tokens the sliding layers hold WINDOW - 1 tokens each
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    model = tiny_model("qwen2", layers=6, layer_types=layer_types, use_sliding_window=True, sliding_window=WINDOW,
                       init=0.05, dtype=torch.bfloat16)
    ids = tokens(1, 512)
    cache = _cache("qjl", model, **SMALL)
    step_logits(model, cache, ids, [500] + [1] * 12)
    exact = exact_cache(model)
    step_logits(model, exact, ids, [500] + [1] * 12)
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    assert [isinstance(layer, models.cache.CompressedLayer) for layer in cache.layers] == \
        [kind == "full_attention" for kind in layer_types]
    assert cache.layers[full[0]].key_store.num_committed >= 480
    ours, theirs = models.memory_report(cache), models.memory_report(exact)
    assert ours.fp16_nbytes == theirs.nbytes  # both count what a bf16 DynamicCache holds
    sliding_bytes = sum(_held(layer) for layer in cache.layers if layer.is_sliding)
    assert sliding_bytes == sum(l.keys.nbytes + l.values.nbytes for l in exact.layers if l.is_sliding)
    assert ours.nbytes - sliding_bytes < 0.4 * (theirs.nbytes - sliding_bytes)
    assert ours.bits_per_channel < 8  # the compressed part only


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_exact_cache_under_qjl_attention_equals_eager(arch):
    # The "qjl" attention runs non-compressed caches too: with a softcap or sinks it must be the
    # model's eager attention, not SDPA (which has neither).
    model = SLIDING_MODELS[arch]()
    ids = tokens(2, 60)
    chunks = [40] + [1] * 20
    qjl = step_logits(model, exact_cache(model), ids, chunks)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(qjl, step_logits(model, exact_cache(model), ids, chunks), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_softcap_and_sinks_in_the_compressed_path(arch):
    # Compressed full-attention layers: the composed path (softcap before the mask, sink logits in
    # the softmax) must equal the model's eager attention over the cache's key estimates k_hat and
    # dequantized values (what the cache returns under another attention function; the same
    # scores for one-token steps).
    model = SLIDING_MODELS[arch]()
    ids = tokens(1, 110)
    chunks = [70] + [1] * 40
    qjl = step_logits(model, _cache("qjl", model, **SMALL), ids, chunks)
    model.set_attn_implementation("eager")
    eager = step_logits(model, _cache("qjl", model, **SMALL), ids, chunks)
    torch.testing.assert_close(qjl, eager, rtol=1e-3, atol=1e-3)
    # multi-token steps (composed path, row by row) give what one-token steps give
    model.set_attn_implementation(models.ATTN_IMPLEMENTATION)
    chunked = step_logits(model, _cache("qjl", model, **SMALL), ids, [70, 30] + [1] * 10)
    torch.testing.assert_close(chunked, qjl, rtol=1e-4, atol=1e-4)


def test_softcap_changes_the_compressed_scores():
    # guards the test above against a softcap that never reaches the composed path
    model = SLIDING_MODELS["gemma2"]()
    ids = tokens(1, 110)
    chunks = [70] + [1] * 40
    with_cap = step_logits(model, _cache("qjl", model, **SMALL), ids, chunks)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.5  # tiny cap: scores squashed to +-0.5
    capped = step_logits(model, _cache("qjl", model, **SMALL), ids, chunks)
    assert (capped[:, 70:] - with_cap[:, 70:]).abs().max() > 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_under_another_attention_is_refused(method):
    # Under SDPA / eager the cache never sees the attention mask (transformers 5.17 passes update()
    # nothing, 5.24 position_ids only), so padding would be quantized with real tokens: refused.
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = tokens(2, 50)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with pytest.raises(ValueError, match="attn_implementation='qjl'"):
        step_logits(model, _cache(method, model, **SMALL), ids, [40] + [1] * 10, attention_mask=mask)
    # one sequence at a time still runs, and equals the "qjl" path
    sdpa = step_logits(model, _cache(method, model, **SMALL), ids[1:, 7:], [33] + [1] * 10)
    model.set_attn_implementation(models.ATTN_IMPLEMENTATION)
    qjl = step_logits(model, _cache(method, model, **SMALL), ids[1:, 7:], [33] + [1] * 10)
    torch.testing.assert_close(sdpa, qjl, rtol=1e-3, atol=1e-3)
