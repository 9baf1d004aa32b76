"""Bit accounting: what a QJL cache really stores, per channel, per layer and overall.

Counted per token and KV head (``d`` channels), for the quantized part of the cache (the exact
residual buffers are a constant ``buffer_size`` tokens per layer and are reported separately as
bytes held):

- keys:   ``m`` inlier sign bits + ``m_o`` outlier sign bits + 2 float32 norms (an fp16 norm
          overflows for large keys, see :class:`models.QJLKeyStore`)
          + ``outlier_count`` uint8 indices shared by ``group_size`` tokens;
- values: ``bits * d`` code bits + a scale and a min (storage dtype) per ``group_size`` channels;
          16-bit "values" are the exact storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import QJLConfig

FP16_BITS = 16
NORM_BITS = 32  # key norms are stored in float32 whatever the model's dtype
OUTLIER_INDEX_BITS = 8


@dataclass(frozen=True)
class LayerBits:
    layer_idx: int
    sketch_dim: int
    outlier_count: int
    outlier_sketch_dim: int
    key_bits_per_channel: float
    value_bits_per_channel: float

    @property
    def kv_bits_per_channel(self) -> float:
        return (self.key_bits_per_channel + self.value_bits_per_channel) / 2


@dataclass(frozen=True)
class BitReport:
    layers: tuple[LayerBits, ...]
    head_dim: int
    storage_bits: int

    @property
    def key_bits_per_channel(self) -> float:
        return sum(l.key_bits_per_channel for l in self.layers) / len(self.layers)

    @property
    def value_bits_per_channel(self) -> float:
        return sum(l.value_bits_per_channel for l in self.layers) / len(self.layers)

    @property
    def kv_bits_per_channel(self) -> float:
        return (self.key_bits_per_channel + self.value_bits_per_channel) / 2

    @property
    def compression_vs_fp16(self) -> float:
        return FP16_BITS / self.kv_bits_per_channel

    def format(self) -> str:
        lines = [
            f"{'layers':>9} {'m':>5} {'outl':>5} {'m_o':>5} {'key b/ch':>9} {'value b/ch':>10} {'kv b/ch':>8}",
        ]
        # Collapse runs of identical layers into one row.
        start = 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or _budget(self.layers[i]) != _budget(self.layers[start]):
                l = self.layers[start]
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                lines.append(
                    f"{span:>9} {l.sketch_dim:>5} {l.outlier_count:>5} {l.outlier_sketch_dim:>5} "
                    f"{l.key_bits_per_channel:>9.4f} {l.value_bits_per_channel:>10.4f} {l.kv_bits_per_channel:>8.4f}"
                )
                start = i
        lines.append(
            f"{'overall':>9} {'':>5} {'':>5} {'':>5} {self.key_bits_per_channel:>9.4f} "
            f"{self.value_bits_per_channel:>10.4f} {self.kv_bits_per_channel:>8.4f}"
        )
        lines.append(
            f"compression vs fp16 KV cache: {self.compression_vs_fp16:.3f}x "
            f"(head_dim {self.head_dim}, key norms stored in {NORM_BITS} bits, "
            f"value scales/mins in {self.storage_bits})"
        )
        return "\n".join(lines)


def _budget(layer: LayerBits) -> tuple:
    return (layer.sketch_dim, layer.outlier_count, layer.outlier_sketch_dim, layer.value_bits_per_channel)


def key_bits_per_token(sketch_dim: int, outlier_sketch_dim: int, outlier_count: int, group_size: int) -> float:
    # the model's dtype does not enter: key norms are float32 whatever it is
    return sketch_dim + outlier_sketch_dim + 2 * NORM_BITS + outlier_count * OUTLIER_INDEX_BITS / group_size


def value_bits_per_token(head_dim: int, bits: int, group_size: int, storage_bits: int = FP16_BITS) -> float:
    if bits == 16:
        return head_dim * storage_bits
    return head_dim * bits + 2 * storage_bits * head_dim / group_size


def qjl_bit_report(config: QJLConfig, num_layers: int, head_dim: int, storage_bits: int = FP16_BITS) -> BitReport:
    """Bits per channel of a QJL cache for a model with ``num_layers`` layers of ``head_dim``."""
    config.check_head_dim(head_dim)
    value_bpc = value_bits_per_token(head_dim, config.value_quantization_bits, config.group_size, storage_bits)
    layers = []
    for idx in range(num_layers):
        budget = config.layer_budget(idx)
        key_bits = key_bits_per_token(
            budget.sketch_dim, budget.outlier_sketch_dim, budget.outlier_count, config.group_size
        )
        layers.append(
            LayerBits(
                idx, budget.sketch_dim, budget.outlier_count, budget.outlier_sketch_dim,
                key_bits / head_dim, value_bpc / head_dim,
            )
        )
    return BitReport(tuple(layers), head_dim, storage_bits)
