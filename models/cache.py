"""Compressed KV caches for transformers: QJL (keys) and KIVI (keys), both with grouped low-bit values.

Storage policy (both methods, docs/DESIGN.md sections 1 and 3): keys wait in an exact residual buffer and are
committed in blocks of ``buffer_size`` tokens; the newest ``buffer_size`` values stay exact and
older ones are quantized per token. Only full-attention layers are compressed: sliding-window
layers keep their window exactly (:class:`ExactSlidingWindowLayer`).

Semantics of a step of ``L`` new tokens at positions ``p0 .. p0 + L - 1``:
- the first step (``p0 = 0``, the prompt) is exact attention (SDPA) over full-precision keys and
  values;
- later steps use the compressed state; a query at position ``p`` sees keys below
  ``floor((p + 1) / buffer_size) * buffer_size`` through their compressed form and values older
  than ``p - buffer_size`` quantized. As in the original code (amirzandieh/QJL, which commits a
  block in ``update_sketch`` before ``attention_score``), the query that completes a block sees
  the whole block, its own key included, compressed. Multi-token steps (chunked prefill,
  speculative verification) apply that rule row by row, so they give the same result as feeding
  the tokens one by one.

Commits (keys into the compressed store, values out of the window) happen at the start of the
next update, never during a step: a step's attention scores a block it completes through the
block's compressed form computed on the fly. So the tokens of the last step are still exact and
can be removed again (:meth:`CompressedLayer.crop`, used by assisted / speculative decoding).
"""

from __future__ import annotations

import sys
import warnings

import torch
from transformers import Cache, PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import qjl_kernel
from qjl_kernel.ops import decode_attention_unchecked
from qjl_kernel.reference import gqa_weighted_sum

from .accounting import qjl_bit_report
from .config import QJLConfig
from .memory import LayerMemory, MemoryReport
from .key_store import KeyStore, QJLKeyStore
from .kivi import KIVIKeyStore
from .sketch import QJLSketch
from .value_store import ValueStore

ATTN_IMPLEMENTATION = "qjl"
KIVI_BITS = (2, 4)  # bits of KIVI keys and values


# What a compressed layer knows about padding when no forward pre-hook showed it the mask.
NOT_OBSERVED = object()

MULTI_TOKEN_STEP_WARNING = (
    "a multi-token step (chunked prefill, assisted or speculative verification) through a compressed "
    "cache under an attention function other than '" + ATTN_IMPLEMENTATION + "': every row of the step "
    "sees the keys and values as its first row does (transformers' attention functions take one key and "
    "value tensor for all rows), so rows that complete a key block or push a value out of the exact window "
    "differ from feeding the tokens one by one. Load the model with attn_implementation='" + ATTN_IMPLEMENTATION
    + "' (after `import models`) for the row-by-row rule"
)


class CompressedStateMisuse(AttributeError, TypeError):
    """Another attention function read a tensor attribute of a :class:`CompressedState`. An
    AttributeError so that ``hasattr`` / ``getattr(..., default)`` probes (``torch.compile``,
    ``copy``, pickling) see a plain missing attribute; a TypeError for what it means to a user."""


class CompressedState:
    """What a compressed layer's ``update`` returns (as both keys and values) when the model runs
    the ``"qjl"`` attention function: a handle to the layer, which computes attention itself."""

    __slots__ = ("layer",)

    def __init__(self, layer: "CompressedLayer") -> None:
        self.layer = layer

    def __getattr__(self, name):
        if name.startswith("_"):  # dunder and private probes: just not there
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise CompressedStateMisuse(
            f"an attention function read `.{name}` of a compressed KV cache handle. Compressed caches "
            f"(QJLCache, KIVICache) return handles only when the model config they were built with says "
            f"attn_implementation={ATTN_IMPLEMENTATION!r}; this model runs another attention function. Load "
            f"the model with attn_implementation={ATTN_IMPLEMENTATION!r} (after `import models`), or build the "
            f"cache from the model's own config (model.config) so that it returns dequantized tensors instead."
        )


