"""One entry point for every KV cache method compared in this project."""

from __future__ import annotations

import importlib.util
import inspect

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig, QuantizedCache

from .cache import KIVICache, QJLCache, _CompressedCache
from .config import QJLConfig
from .memory import MemoryReport

METHODS = ("exact", "qjl", "kivi", "quanto")


def quanto_available() -> bool:
    """Whether optimum-quanto (transformers' QuantizedCache backend) is importable."""
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no "optimum" package at all
        return False


def make_cache(method: str, model_config: PreTrainedConfig, qjl_config: QJLConfig | None = None) -> Cache:
    """A fresh cache for one generation.

    ``exact``: transformers' DynamicCache. ``qjl``: :class:`models.QJLCache` with ``qjl_config``
    (paper defaults when None). ``kivi``: :class:`models.KIVICache` with keys and values at
    ``qjl_config.value_quantization_bits`` bits (2 or 4), its ``group_size`` and ``buffer_size``
    (the KIVI paper's residual length). ``quanto``: transformers' QuantizedCache with the
    optimum-quanto backend (``pip install optimum-quanto``), same bits / group / residual.
    Use the model with ``attn_implementation="qjl"`` (``import models`` registers it): it runs
    every method's cache.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = qjl_config if qjl_config is not None else QJLConfig()
    if not isinstance(config, QJLConfig):
        raise TypeError(f"qjl_config must be a QJLConfig (or None for the paper's), got {type(config).__name__}")
    if method == "exact":
        return DynamicCache(config=model_config)
    if method == "qjl":
        return QJLCache(model_config, config)
    bits = config.value_quantization_bits
    if bits not in (2, 4):
        raise ValueError(f"method {method!r} quantizes keys and values to 2 or 4 bits, got {bits}")
    if method == "kivi":
        return KIVICache(model_config, bits, config.group_size, config.buffer_size)
    if not quanto_available():
        raise ImportError("method 'quanto' needs optimum-quanto: pip install optimum-quanto")
    return QuantizedCache(
        "quanto", model_config, nbits=bits, q_group_size=config.group_size, residual_length=config.buffer_size
    )


def prefilled_cache(
    method: str, model_config: PreTrainedConfig, qjl_config: QJLConfig | None, prompt: Cache
) -> Cache:
    """A fresh cache of ``method`` holding a prompt whose prefill ran elsewhere.

    The prompt step is the same for every method (exact attention over full-precision keys and
    values; the compression happens after it), so one prefill with a :class:`DynamicCache` can
    serve every method: this loads its keys and values into the state the prompt step leaves
    (compressed caches commit them at the start of the next update). The caller decodes from the
    prompt's next token on. ``prompt`` is only read (batch without padding)."""
    if not isinstance(prompt, Cache):
        raise TypeError(f"prompt must be the transformers Cache of the prefill, got {type(prompt).__name__}")
    if prompt.get_seq_length() == 0:
        raise ValueError("the prompt cache holds no tokens: run the prefill with it before building caches from it")
    cache = make_cache(method, model_config, qjl_config)
    for idx, layer in enumerate(prompt.layers):
        cache.update(layer.keys, layer.values, idx)
    return cache


def memory_report(cache: Cache) -> MemoryReport:
    """Measured :class:`MemoryReport` of any cache made by :func:`make_cache`. For caches of
    transformers (exact, quanto) it counts the full-precision tensors they expose."""
    if not isinstance(cache, Cache):
        raise TypeError(f"memory_report takes a transformers Cache (models.make_cache), got {type(cache).__name__}")
    if hasattr(cache, "memory_report"):
        return cache.memory_report()
    nbytes = fp16 = 0
    bits = None
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                nbytes += t.numel() * t.element_size()
                fp16 += t.numel() * 2
                bits = 8 * t.element_size()
    return MemoryReport(bits_per_channel=float(bits or 16), nbytes=nbytes, fp16_nbytes=fp16)


_CACHE_ARGUMENTS = ("cache", "past_key_values")
_HOOKED = "_qjl_padding_hooks"  # attribute of a model holding its hook handles


def _show_mask(module, args, kwargs) -> None:
    """Forward pre-hook: hand a compressed cache the forward pass's attention mask."""
    if args:  # positional arguments (model(ids, mask, ...)): bind them to their names
        try:
            kwargs = {**inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments, **kwargs}
        except TypeError:
            pass
    for name in _CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if isinstance(cache, _CompressedCache):
            cache.observe_attention_mask(kwargs.get("attention_mask"))


def _forget_mask(module, args, kwargs, output) -> None:
    for name in _CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if isinstance(cache, _CompressedCache):
            cache.forget_attention_mask()


def cache_kwargs(model, cache: Cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers 5.17 calls the
    argument ``past_key_values``, later releases ``cache`` (the old name is deprecated there).

    For a compressed cache it also installs (once per model) a forward pre-hook that shows the cache
    each forward pass's attention mask. transformers never passes the mask to a cache's ``update``,
    so without the hook a compressed cache under ``sdpa`` / ``eager`` attention cannot tell padding
    from real tokens and refuses batches; with it, padded batches give what the ``"qjl"`` attention
    gives (padding excluded from outlier choice, norms and scales)."""
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "forward", None)):
        raise TypeError(f"cache_kwargs takes the model (a torch.nn.Module) and the cache, got {type(model).__name__}")
    if not isinstance(cache, Cache):
        raise TypeError(f"cache_kwargs takes a transformers Cache (models.make_cache), got {type(cache).__name__}")
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if isinstance(cache, _CompressedCache) and not getattr(model, _HOOKED, None):
        hooks = (
            model.register_forward_pre_hook(_show_mask, with_kwargs=True),
            model.register_forward_hook(_forget_mask, with_kwargs=True, always_call=True),
        )
        object.__setattr__(model, _HOOKED, hooks)  # a plain attribute, not a registered submodule
    return {name: cache}
