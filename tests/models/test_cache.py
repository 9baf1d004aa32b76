"""QJLCache / KIVICache end to end on tiny random models (no downloads).

Logit errors are reported as relative errors ||logits - exact|| / ||exact - mean(exact)|| per
position. Random tiny models have sharp attention (||q|| ||k|| / sqrt(d) ~ 10-20), so they are
far more sensitive to key error than trained LLMs; bounds below are set from measurements with
margin and the measured numbers are in the comments.
"""

import warnings

import pytest
import torch

import models
from tiny import exact_cache, step_logits, tiny_model, tokens

NO_OUTLIERS = dict(outlier_count_general=0, outlier_count_initial_layers=0, outlier_sketch_dim_general=0,
                   outlier_sketch_dim_initial_layers=0)


def sketch_config(m, *, value_bits=16, buffer_size=64, **kwargs):
    return models.QJLConfig(key_quantization_bits=m, key_quantization_bits_initial_layers=m, buffer_size=buffer_size,
                            value_quantization_bits=value_bits, **{**NO_OUTLIERS, **kwargs})


def relative_error(logits, reference):
    return (logits - reference).norm(dim=-1) / (reference - reference.mean(-1, keepdim=True)).norm(dim=-1)


def test_prompt_within_buffer_is_exact():
    model = tiny_model()
    ids = tokens(2, 60)
    chunks = [40] + [1] * 20  # 60 tokens < buffer_size: nothing is ever compressed
    exact = step_logits(model, exact_cache(model), ids, chunks)
    for cache in (models.QJLCache(model.config, models.QJLConfig()), models.KIVICache(model.config)):
        torch.testing.assert_close(step_logits(model, cache, ids, chunks), exact, rtol=1e-4, atol=1e-4)
        assert cache.layers[0].key_store.num_committed == 0


def _decode_errors(model, config, prompt=256, steps=32):
    ids = tokens(1, prompt + steps)
    chunks = [prompt] + [1] * steps  # teacher-forced decode after a compressed prompt
    exact = step_logits(model, exact_cache(model), ids, chunks)[:, prompt:]
    cache = config if isinstance(config, models.KIVICache) else models.QJLCache(model.config, config)
    got = step_logits(model, cache, ids, chunks)[:, prompt:]
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    return relative_error(got, exact), agree


def test_large_sketch_stays_close_to_exact():
    model = tiny_model(head_dim=64)
    large, agree = _decode_errors(model, sketch_config(16 * 64))
    small, _ = _decode_errors(model, sketch_config(2 * 64))
    # measured: m = 16d mean 0.11 / max 0.18, greedy agreement 0.82; m = 2d mean 0.33
    assert large.mean() < 0.2 and large.max() < 0.35, large
    assert agree >= 0.7, agree
    assert large.mean() < 0.6 * small.mean()


def test_paper_configuration_error_is_bounded():
    model = tiny_model(head_dim=128)
    error, agree = _decode_errors(model, models.QJLConfig())
    print(f"paper configuration: relative logit error mean {error.mean():.3f} max {error.max():.3f}, "
          f"greedy agreement {agree:.2f}")
    # measured: mean 0.67, max 1.03 (an untrained model with sharp attention)
    assert error.mean() < 1.0 and error.max() < 1.6


@pytest.mark.parametrize("bits,bound", [(4, 0.25), (2, 0.9)])  # measured mean: 4-bit 0.09, 2-bit 0.52
def test_kivi_stays_close_to_exact(bits, bound):
    model = tiny_model(head_dim=64)
    error, _ = _decode_errors(model, models.KIVICache(model.config, bits, 32, 64))
    assert error.mean() < bound, error.mean()


@pytest.mark.parametrize("method", ["qjl", "kivi"])
@pytest.mark.parametrize("value_bits", [2, 16])
def test_multi_token_step_equals_one_by_one(method, value_bits):
    model = tiny_model(kv_heads=1, heads=4)
    ids = tokens(2, 170)
    config = sketch_config(128, value_bits=value_bits, buffer_size=32, outlier_count_general=4,
                           outlier_sketch_dim_general=64, outlier_count_initial_layers=4,
                           outlier_sketch_dim_initial_layers=64)

    def make():
        if method == "qjl":
            return models.QJLCache(model.config, config)
        return models.KIVICache(model.config, 2, 32, 32)

    # 100-token prompt (96 committed), then 70 tokens in one step: the step crosses two buffer
    # boundaries and the value window slides by 70.
    together = step_logits(model, make(), ids, [100, 70])[:, 100:]
    one_by_one = step_logits(model, make(), ids, [100] + [1] * 70)[:, 100:]
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)
    split = step_logits(model, make(), ids, [100, 30, 1, 39])[:, 100:]
    torch.testing.assert_close(split, one_by_one, rtol=1e-4, atol=1e-4)


