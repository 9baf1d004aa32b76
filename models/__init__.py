"""QJL as a KV cache for transformers models, and its building blocks."""

from .accounting import BitReport, LayerBits, qjl_bit_report
from .config import LayerBudget, QJLConfig
from .factory import METHODS, MemoryReport, make_cache, memory_report
from .key_store import QJLKeyStore, select_outliers
from .sketch import QJLSketch
from .value_store import ValueStore

__all__ = [
    "BitReport",
    "LayerBits",
    "METHODS",
    "MemoryReport",
    "LayerBudget",
    "QJLConfig",
    "QJLKeyStore",
    "QJLSketch",
    "ValueStore",
    "make_cache",
    "memory_report",
    "qjl_bit_report",
    "select_outliers",
]