def key_validity(attention_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """bool ``[B, T]``: which key positions are real tokens (not padding), from a 4D mask
    ``[B or 1, 1, L, T]`` (bool, True = attend, or additive float). None when there is no mask."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :tokens]  # the newest query attends to every valid key
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, tokens)


def _step_mask(attention_mask: torch.Tensor | None, tokens: int):
    """The 4D mask ``[B or 1, 1, L, >= T]`` as bool ``[B or 1, L, T]`` (True = attend) for the
    fused op; None without a mask (the op applies the causal rule); False when the mask carries
    additive biases other than 0 / -inf, which only the composed path applies."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0, :, :tokens]
    if mask.dtype == torch.bool:
        return mask
    allowed = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[allowed] != 0).any()):
        return False
    return allowed


def _masked_fill_value() -> float:
    # A finite minimum keeps fully masked rows (queries at padding positions) finite after softmax.
    return torch.finfo(torch.float32).min


def eager_attention(module, query, key, value, attention_mask, scaling, dropout: float = 0.0, **kwargs):
    """Exact attention through the eager attention function of ``module``'s own modeling file
    (what the model runs under ``attn_implementation="eager"``): it applies the model's logit
    softcap (Gemma2: ``softcap``) and attention sinks (GPT-OSS: ``module.sinks``), which SDPA
    lacks. Boolean masks (the ``"qjl"`` masks) become additive ones, and a missing mask (transformers
    skips causal masks SDPA can infer) becomes the causal one. Returns ``([B, L, H_q, d], weights)``."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"{type(module).__name__} asks for a logit softcap or attention sinks, and its modeling file "
            f"({type(module).__module__}) has no eager_attention_forward to compute them with"
        )
    length, total = query.shape[2], key.shape[2]
    if attention_mask is None and length > 1:
        positions = total - length + torch.arange(length, device=query.device)
        attention_mask = torch.arange(total, device=query.device)[None, :] <= positions[:, None]
        attention_mask = attention_mask[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's compressed KV state: a key store and a value store."""

    is_compileable = False
    is_croppable = True  # the tokens of the last step (see crop)
    is_sliding = False
    supports_early_init = False

    def __init__(self, key_store: KeyStore, value_store: ValueStore, returns_handles,
                 observed_padding=lambda: NOT_OBSERVED) -> None:
        super().__init__()
        self.key_store = key_store
        self.value_store = value_store
        self._returns_handles = returns_handles  # () -> bool: is the "qjl" attention running?
        # () -> bool [B, T] key validity of the running forward pass, None (no padding) or
        # NOT_OBSERVED: what models.cache_kwargs' hook saw (_CompressedCache.observe_attention_mask)
        self._observed_padding = observed_padding

    # --- transformers' layer API --------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H_kv, L, d]`` keys and values; return handles (``"qjl"`` attention) or
        key/value tensors standing in for the compressed state (any other attention)."""
        if key_states.shape[2] == 0:
            raise ValueError(
                "a compressed cache step must add at least one token (got keys of shape "
                f"{tuple(key_states.shape)}): feed a non-empty input_ids"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        returns_handles = self._returns_handles()
        start = self.key_store.seq_len
        valid = None if returns_handles else self._observed_validity(key_states, start)
        self.settle()
        self.key_store.append(key_states, valid)
        self.value_store.append(value_states)
        if returns_handles:
            handle = CompressedState(self)
            return handle, handle
        # The step's first row sees keys below floor((start + 1) / B) * B compressed (exact for
        # one-token steps; the prompt step is exact); later rows get the same tensors.
        buffer = self.key_store.buffer_size
        if start and self._later_rows_see_more_compressed(start, key_states.shape[2]):
            warnings.warn(MULTI_TOKEN_STEP_WARNING, UserWarning, stacklevel=2)
        return self.dense_keys(((start + 1) // buffer) * buffer if start else 0), self.dense_values()

    def _later_rows_see_more_compressed(self, start: int, length: int) -> bool:
        """Whether a row after the first of a step of ``length`` tokens from position ``start`` (already
        appended) sees keys or values compressed that the first row sees exact: a row completes a key
        block, or the window holds a value that a later row sees quantized."""
        buffer = self.key_store.buffer_size
        return (start + length) // buffer > (start + 1) // buffer or self._later_rows_quantize_window_values()

    def _later_rows_quantize_window_values(self) -> bool:
        """Whether a row after the step's first sees some of the window's values (already appended)
        quantized: the window holds more than ``buffer_size`` values besides the newest."""
        values = self.value_store
        return values.bits != 16 and values.num_window - 1 > values.buffer_size

    def _observed_validity(self, key_states: torch.Tensor, start: int) -> torch.Tensor | None:
        """bool ``[B, L]``: which of the step's new tokens are real, under an attention function
        other than ``"qjl"`` (which hands the mask to :meth:`attend` instead). transformers gives
        ``update`` no attention mask (5.17: nothing; 5.24: position_ids), so the mask comes from
        the forward pre-hook :func:`models.cache_kwargs` installs; without it a batch is refused,
        because padding would enter outlier choice, norms and scales."""
        batch, length = key_states.shape[0], key_states.shape[2]
        observed = self._observed_padding()
        if observed is NOT_OBSERVED:
            if batch == 1:
                return None  # one sequence: no padding
            raise ValueError(
                f"a compressed cache serves a batch of {batch} sequences under an attention function other than "
                f"{ATTN_IMPLEMENTATION!r} only when it can see the attention mask: pass it to the model with "
                f"`**models.cache_kwargs(model, cache)` (which shows it the mask of every forward pass), or load "
                f"the model with attn_implementation={ATTN_IMPLEMENTATION!r} (after `import models`), or feed one "
                f"sequence at a time. Otherwise padding tokens would be quantized with the real ones"
            )
        if observed is None:
            return None
        if observed.shape[0] != batch or observed.shape[1] != start + length:
            raise ValueError(
                f"the attention mask of this forward pass has shape {tuple(observed.shape)}, but the compressed "
                f"cache holds {start} tokens and the step adds {length} for {batch} sequences: a 2D padding mask "
                f"must cover the cached and the new tokens, [batch, {start + length}]"
            )
        return observed[:, start:].to(key_states.device)

    def get_seq_length(self) -> int:
        return self.key_store.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_store.clear()
        self.value_store.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.key_store.reorder_batch(beam_idx)
        self.value_store.reorder_batch(beam_idx)

    def batch_select_indices(self, indices) -> None:
        """Keep the batch rows ``indices`` selects: an index tensor or list, a slice, or a bool
        mask ``[B]`` (what transformers passes; DynamicLayer indexes ``keys[indices, ...]``)."""
        residual = self.key_store.residual
        if residual is None:
            return
        device = indices.device if isinstance(indices, torch.Tensor) else residual.device
        if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool and indices.shape != (residual.shape[0],):
            raise IndexError(f"a bool batch mask must have shape ({residual.shape[0]},), got {tuple(indices.shape)}")
        self.reorder_cache(torch.arange(residual.shape[0], device=device)[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.key_store.residual.shape[0] if self.key_store.residual is not None else 0
        if batch:
            self.reorder_cache(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens: ``crop(-n)`` removes ``n`` and ``crop(0)`` nothing (transformers'
        convention); a positive argument is the number of tokens to keep (the convention of earlier
        transformers releases). Only tokens still held exactly can go: keys in the residual buffer,
        values in the exact window. Commits wait for the next update, so the tokens of the last step
        (a draft that verification rejects) can always be removed."""
        total = self.get_seq_length()
        count = -tokens_to_remove if tokens_to_remove <= 0 else total - tokens_to_remove
        count = min(count, total)
        if count <= 0 or not self.is_initialized:
            return
        if count > self.num_croppable():
            raise ValueError(
                f"cannot remove {count} tokens from a compressed cache: only the newest {self.num_croppable()} "
                f"are still held exactly; older ones are committed to the compressed store, from which tokens "
                f"cannot be removed"
            )
        self.key_store.crop(count)
        self.value_store.crop(count)

    def num_croppable(self) -> int:
        """How many of the newest tokens :meth:`crop` can remove: keys still in the residual buffer,
        and values such that the newest ``buffer_size`` left afterwards are all still exact."""
        keys, values = self.key_store, self.value_store
        if values.bits == 16 or values.num_quantized == 0:
            return keys.num_residual
        return min(keys.num_residual, values.num_window - values.buffer_size)

    def offload(self):
        raise NotImplementedError("offloading is not supported by compressed caches")

    # --- attention ------------------------------------------------------------------------------
    def attend(self, module, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               **kwargs) -> torch.Tensor:
        """Attention of ``query`` ``[B, H_q, L, d]`` (the step's new tokens, already appended)
        over this layer's state. Returns ``[B, L, H_q, d]`` in the query's dtype. ``kwargs`` are the
        model's attention kwargs: ``softcap`` (Gemma2's ``softcap * tanh(scores / softcap)``) and
        ``s_aux`` (GPT-OSS attention sinks, one logit per query head in the softmax denominator)
        are applied."""
        keys, values = self.key_store, self.value_store
        batch, _, length, _ = query.shape
        total = keys.seq_len
        start = total - length  # position of the first new token
        valid = key_validity(attention_mask, batch, total)
        if valid is not None:
            keys.residual_valid[:, -length:] = valid[:, -length:]
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        if start == 0:
            # The prompt: exact attention over full-precision keys and values (the model's eager
            # function where SDPA cannot apply a softcap or sinks).
            if softcap is None and sinks is None:
                output, _ = sdpa_attention_forward(
                    module, query, keys.residual, values.window, attention_mask, scaling=scaling
                )
            else:
                output, _ = eager_attention(module, query, keys.residual, values.window, attention_mask, scaling,
                                            **kwargs)
        else:
            output = self._attend_compressed(query, attention_mask, scaling, start, softcap, sinks).transpose(1, 2)
        return output.to(query.dtype).contiguous()

    def _attend_compressed(self, query, attention_mask, scaling, start, softcap=None, sinks=None) -> torch.Tensor:
        if softcap is None and sinks is None:  # the fused op has neither
            fused = self._attend_fused(query, attention_mask, scaling, start)
            if fused is not None:
                return fused
        return self._attend_composed(query, attention_mask, scaling, start, softcap, sinks)

    def _attend_fused(self, query, attention_mask, scaling, start) -> torch.Tensor | None:
        """The step through the fused op :func:`qjl_kernel.decode_attention`, when every row sees
        the state as stored: no row completes a block (true for most one-token steps) and a mask
        that is boolean or 0/-inf. None otherwise (the composed path then applies the row-by-row
        rule)."""
        keys, values = self.key_store, self.value_store
        length, total = query.shape[2], keys.seq_len
        if ((start + length) // keys.buffer_size) * keys.buffer_size > keys.num_committed:
            return None  # a row that completes a block sees residual keys compressed
        if self._later_rows_quantize_window_values():
            return None  # a row past the first sees the oldest window values quantized
        mask = _step_mask(attention_mask, total)
        if mask is False:
            return None
        committed, projection, exact_keys = keys.fused_parts()
        return decode_attention_unchecked(
            query, committed, projection, exact_keys, values.quantized, values.window, mask, float(scaling)
        )

    def _attend_composed(self, query, attention_mask, scaling, start, softcap=None, sinks=None) -> torch.Tensor:
        keys, values = self.key_store, self.value_store
        length = query.shape[2]
        device = query.device
        positions = start + torch.arange(length, device=device)  # [L]

        committed = keys.committed_scores(query)
        recent = keys.residual_scores(query)  # [B, H_q, L, R]
        # Blocks completed by this step are still in the residual (commits wait for the next
        # update): the rows at and after a block's last token see it compressed, on the fly.
        first, buffer = keys.num_committed, keys.buffer_size
        crossed = ((start + length) // buffer) * buffer - first
        if crossed > 0:
            state = keys.quantize(keys.residual[:, :, :crossed], keys.residual_valid[:, :crossed])
            compressed = keys.scores(state, query)
            cols = first + torch.arange(crossed, device=device)
            use = cols[None, :] < ((positions + 1) // buffer * buffer)[:, None]  # [L, crossed]
            recent[..., :crossed] = torch.where(use, compressed, recent[..., :crossed])
        scores = recent if committed is None else torch.cat([committed, recent], dim=-1)
        scores = scores * scaling
        if softcap is not None:  # Gemma2, before masking as in its eager attention
            scores = softcap * torch.tanh(scores / softcap)

        total = scores.shape[-1]
        if attention_mask is None:
            if length > 1:
                causal = torch.arange(total, device=device)[None, :] <= positions[:, None]
                scores = scores.masked_fill(~causal, _masked_fill_value())
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :total], _masked_fill_value())
        else:
            scores = (scores + attention_mask[..., :total].float()).clamp_min(_masked_fill_value())
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:  # GPT-OSS: a per-head logit that joins the softmax denominator and is then dropped
            sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, length, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]

        n_quantized = values.num_quantized
        output = gqa_weighted_sum(probs[..., n_quantized:], values.window)
        if n_quantized:
            output = output + qjl_kernel.value_matmul(probs[..., :n_quantized], values.quantized)
        # Rows past the first see the oldest window values quantized (they left the window).
        if values.bits != 16:
            window_before = values.num_window - length
            n_fix = length - 1 + window_before - values.buffer_size
            if n_fix > 0:
                exact = values.window[:, :, :n_fix]
                delta = qjl_kernel.dequantize_values(values.quantize(exact)) - exact.float()
                rows = torch.arange(length, device=device)[:, None] + window_before - values.buffer_size
                use = torch.arange(n_fix, device=device)[None, :] < rows  # [L, n_fix]
                weights = probs[..., n_quantized : n_quantized + n_fix] * use
                output = output + gqa_weighted_sum(weights, delta)
        return output

    # --- state ------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Commit complete key buffers and quantize values that left the window."""
        self.key_store.commit()
        self.value_store.trim()

    def dense_keys(self, compressed: int = 0) -> torch.Tensor:
        """``[B, H_kv, T, d]``: compressed keys as stand-in tensors + the exact residual; the
        residual keys below position ``compressed`` (complete blocks) also as stand-ins."""
        keys = self.key_store
        parts = [keys.dequantized(), keys.residual]
        pending = compressed - keys.num_committed
        if pending > 0:
            state = keys.quantize(keys.residual[:, :, :pending], keys.residual_valid[:, :pending])
            parts[1:] = [keys.dequantize_state(state), keys.residual[:, :, pending:]]
        return torch.cat([p.to(self.dtype) for p in parts if p is not None], dim=2)

    def dense_values(self) -> torch.Tensor:
        quantized = self.value_store.quantized
        parts = [None if quantized is None else qjl_kernel.dequantize_values(quantized), self.value_store.window]
        return torch.cat([p.to(self.dtype) for p in parts if p is not None], dim=2)

    def memory(self) -> LayerMemory:
        keys, values = self.key_store, self.value_store
        residual = keys.residual
        shape = residual.shape if residual is not None else None
        channels = shape[0] * shape[1] * shape[3] if shape is not None else 0
        # Bits of the compressed part; while nothing is compressed, of the exact tensors held.
        if keys.num_committed:
            key_bits = 8 * keys.committed_nbytes() / (channels * keys.num_committed)
        else:
            key_bits = 8 * residual.element_size() if keys.num_residual else None
        if values.num_quantized:
            value_bits = 8 * values.quantized_nbytes() / (channels * values.num_quantized)
        else:
            value_bits = 8 * values.window.element_size() if values.num_window else None
        fp16 = 2 * 2 * channels * keys.seq_len
        return LayerMemory(key_bits, value_bits, keys.nbytes() + values.nbytes(), fp16,
                           keys.allocated_nbytes() + values.allocated_nbytes())