def _left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def _batch_logits(model, make_cache, prompts, steps=12, pad_id=0):
    """Teacher-forced logits of a left-padded batch, from the last prompt token on."""
    cont = tokens(len(prompts), steps, seed=9)
    ids, mask = _left_pad(prompts, pad_id)
    ids = torch.cat([ids, cont], 1)
    mask = torch.cat([mask, torch.ones_like(cont)], 1)
    width = ids.shape[1] - steps
    return step_logits(model, make_cache(), ids, [width] + [1] * steps, attention_mask=mask)[:, width - 1:]


def _batch_vs_alone(model, make_cache, prompts, steps=12):
    """Teacher-forced logits for a left-padded batch and for each prompt alone (same continuation)."""
    cont = tokens(len(prompts), steps, seed=9)
    ids, mask = _left_pad(prompts)
    ids = torch.cat([ids, cont], 1)
    mask = torch.cat([mask, torch.ones_like(cont)], 1)
    width = ids.shape[1] - steps
    batch = step_logits(model, make_cache(), ids, [width] + [1] * steps, attention_mask=mask)[:, width - 1:]
    alone = []
    for row, p in enumerate(prompts):
        seq = torch.cat([p, cont[row]])[None]
        alone.append(step_logits(model, make_cache(), seq, [len(p)] + [1] * steps)[:, len(p) - 1:])
    return batch, torch.cat(alone)


def _cache_factory(model, method):
    config = sketch_config(256, value_bits=2, buffer_size=32, outlier_count_general=4, outlier_sketch_dim_general=64,
                           outlier_count_initial_layers=4, outlier_sketch_dim_initial_layers=64)
    return lambda: models.make_cache(method, model.config, config)


@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_padding_aligned_to_buffers_does_not_change_anything(method):
    # Pads of 0 / 32 / 64 tokens fill whole buffers: each prompt's tokens are grouped, committed and
    # quantized exactly as when run alone, so any leak of padding would show as a difference.
    model = tiny_model(heads=8, kv_heads=1)  # GQA, 8 query heads per KV head
    prompts = [tokens(1, n, seed=n)[0] for n in (100, 68, 36)]
    batch, alone = _batch_vs_alone(model, _cache_factory(model, method), prompts)
    torch.testing.assert_close(batch, alone, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_padding_content_never_leaks(method):
    # Unaligned padding: pad tokens share groups with real tokens. Whatever the pad tokens are, the
    # outlier choice, norms, scales and scores of real tokens must not change.
    model = tiny_model(heads=8, kv_heads=2)
    prompts = [tokens(1, n, seed=n)[0] for n in (90, 57, 23)]
    make = _cache_factory(model, method)
    torch.testing.assert_close(_batch_logits(model, make, prompts, pad_id=0),
                               _batch_logits(model, make, prompts, pad_id=41), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "qjl", "kivi"])
def test_padded_batch_matches_prompts_alone(method):
    model = tiny_model(heads=8, kv_heads=2)
    prompts = [tokens(1, n, seed=n)[0] for n in (90, 57, 23)]
    batch, alone = _batch_vs_alone(model, _cache_factory(model, method), prompts)
    if method == "exact":
        torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-4)
        return
    # Unaligned padding shifts group boundaries, so the batch differs from each prompt alone by
    # about the method's own error: compare both to exact attention on each prompt alone.
    exact_batch, exact_alone = _batch_vs_alone(model, lambda: exact_cache(model), prompts)
    own = relative_error(alone, exact_alone).mean()
    batched = relative_error(batch, exact_alone).mean()
    assert batched < 2 * own + 0.02, (batched, own)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 1)])
