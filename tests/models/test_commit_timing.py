"""When compressed caches commit, and what may be undone: block timing against a port of the
original code, crop (assisted / prompt-lookup decoding), and the memory report before any commit."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import models
from qjl_kernel.reference import dequantize_values_ref, exact_scores, gqa_weighted_sum, quantize_values_ref
from tiny import exact_cache, step_logits, tiny_model, tokens

BUFFER = 32
PORT = "qjl_original_port"
QJL = models.QJLConfig(key_quantization_bits=128, key_quantization_bits_initial_layers=128, outlier_count_general=4,
                       outlier_count_initial_layers=4, outlier_sketch_dim_general=64,
                       outlier_sketch_dim_initial_layers=64, value_quantization_bits=2, buffer_size=BUFFER)
METHODS = ["qjl", "kivi"]


def make_cache(method, model):
    if method == "qjl":
        return models.QJLCache(model.config, QJL)
    return models.KIVICache(model.config, 2, 32, BUFFER)


class OriginalLayer:
    """One layer of the original's decode procedure (amirzandieh/QJL, ``models/llama2_utils_qjl.py``
    ``QJLKeyQuantizer.build_sketch / update_sketch / attention_score`` and the value handling of
    ``models/llama2_qjl.py``), one token per step, with this project's key format and value
    quantizer. ``update_sketch`` commits the residual when ``seq_len % buffer_size == 0``, before
    ``attention_score``; values are quantized one by one once the window exceeds ``buffer_size``,
    after the step's attention."""

    def __init__(self, key_format, value_bits):
        self.key_format, self.value_bits = key_format, value_bits
        self.blocks, self.key_residual, self.seq_len = [], None, 0
        self.values_quant, self.values_full = None, None

    def _quantize_values(self, values):
        if self.value_bits == 16:
            return values.float()
        return dequantize_values_ref(quantize_values_ref(values, 32, self.value_bits))

    def _commit(self, keys):
        valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
        self.blocks.append(self.key_format.quantize(keys, valid))

    def build_sketch(self, keys, values):
        self.seq_len = n = keys.shape[2]
        residual = n % BUFFER
        if residual:
            self.key_residual = keys[:, :, n - residual:]
        if n - residual:
            self._commit(keys[:, :, : n - residual])
        if n <= BUFFER or self.value_bits == 16:
            self.values_full = values
        else:
            self.values_quant, self.values_full = self._quantize_values(values[:, :, :-BUFFER]), values[:, :, -BUFFER:]

    def update_sketch(self, key):
        self.seq_len += 1
        self.key_residual = key if self.key_residual is None else torch.cat([self.key_residual, key], dim=2)
        if self.seq_len % BUFFER == 0:
            self._commit(self.key_residual)
            self.key_residual = None

    def attention_score(self, query):
        scores = [self.key_format.scores(block, query) for block in self.blocks]
        if self.key_residual is not None:
            scores.append(exact_scores(query, self.key_residual))
        return torch.cat(scores, dim=-1)

    def decode(self, query, key, value, scaling):
        assert query.shape[2] == 1, "the original appends one token per step"
        self.update_sketch(key)
        probs = torch.softmax(self.attention_score(query) * scaling, dim=-1)
        self.values_full = torch.cat([self.values_full, value], dim=2)
        full = self.values_full.shape[2]
        output = gqa_weighted_sum(probs[..., -full:], self.values_full)
        if self.values_quant is not None:
            output = output + gqa_weighted_sum(probs[..., :-full], self.values_quant)
        if self.value_bits != 16 and full > BUFFER:
            oldest = self._quantize_values(self.values_full[:, :, :1])
            self.values_quant = oldest if self.values_quant is None else torch.cat([self.values_quant, oldest], 2)
            self.values_full = self.values_full[:, :, 1:]
        return output


class OriginalPort:
    """An attention function running :class:`OriginalLayer` per layer beside a DynamicCache (which
    only drives positions; the port keeps its own state from the step's new keys and values)."""

    def __init__(self, key_formats, value_bits):
        self.layers = [OriginalLayer(f, value_bits) for f in key_formats]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = self.layers[module.layer_idx]
        length = query.shape[2]
        if key.shape[2] == length:  # the prompt: exact attention, then build_sketch
            layer.build_sketch(key, value)
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        output = layer.decode(query, key[:, :, -length:], value[:, :, -length:], scaling)
        return output.transpose(1, 2).to(query.dtype), None


@torch.no_grad()
def original_logits(model, method, ids, prompt):
    formats = [layer.key_store for layer in make_cache(method, model).layers]
    AttentionInterface.register(PORT, OriginalPort(formats, value_bits=2))
    AttentionMaskInterface.register(PORT, sdpa_mask)
    model.set_attn_implementation(PORT)
    try:
        return step_logits(model, exact_cache(model), ids, [prompt] + [1] * (ids.shape[1] - prompt))
    finally:
        model.set_attn_implementation(models.ATTN_IMPLEMENTATION)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prompt", [31, 40, 64])