class ExactSlidingWindowLayer(DynamicSlidingWindowLayer):
    """A sliding-attention layer of a compressed cache (Mistral with ``sliding_window``, the local
    layers of Gemma2/3, GPT-OSS, Qwen2 with ``use_sliding_window``): transformers'
    :class:`DynamicSlidingWindowLayer`, which keeps the newest ``sliding_window - 1`` keys and
    values exactly, as DynamicCache does, plus a memory report.

    Why exact rather than compressed within the window: such a layer never holds more than the
    window, whatever the context, so at long context the full-attention layers hold nearly all of
    the memory and compressing them is what the method is about (the paper evaluates full-attention
    Llama models). Compressing inside the window would drop QJL groups as they leave it, at group
    granularity, and would need masks offset to the first group held; exact keys and values there
    also give the sliding layers exact attention. The price: a model whose every layer is sliding
    (Mistral v0.1, window 4096) is stored exactly, like DynamicCache, up to the window.
    Under the ``"qjl"`` attention these layers run SDPA (the model's eager attention when it asks
    for a softcap or sinks) on the window."""

    def memory(self) -> LayerMemory:
        held = [t for t in (self.keys, self.values) if t is not None and t.numel()]
        nbytes = sum(t.numel() * t.element_size() for t in held)
        bits = 8 * held[0].element_size() if held else None
        return LayerMemory(bits, bits, nbytes, sum(2 * t.numel() for t in held), compressed=False)