def test_architectures(arch, heads, kv_heads):
    # Mistral without a sliding window: with one, every layer keeps its window exactly (test_layer_kinds.py)
    extra = {"sliding_window": None} if arch == "mistral" else {}
    model = tiny_model(arch, heads=heads, kv_heads=kv_heads, init=0.05, **extra)
    ids = tokens(1, 150)
    exact = step_logits(model, exact_cache(model), ids, [130] + [1] * 20)[:, 130:]
    got = step_logits(model, models.QJLCache(model.config, sketch_config(1024, buffer_size=32)), ids,
                      [130] + [1] * 20)[:, 130:]
    assert relative_error(got, exact).mean() < 0.3


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_dims_and_dtypes(head_dim, dtype):
    model = tiny_model(head_dim=head_dim, heads=2, kv_heads=1, dtype=dtype, init=0.04)
    ids = tokens(1, 80)
    config = models.QJLConfig(buffer_size=32, initial_layers_count=1)
    cache = models.QJLCache(model.config, config)
    got = step_logits(model, cache, ids, [70] + [1] * 10)[:, 70:]
    exact = step_logits(model, exact_cache(model), ids, [70] + [1] * 10)[:, 70:]
    assert torch.isfinite(got).all()
    assert relative_error(got, exact).mean() < 0.5
    assert cache.layers[0].key_store.quantized.inlier_norms.dtype == torch.float32  # whatever the keys' dtype


def test_other_attention_gets_key_estimates_with_the_same_scores():
    # Under SDPA the cache returns k_hat (whose dot products equal the QJL scores) and dequantized
    # values, so decode steps give the same logits as the "qjl" attention.
    model = tiny_model()
    ids = tokens(1, 120)
    config = sketch_config(128, value_bits=2, buffer_size=32)
    chunks = [90] + [1] * 30
    qjl = step_logits(model, models.QJLCache(model.config, config), ids, chunks)[:, 90:]
    model.set_attn_implementation("sdpa")
    sdpa = step_logits(model, models.QJLCache(model.config, config), ids, chunks)[:, 90:]
    torch.testing.assert_close(sdpa, qjl, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make_cache", [lambda c, q: models.QJLCache(c, q), lambda c, q: models.KIVICache(c, bits=2, buffer_size=32)])
def test_multi_token_steps_under_another_attention_warn(make_cache):
    # transformers' attention functions take one key / value tensor for every row of a step, so under
    # SDPA a step's later rows see the state as its first row does, not row by row as under "qjl"
    # (it used to differ silently: NLL up to 0.7 off one-by-one on a tiny model).
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    config = sketch_config(128, value_bits=2, buffer_size=32)
    ids = tokens(1, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt and one-token steps: row by row already
        step_logits(model, make_cache(model.config, config), ids[:, :50], [40] + [1] * 10)
    with pytest.warns(UserWarning, match="every row of the step sees the keys and values as its first row"):
        step_logits(model, make_cache(model.config, config), ids, [40, 40])


def test_output_attentions_under_the_qjl_attention_warns():
    # The "qjl" attention returns no weights; transformers' output then held none without a word.
    model = tiny_model()
    cache = models.QJLCache(model.config, sketch_config(128, value_bits=2, buffer_size=32))
    ids = tokens(1, 41)
    kwargs = models.cache_kwargs(model, cache)
    with torch.no_grad():
        model(input_ids=ids[:, :40], use_cache=True, **kwargs)
        with pytest.warns(UserWarning, match="returns no attention weights"):
            model(input_ids=ids[:, 40:], use_cache=True, output_attentions=True, **kwargs)


def test_handle_under_another_attention_is_a_clear_error():
    model = tiny_model()
    config_says_qjl = model.config
    model_runs_sdpa = tiny_model()
    model_runs_sdpa.set_attn_implementation("sdpa")
    cache = models.QJLCache(config_says_qjl, models.QJLConfig())
    with pytest.raises(TypeError, match="attn_implementation='qjl'"):
        step_logits(model_runs_sdpa, cache, tokens(1, 8), [8])


def test_generate_with_qjl_cache():
    model = tiny_model()
    ids = tokens(2, 40)
    cache = models.QJLCache(model.config, sketch_config(128, value_bits=2, buffer_size=32))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                         **models.cache_kwargs(model, cache))
    assert out.shape == (2, 70)
    assert cache.get_seq_length() == 69  # the last generated token is never fed back
    assert cache.layers[0].key_store.num_committed == 64


def test_memory_report_and_savings_for_the_paper_configuration():
    # 32 layers (15 with the initial budget), head_dim 128, bf16: the paper's Llama-2 layout.
    model = tiny_model(head_dim=128, heads=2, kv_heads=2, layers=32, dtype=torch.bfloat16, init=0.02)
    ids = tokens(1, 2048)
    qjl = models.QJLCache(model.config, models.QJLConfig())
    exact = exact_cache(model)
    step_logits(model, qjl, ids, [2048])
    step_logits(model, exact, ids, [2048])
    for layer in qjl.layers:
        layer.settle()  # the prompt's blocks are committed at the start of the next update
    report = models.memory_report(qjl)
    heads, dim, tokens_ = 2, 128, 2048
    expected = 0
    for layer in range(32):
        m, m_o = (512, 128) if layer < 15 else (256, 256)
        keys = heads * tokens_ * (m // 8 + m_o // 8 + 2 * 4) + heads * (tokens_ // 32) * 8  # float32 norms
        values = heads * (tokens_ - 128) * (dim * 2 // 8 + 2 * 2 * dim // 32) + heads * 128 * dim * 2
        expected += keys + values
    assert report.nbytes == expected
    exact_bytes = models.memory_report(exact).nbytes
    assert exact_bytes == 32 * 2 * heads * tokens_ * dim * 2 == report.fp16_nbytes
    assert exact_bytes / report.nbytes >= 3.5, exact_bytes / report.nbytes
    assert report.bits_per_channel == pytest.approx(qjl.bit_report().kv_bits_per_channel)
    assert "layer" in report.format()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(head_dim=300), "head_dim must be in"),
        (dict(qjl=dict(group_size=48, buffer_size=96)), "group_size"),
        (dict(qjl=dict(outlier_count_general=100)), "outlier_count_general"),
    ],
)
def test_bad_construction(kwargs, match):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=kwargs.get("head_dim", 64), num_hidden_layers=2)
    with pytest.raises(ValueError, match=match):
        models.QJLCache(config, models.QJLConfig(**kwargs.get("qjl", {})))