def test_block_timing_follows_the_original(method, prompt):
    # The query that completes a block (position p with (p + 1) % B == 0) sees that block, its own
    # key included, through the compressed form, as in the original; a multi-token step applies
    # the same rule row by row, also when a row inside it completes a block.
    model = tiny_model()
    ids = tokens(2, prompt + 80)
    original = original_logits(model, method, ids, prompt)[:, prompt:]
    one_by_one = step_logits(model, make_cache(method, model), ids, [prompt] + [1] * 80)[:, prompt:]
    torch.testing.assert_close(one_by_one, original, rtol=1e-4, atol=1e-4)
    first = (prompt // BUFFER + 2) * BUFFER - 1 - prompt  # a step whose last row completes a block
    chunked = step_logits(model, make_cache(method, model), ids, [prompt, first, 1, 79 - first])[:, prompt:]
    torch.testing.assert_close(chunked, original, rtol=1e-4, atol=1e-4)


def _feed(model, cache, ids, mask, start, end, draft=None):
    """Feed ``ids[:, start:end]`` (followed by ``draft`` tokens, all valid) through ``model``; the
    float32 logits of the ``ids`` part."""
    step, step_mask = ids[:, start:end], mask[:, :end]
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:end]
    if draft is not None:
        step = torch.cat([step, draft], 1)
        step_mask = torch.cat([step_mask, torch.ones_like(draft)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(draft.shape[1])], 1)
    out = model(input_ids=step, attention_mask=step_mask, position_ids=positions, use_cache=True,
                **models.cache_kwargs(model, cache))
    return out.logits[:, : end - start].float()


def _assert_same_state(layer, reference):
    for a, b in ((layer.key_store, reference.key_store), (layer.value_store, reference.value_store)):
        sizes = ("num_committed", "num_residual") if a is layer.key_store else ("num_quantized", "num_window")
        assert [getattr(a, n) for n in sizes] == [getattr(b, n) for n in sizes]
    assert torch.equal(layer.key_store.residual_valid, reference.key_store.residual_valid)
    # Keys of the same tokens computed in steps of other lengths may differ in the last bits.
    torch.testing.assert_close(layer.key_store.residual, reference.key_store.residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.value_store.window, reference.value_store.window, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_rejected_drafts_are_cropped_without_a_trace(method):
    # A left-padded batch; steps carry draft tokens that are rejected and cropped, some of them
    # completing a block or pushing values out of the window. Afterwards the cache must equal one
    # that never saw them: logits, committed keys, residual + validity mask, quantized values, window.
    model = tiny_model()
    ids = tokens(2, 150)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    drafts = tokens(2, 40, seed=5)
    bounds = [0, 40, 61, 62, 63, 64, 90, 127, 150]
    # Drafts after positions 60, 63 and 126 complete blocks; 33 and 37 > buffer_size push values out.
    draft_lengths = [0, 6, 3, 1, 33, 2, 37, 4]
    clean, cropped = make_cache(method, model), make_cache(method, model)
    for start, end, drafted in zip(bounds, bounds[1:], draft_lengths):
        expected = _feed(model, clean, ids, mask, start, end)
        draft = drafts[:, :drafted] if drafted else None
        got = _feed(model, cropped, ids, mask, start, end, draft)
        cropped.crop(-drafted)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert cropped.get_seq_length() == clean.get_seq_length() == end
        for layer, reference in zip(cropped.layers, clean.layers):
            _assert_same_state(layer, reference)


def test_crop_arguments_and_committed_tokens():
    model = tiny_model()
    cache = make_cache("qjl", model)
    step_logits(model, cache, tokens(1, 70), [70])
    cache.crop(0)
    assert cache.get_seq_length() == 70
    cache.crop(68)  # earlier transformers releases: the length to keep
    assert cache.get_seq_length() == 68
    step_logits(model, cache, tokens(1, 3), [3])  # the next update commits 64 keys and quantizes 36 values
    keys, values = cache.layers[0].key_store, cache.layers[0].value_store
    assert (keys.num_committed, values.num_quantized, cache.is_croppable) == (64, 36, True)
    # 7 keys are in the residual, but only 3 values beyond the newest buffer_size are exact
    with pytest.raises(ValueError, match="only the newest 3 are still held exactly"):
        cache.crop(-4)
    cache.crop(-3)
    assert cache.get_seq_length() == 68


def _greedy(model, method, ids, **kwargs):
    cache = make_cache(method, model)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False,
                         **models.cache_kwargs(model, cache), **kwargs)
    return out, cache


@pytest.mark.parametrize("method", METHODS)
def test_assisted_and_prompt_lookup_decoding_equal_greedy_decoding(method):
    # Greedy assisted decoding returns the tokens of greedy decoding; here across two block
    # boundaries, with drafts rejected and cropped (another random model) or long runs accepted
    # (the model itself with an exact cache). The prompt (6 tokens + at most 20 drafts in the
    # first, exact, verification step) stays below buffer_size - 1, where nothing is compressed yet.
    model = tiny_model()
    ids = torch.cat([tokens(1, 3, seed=3)] * 2, 1)
    greedy, _ = _greedy(model, method, ids)
    other = tiny_model(layers=1, seed=4)
    other.generation_config.num_assistant_tokens = 4
    other.generation_config.num_assistant_tokens_schedule = "constant"
    for name, assistant in {"other model": other, "exact self": model}.items():
        assisted, cache = _greedy(model, method, ids, assistant_model=assistant)
        assert torch.equal(assisted, greedy), name
        assert cache.layers[0].key_store.num_committed >= 2 * BUFFER
    lookup, _ = _greedy(model, method, ids, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, greedy)


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.bfloat16, 16)])
def test_memory_report_before_any_commit_counts_exact_tensors(dtype, bits):
    # A prompt within buffer_size: everything is held exact, so bits per channel are the dtype's.
    model = tiny_model(dtype=dtype)
    for cache in (make_cache("qjl", model), make_cache("kivi", model)):
        step_logits(model, cache, tokens(1, 22), [20, 1, 1])
        report = models.memory_report(cache)
        assert report.bits_per_channel == bits
        assert all(l.key_bits_per_channel == l.value_bits_per_channel == bits for l in report.layers)
        assert report.nbytes == report.fp16_nbytes * bits // 16
