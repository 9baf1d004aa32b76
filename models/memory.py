"""Measured memory of a KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerMemory:
    """One layer: bits per channel of its compressed keys and values (while nothing is compressed,
    of the exact tensors held: their dtype's bits; None while empty), bytes of the data held, bytes
    an fp16 cache would hold for the same tokens, bytes allocated (the data plus the spare capacity
    of buffers grown by doubling; None: the same as ``nbytes``) and whether the layer is compressed."""

    key_bits_per_channel: float | None
    value_bits_per_channel: float | None
    nbytes: int
    fp16_nbytes: int
    allocated_nbytes: int | None = None
    compressed: bool = True  # False: a layer a compressed cache keeps exact (a sliding window)

    @property
    def allocated(self) -> int:
        return self.nbytes if self.allocated_nbytes is None else self.allocated_nbytes


@dataclass(frozen=True)
class MemoryReport:
    """What a cache holds right now.

    ``bits_per_channel``: bits per stored key/value channel of the compressed part, averaged over
    keys and values (measured from the bytes held where something is compressed, else the bits of
    the exact tensors held, e.g. 16 for fp16; the configuration's nominal value for an empty
    cache); ``nbytes``: bytes of the data of every tensor the cache holds (compressed part, exact
    buffers, indices); ``fp16_nbytes``: what an fp16 DynamicCache would hold for the same tokens;
    ``allocated_nbytes``: what the cache has allocated for them (compressed caches grow their
    buffers by doubling, so up to 2x the data; plus the sketch matrices; None: ``nbytes``).
    """

    bits_per_channel: float
    nbytes: int
    fp16_nbytes: int
    layers: tuple[LayerMemory, ...] = ()
    allocated_nbytes: int | None = None

    @property
    def allocated(self) -> int:
        return self.nbytes if self.allocated_nbytes is None else self.allocated_nbytes

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_nbytes / self.nbytes if self.nbytes else float("nan")

    @classmethod
    def from_layers(cls, layers: tuple[LayerMemory, ...], fallback_bits: float) -> "MemoryReport":
        measured = [b for l in layers for b in (l.key_bits_per_channel, l.value_bits_per_channel) if b is not None]
        bits = sum(measured) / len(measured) if len(measured) == 2 * len(layers) and layers else fallback_bits
        return cls(bits, sum(l.nbytes for l in layers), sum(l.fp16_nbytes for l in layers), layers,
                   sum(l.allocated for l in layers))

    def format(self) -> str:
        lines = [f"{'layer':>5} {'key b/ch':>9} {'value b/ch':>10} {'bytes':>12} {'fp16 bytes':>12}"]
        for idx, l in enumerate(self.layers):
            k = "-" if l.key_bits_per_channel is None else f"{l.key_bits_per_channel:.4f}"
            v = "-" if l.value_bits_per_channel is None else f"{l.value_bits_per_channel:.4f}"
            lines.append(f"{idx:>5} {k:>9} {v:>10} {l.nbytes:>12,} {l.fp16_nbytes:>12,}")
        ratio = self.ratio_vs_fp16
        lines.append(
            f"total: {self.nbytes:,} bytes held ({self.allocated:,} allocated) vs {self.fp16_nbytes:,} for fp16 "
            f"({'n/a' if math.isnan(ratio) else f'{ratio:.2f}x'}); compressed part {self.bits_per_channel:.4f} bits/channel"
        )
        return "\n".join(lines)
