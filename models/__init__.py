"""QJL as a KV cache for transformers models, and its building blocks."""

from .accounting import BitReport, LayerBits, qjl_bit_report
from .config import LayerBudget, QJLConfig
from .key_store import QJLKeyStore, select_outliers
from .sketch import QJLSketch
from .value_store import ValueStore

__all__ = [
    "BitReport",
    "LayerBits",
    "LayerBudget",
    "QJLConfig",
    "QJLKeyStore",
    "QJLSketch",
    "ValueStore",
    "qjl_bit_report",
    "select_outliers",
]