def test_bad_config_values():
    with pytest.raises(ValueError, match="buffer_size"):
        models.QJLConfig(buffer_size=100)
    with pytest.raises(ValueError, match="key_quantization_bits"):
        models.QJLConfig(key_quantization_bits=250)
    with pytest.raises(ValueError, match="method must be one of"):
        models.make_cache("fp8", tiny_model().config)
    for method in ("qjl", "kivi"):
        with pytest.raises(TypeError, match="qjl_config must be a QJLConfig"):
            models.make_cache(method, tiny_model().config, {"buffer_size": 64})
    with pytest.raises(TypeError, match="qjl_config must be a QJLConfig"):
        models.QJLCache(tiny_model().config, {"buffer_size": 64})


@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_a_cache_for_another_model_is_refused_at_its_first_step(method):
    """A cache built from another model's config fails at the first update, naming what differs
    (it was an IndexError deep in transformers for more layers, and for another head dim an error
    about the projection only when the prompt's first block was committed)."""
    model = tiny_model(layers=4)
    fewer_layers = models.make_cache(method, tiny_model(layers=2).config)
    with pytest.raises(ValueError, match="this cache has 2 layers but the model updates layer 2"):
        model(input_ids=tokens(1, 8), use_cache=True, **models.cache_kwargs(model, fewer_layers))
    other_dim = models.make_cache(method, tiny_model(head_dim=128, layers=4).config)
    with pytest.raises(ValueError, match="built for head_dim 128 but the model's keys have head_dim 64"):
        model(input_ids=tokens(1, 8), use_cache=True, **models.cache_kwargs(model, other_dim))


def test_a_model_instead_of_its_config_is_a_clear_error():
    model = tiny_model()
    for build in (lambda: models.QJLCache(model), lambda: models.KIVICache(model),
                  lambda: models.make_cache("qjl", model)):
        with pytest.raises(TypeError, match=r"pass model.config, not the model"):
            build()
    with pytest.raises(TypeError, match="a transformers model config, got NoneType"):
        models.QJLCache(None)
    with pytest.raises(TypeError, match="cache_kwargs takes the model"):
        models.cache_kwargs(object(), models.make_cache("qjl", model.config))
    with pytest.raises(TypeError, match="cache_kwargs takes a transformers Cache"):
        models.cache_kwargs(model, {"past_key_values": None})


def test_quanto_method():
    if not models.quanto_available():
        pytest.skip("optimum-quanto is not installed (pip install optimum-quanto)")
    model = tiny_model()
    cache = models.make_cache("quanto", model.config, models.QJLConfig(value_quantization_bits=4))
    assert torch.isfinite(step_logits(model, cache, tokens(1, 40), [30] + [1] * 10)).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bits=0), ValueError, r"bits must be one of \(2, 4\)"),
        (dict(bits=3), ValueError, r"bits must be one of \(2, 4\)"),
        (dict(bits=2.0), TypeError, "bits must be an int"),
        (dict(group_size=0), ValueError, "positive group_size"),
        (dict(buffer_size=48), ValueError, "multiple"),
        (dict(buffer_size=True), TypeError, "buffer_size must be an int"),
    ],
)
def test_bad_kivi_construction(kwargs, error, match):
    # bits=0 used to raise ZeroDivisionError
    with pytest.raises(error, match=match):
        models.KIVICache(tiny_model(layers=1).config, **kwargs)


