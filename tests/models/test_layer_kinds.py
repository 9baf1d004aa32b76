"""Layer kinds and attention variants beyond Llama: sliding-window layers (Mistral, Qwen2 with
``use_sliding_window``, Gemma2, GPT-OSS), logit softcapping (Gemma2), attention sinks (GPT-OSS),
and padding under attention functions other than ``"qjl"``."""

import inspect

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


def _committed_state(cache):
    """Every layer's committed key state (its tensors; None when nothing is committed)."""
    out = []
    for layer in cache.layers:
        state = layer.key_store.quantized
        out.append(None if state is None else [t for t in state if isinstance(t, torch.Tensor)])
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_under_another_attention_equals_the_qjl_path(method, attn):
    # transformers hands a cache's update() no attention mask; models.cache_kwargs' forward pre-hook
    # shows it the mask, so padding stays out of outlier choice, norms and scales under any attention.
    ids = tokens(2, 90)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # unaligned left padding: pads share a block with real tokens
    chunks = [40] + [1] * 50  # commits at 64 (and the prompt's 32)

    def run(implementation):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        cache = _cache(method, model, **SMALL)
        return step_logits(model, cache, ids, chunks, attention_mask=mask), cache

    other, other_cache = run(attn)
    qjl, qjl_cache = run(models.ATTN_IMPLEMENTATION)
    real = mask.bool()
    torch.testing.assert_close(other[real], qjl[real], rtol=1e-3, atol=1e-3)
    # The first layer's keys are the same numbers on both paths (later layers' differ by rounding
    # of the attention above them): its committed state, padding excluded, must be identical.
    got, want = _committed_state(other_cache)[0], _committed_state(qjl_cache)[0]
    assert got is not None and want is not None, "nothing was committed: the comparison would test nothing"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_without_the_mask_hook_is_refused(method):
    # A cache passed straight to the model (not through models.cache_kwargs) never sees the mask
    # under SDPA: a batch is refused, naming the fix; one sequence runs.
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = tokens(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with pytest.raises(ValueError, match="cache_kwargs"):
        model(input_ids=ids, attention_mask=mask, **{name: _cache(method, model, **SMALL)})
    model(input_ids=ids[1:, 7:], **{name: _cache(method, model, **SMALL)})


def test_a_mask_that_does_not_cover_the_cache_is_refused():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = tokens(2, 30)
    cache = _cache("qjl", model, **SMALL)
    step_logits(model, cache, ids[:, :20], [20], attention_mask=torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, 30\]"):  # a mask of the new tokens only
        model(input_ids=ids[:, 20:], attention_mask=torch.ones(2, 10, dtype=torch.long),
              **models.cache_kwargs(model, cache))


def test_padded_generate_under_sdpa_equals_the_qjl_path():
    ids = tokens(2, 50)
    mask = torch.ones_like(ids)
    mask[0, :11] = 0

    def generate(implementation):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        cache = _cache("qjl", model, **SMALL)
        return model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                              **models.cache_kwargs(model, cache))

    assert torch.equal(generate("sdpa"), generate(models.ATTN_IMPLEMENTATION))


@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_a_model_that_slides_on_every_layer_reports_exact_bits(method):
    # Nothing is compressed there, yet the bits came from the configuration (QJL 7.02, KIVI 3.00)
    # while the bytes were exact's.
    model = SLIDING_MODELS["mistral"]()
    cache = models.make_cache(method, model.config, models.QJLConfig(group_size=16, buffer_size=32))
    exact = exact_cache(model)
    with torch.no_grad():
        for c in (cache, exact):
            model(input_ids=tokens(1, 3 * WINDOW), use_cache=True, **models.cache_kwargs(model, c))
    report = models.memory_report(cache)
    assert report.bits_per_channel == 32.0  # the float32 model's exact tensors
    assert report.nbytes == models.memory_report(exact).nbytes


def test_perplexity_bits_count_the_compressed_layers_only():
    # perplexity.py averaged over every layer, exact sliding ones (32 bits on a float32 model)
    # included, while exact reported the fp16 baseline: an all-sliding model gave QJL 32, exact 16.
    import perplexity

    sweep = {c.name: c for c in perplexity.default_sweep(2, group_size=16, buffer_size=32)}
    for name, arch in (("qjl-paper", "mistral"), ("kivi-2", "mistral"), ("kivi-2", "gemma2")):
        model = SLIDING_MODELS[arch]()
        cache = models.make_cache(sweep[name].method, model.config, sweep[name].qjl)
        with torch.no_grad():
            model(input_ids=tokens(1, 3 * WINDOW), use_cache=True, **models.cache_kwargs(model, cache))
            model(input_ids=tokens(1, 1), use_cache=True, **models.cache_kwargs(model, cache))
        fields = perplexity.memory_fields(sweep[name], cache)
        if arch == "mistral":  # nothing compressed: the fp16 baseline, as for exact
            assert fields["kv_bits_per_channel"] == 16.0
        else:  # gemma2: the full-attention layers' bits, as memory_report counts them
            assert fields["kv_bits_per_channel"] == models.memory_report(cache).bits_per_channel < 16