def layer_windows(config: PreTrainedConfig) -> list[int | None]:
    """Per decoder layer of ``config`` (the text config): its sliding window when it is a
    sliding-attention layer, None when it attends to every past token. Models without
    ``layer_types`` (Mistral) slide on every layer when ``sliding_window`` is set, as in
    transformers' DynamicCache."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    if "sliding_attention" in layer_types and not window:
        raise ValueError(f"the config has sliding_attention layers but sliding_window={window!r}")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _text_config(model_config: PreTrainedConfig) -> PreTrainedConfig:
    if not isinstance(model_config, PreTrainedConfig):
        hint = " (pass model.config, not the model)" if isinstance(model_config, torch.nn.Module) else ""
        raise TypeError(f"a cache is built from a transformers model config{hint}, got {type(model_config).__name__}")
    return model_config.get_text_config(decoder=True)


def model_head_dim(config: PreTrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def _check_attention_layers(config: PreTrainedConfig) -> None:
    """Raise ValueError, when the cache is built, for attention a compressed cache cannot serve:
    every layer must cache one key and one value of the same head_dim per KV head and token."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"compressed caches serve decoder-only models; {model_type!r} is an encoder-decoder model "
            f"(its cross-attention needs an EncoderDecoderCache)"
        )
    if getattr(config, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"compressed caches cannot serve multi-head latent attention (MLA, {model_type!r} with "
            f"kv_lora_rank={config.kv_lora_rank}): it caches a latent and a rotary key, not keys and values"
        )
    v_head_dim = getattr(config, "v_head_dim", None)
    if v_head_dim is not None and v_head_dim != model_head_dim(config):
        raise ValueError(
            f"compressed caches need keys and values of one head_dim; {model_type!r} has head_dim "
            f"{model_head_dim(config)} and v_head_dim {v_head_dim}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unsupported:
        raise ValueError(
            f"compressed caches support full and sliding attention layers only; {model_type!r} has {unsupported}"
        )


class _CompressedCache(Cache):
    def __init__(self, model_config: PreTrainedConfig, layers: list[CompressedLayer]) -> None:
        super().__init__(layers=layers)
        self.model_config = model_config

    def _returns_handles(self) -> bool:
        return getattr(_text_config(self.model_config), "_attn_implementation", None) == ATTN_IMPLEMENTATION

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' per-layer update, refusing a model the cache was not built for (another
        layer count or head dimension) at its first step instead of deep inside it."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"this cache has {len(self.layers)} layers but the model updates layer {layer_idx}: build the "
                f"cache from the model's own config ({type(self).__name__}(model.config, ...))"
            )
        if key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"this cache was built for head_dim {self.head_dim} but the model's keys have head_dim "
                f"{key_states.shape[-1]}: build the cache from the model's own config"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def observe_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Show the cache the attention mask of the forward pass about to run (the hook of
        :func:`models.cache_kwargs` calls this): 2D ``[B, cached + new]`` (1 / True = real token),
        4D ``[B, 1, L, cached + new]`` or None (no padding). Under an attention function other than
        ``"qjl"`` this is how the layers learn which new tokens are padding."""
        if attention_mask is not None:
            if attention_mask.dim() == 4:
                attention_mask = key_validity(attention_mask, attention_mask.shape[0], attention_mask.shape[-1])
            elif attention_mask.dim() == 2:
                attention_mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
            else:
                raise ValueError(
                    f"an attention mask must be 2D [batch, tokens] or 4D [batch, 1, query, tokens], got shape "
                    f"{tuple(attention_mask.shape)}"
                )
        self._observed_mask = attention_mask

    def forget_attention_mask(self) -> None:
        """Back to "mask unknown" (after the forward pass the mask was observed for)."""
        self._observed_mask = NOT_OBSERVED

    def _observed_padding(self):
        return self.__dict__.get("_observed_mask", NOT_OBSERVED)

    def memory_report(self) -> MemoryReport:
        """Measured memory: bits per channel of the compressed part (keys, values, per layer and
        overall; of the exact tensors where nothing is compressed yet), bytes held (compressed +
        exact buffers) and the fp16 DynamicCache equivalent. The blocks completed by the last step
        are committed at the start of the next update: until then they are held (and counted) exact.
        Exact sliding-window layers count in the bytes (what they hold) and in the per-layer rows,
        not in the bits of the compressed part; a model whose every layer slides compresses nothing,
        and its bits are those of the exact tensors it holds."""
        layers = tuple(layer.memory() for layer in self.layers)
        compressed = tuple(m for m in layers if m.compressed)
        basis = compressed or layers  # (the nominal bits only while the cache is empty)
        bits = MemoryReport.from_layers(basis, fallback_bits=self.nominal_bits_per_channel()).bits_per_channel
        sketches = {id(layer.key_store.sketch): layer.key_store.sketch for layer in self.layers
                    if isinstance(layer, CompressedLayer) and hasattr(layer.key_store, "sketch")}
        sketch_bytes = sum(t.numel() * t.element_size() for sketch in sketches.values() for t in sketch.tensors())
        return MemoryReport(bits, sum(l.nbytes for l in layers), sum(l.fp16_nbytes for l in layers), layers,
                            sum(l.allocated for l in layers) + sketch_bytes)

    def nominal_bits_per_channel(self) -> float:
        raise NotImplementedError


class QJLCache(_CompressedCache):
    """QJL KV cache: 1-bit JL sketches of keys (+ outlier sketch), grouped low-bit values.

    ``QJLCache(model.config, QJLConfig(...))``; one layer per decoder layer, the first
    ``initial_layers_count`` with the larger sketch. Use it with a model loaded with
    ``attn_implementation="qjl"`` (registered by ``import models``); with another attention
    implementation it returns key estimates ``k_hat`` and dequantized values (slow, same scores).
    """

    def __init__(self, model_config: PreTrainedConfig, qjl_config: QJLConfig | None = None) -> None:
        self.qjl_config = qjl_config = qjl_config if qjl_config is not None else QJLConfig()
        if not isinstance(qjl_config, QJLConfig):
            raise TypeError(
                f"qjl_config must be a QJLConfig (or None for the paper's), got {type(qjl_config).__name__}"
            )
        text = _text_config(model_config)
        _check_attention_layers(text)
        self.head_dim = model_head_dim(text)
        qjl_config.check_head_dim(self.head_dim)
        sketches: dict[bool, QJLSketch] = {}
        layers = []
        for idx, window in enumerate(layer_windows(text)):
            if window is not None:
                layers.append(ExactSlidingWindowLayer(window))
                continue
            budget = qjl_config.layer_budget(idx)
            initial = idx < qjl_config.initial_layers_count
            if initial not in sketches:
                sketches[initial] = QJLSketch(
                    self.head_dim, budget.sketch_dim, seed=qjl_config.seed + int(initial),
                    orthogonalize=qjl_config.orthogonalize, hadamard=qjl_config.hadamard,
                )
            key_store = QJLKeyStore(sketches[initial], budget, qjl_config.group_size, qjl_config.buffer_size)
            value_store = ValueStore(qjl_config.value_quantization_bits, qjl_config.group_size, qjl_config.buffer_size)
            layers.append(CompressedLayer(key_store, value_store, self._returns_handles, self._observed_padding))
        super().__init__(model_config, layers)

    def bit_report(self, storage_bits: int = 16):
        """Nominal bits per channel of this configuration (:func:`models.qjl_bit_report`)."""
        return qjl_bit_report(self.qjl_config, len(self.layers), self.head_dim, storage_bits)

    def nominal_bits_per_channel(self) -> float:
        return self.bit_report().kv_bits_per_channel


class KIVICache(_CompressedCache):
    """KIVI KV cache (Liu et al., 2024): keys quantized per channel over groups of ``group_size``
    tokens, values per token in groups of ``group_size`` channels, both to ``bits`` bits, with an
    exact residual of ``buffer_size`` tokens (the KIVI paper's ``R``). Attention runs on
    dequantized keys and values: numerically KIVI, not its fused kernels."""

    def __init__(self, model_config: PreTrainedConfig, bits: int = 2, group_size: int = 32,
                 buffer_size: int = 128) -> None:
        for name, value in (("bits", bits), ("group_size", group_size), ("buffer_size", buffer_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"KIVICache {name} must be an int, got {type(value).__name__} {value!r}")
        if bits not in KIVI_BITS:
            raise ValueError(f"KIVICache bits must be one of {KIVI_BITS}, got {bits!r}")
        if group_size <= 0 or buffer_size <= 0 or buffer_size % group_size:
            raise ValueError(
                f"KIVICache needs a positive group_size and a buffer_size that is a positive multiple of it, "
                f"got group_size={group_size}, buffer_size={buffer_size}"
            )
        text = _text_config(model_config)
        _check_attention_layers(text)
        self.head_dim = model_head_dim(text)
        if self.head_dim % group_size or self.head_dim % (32 // bits):
            raise ValueError(
                f"KIVI needs head_dim ({self.head_dim}) divisible by group_size ({group_size}) and by {32 // bits}"
            )
        self.bits, self.group_size = bits, group_size
        layers = [
            ExactSlidingWindowLayer(window) if window is not None else
            CompressedLayer(KIVIKeyStore(bits, group_size, buffer_size), ValueStore(bits, group_size, buffer_size),
                            self._returns_handles, self._observed_padding)
            for window in layer_windows(text)
        ]
        super().__init__(model_config, layers)

    def nominal_bits_per_channel(self) -> float:
        # keys: a scale and a min (16 bits each) per channel and group of tokens; values: per group of channels
        return self.bits + 2 * 16 / self.group_size