def _mla_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    )


def _t5_config():
    from transformers import T5Config

    return T5Config(d_model=64, d_kv=32, num_heads=2, num_layers=2, d_ff=64, vocab_size=97)


def _split_head_dims_config():
    config = tiny_model(layers=1).config
    config.v_head_dim = 32  # keys of head_dim 64, values of 32
    return config


@pytest.mark.parametrize(
    "make_config,match",
    [(_mla_config, "latent attention"), (_t5_config, "encoder-decoder"), (_split_head_dims_config, "v_head_dim")],
)
@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_attention_the_cache_cannot_serve_fails_when_built(make_config, match, method):
    # MLA used to build fine and fail in forward with an error about the handle's `.shape`
    with pytest.raises(ValueError, match=match):
        models.make_cache(method, make_config(), models.QJLConfig(group_size=16, buffer_size=32))


@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_batch_select_accepts_a_bool_mask(method):
    model = tiny_model()
    ids = tokens(3, 50)
    config = sketch_config(128, value_bits=2, buffer_size=32)
    # transformers passes index tensors or bool masks (DynamicLayer indexes keys[indices, ...])
    logits = []
    for keep in (torch.tensor([True, False, True]), torch.tensor([0, 2]), [0, 2], slice(0, 3, 2)):
        cache = models.make_cache(method, model.config, config)
        step_logits(model, cache, ids[:, :40], [40])
        cache.batch_select_indices(keep)
        assert cache.layers[0].key_store.residual.shape[0] == 2
        logits.append(_continue(model, cache, ids[::2, 40:]))  # the kept rows decode on
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=0)
    with pytest.raises(IndexError, match="bool batch mask"):
        cache.batch_select_indices(torch.tensor([True, False, True]))


@torch.no_grad()
def _continue(model, cache, ids):
    out = []
    for t in range(ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **models.cache_kwargs(model, cache)).logits)
    return torch.cat(out, dim=1)


def test_handle_answers_attribute_probes():
    # torch.compile, copy and pickling probe dunders and private names with hasattr / getattr
    model = tiny_model(layers=1)
    handle = models.cache.CompressedState(models.QJLCache(model.config, models.QJLConfig()).layers[0])
    assert not hasattr(handle, "__array_priority__")
    assert not hasattr(handle, "_dynamo_marked_static")
    assert getattr(handle, "shape", None) is None
    with pytest.raises(TypeError, match="attn_implementation='qjl'"):
        handle.shape
    with pytest.raises(AttributeError):
        handle.dtype


def test_factory_refuses_what_is_not_a_filled_cache():
    # prefilled_cache from an empty prompt cache failed on `None.shape` inside update; memory_report(None)
    # was an AttributeError.
    model = tiny_model()
    with pytest.raises(ValueError, match="the prompt cache holds no tokens"):
        models.prefilled_cache("qjl", model.config, models.QJLConfig(), exact_cache(model))
    with pytest.raises(TypeError, match="prompt must be the transformers Cache"):
        models.prefilled_cache("qjl", model.config, models.QJLConfig(), None)
    with pytest.raises(TypeError, match="memory_report takes a transformers Cache"):
        models.memory_report(None)


def test_memory_report_counts_what_the_cache_allocated():
    # The bytes counted only the data, while the growable buffers reserve up to twice it (the
    # quantized values double on the first decode step): the CPU memory figure overstated QJL's
    # saving ~1.5x against the GPU's allocation-based one.
    model = tiny_model()
    cache = models.QJLCache(model.config, sketch_config(128, value_bits=2, buffer_size=32))
    step_logits(model, cache, tokens(1, 100), [90] + [1] * 10)
    report = models.memory_report(cache)
    buffers = 0
    for layer in cache.layers:
        keys, values = layer.key_store, layer.value_store
        buffers += sum(b.numel() * b.element_size() for b in keys._committed._buffers + values._quantized._buffers)
        buffers += sum(t.numel() * t.element_size() for t in (keys.residual, keys.residual_valid, values.window))
    sketches = {id(layer.key_store.sketch): layer.key_store.sketch for layer in cache.layers}
    buffers += sum(t.numel() * t.element_size() for s in sketches.values() for t in s.tensors())
    assert report.allocated == buffers > report.nbytes
    assert "allocated" in report.format()
