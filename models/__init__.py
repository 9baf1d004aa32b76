"""QJL as a KV cache for transformers models, and its building blocks.

    import models
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qjl")
    cache = models.QJLCache(model.config, models.QJLConfig())
    out = model.generate(ids, **models.cache_kwargs(model, cache))  # past_key_values=cache on 5.17
"""

from .accounting import BitReport, LayerBits, qjl_bit_report
from .attention import qjl_attention_forward, register
from .cache import ATTN_IMPLEMENTATION, KIVICache, QJLCache
from .config import LayerBudget, QJLConfig
from .factory import METHODS, cache_kwargs, make_cache, memory_report, prefilled_cache, quanto_available
from .key_store import KeyStore, QJLKeyStore, select_outliers
from .kivi import KIVIKeyStore
from .memory import LayerMemory, MemoryReport
from .sketch import QJLSketch
from .value_store import ValueStore

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BitReport",
    "KIVICache",
    "KIVIKeyStore",
    "KeyStore",
    "LayerBits",
    "LayerBudget",
    "LayerMemory",
    "METHODS",
    "MemoryReport",
    "QJLCache",
    "QJLConfig",
    "QJLKeyStore",
    "QJLSketch",
    "ValueStore",
    "cache_kwargs",
    "make_cache",
    "memory_report",
    "prefilled_cache",
    "qjl_attention_forward",
    "qjl_bit_report",
    "quanto_available",
    "register",
    "select_outliers",
]
