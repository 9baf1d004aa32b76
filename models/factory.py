"""One entry point for every KV cache method compared in this project."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig

from .config import QJLConfig

METHODS = ("exact", "qjl", "kivi", "quanto")


@dataclass(frozen=True)
class MemoryReport:
    """What a cache holds right now.

    ``bits_per_channel``: bits per stored key/value channel of the compressed part, averaged over
    keys and values and layers (16 for an fp16 exact cache); ``nbytes``: bytes of every tensor the
    cache holds (compressed part, exact buffers, indices); ``fp16_nbytes``: what an fp16
    DynamicCache would hold for the same tokens.
    """

    bits_per_channel: float
    nbytes: int
    fp16_nbytes: int

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_nbytes / self.nbytes if self.nbytes else float("nan")


def make_cache(method: str, model_config: PreTrainedConfig, qjl_config: QJLConfig | None = None) -> Cache:
    """A fresh cache for one generation.

    ``exact``: transformers' DynamicCache. ``qjl``: :class:`models.QJLCache` with ``qjl_config``
    (paper defaults when None). ``kivi``: :class:`models.KIVICache` with keys and values at
    ``qjl_config.value_quantization_bits`` bits, its ``group_size`` and ``buffer_size`` (the KIVI
    paper's residual length). ``quanto``: transformers' QuantizedCache (optimum-quanto backend).
    Use the model with ``attn_implementation="qjl"`` (``import models`` registers it): it runs
    every method's cache.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exact":
        return DynamicCache(config=model_config)
    raise NotImplementedError(f"cache method {method!r} lands with the transformers cache issue")


def memory_report(cache: Cache) -> MemoryReport:
    """Measured :class:`MemoryReport` of any cache made by :func:`make_cache`."""
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
