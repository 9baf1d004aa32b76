"""Value storage policy of one layer: a sliding exact window + per-token quantized history."""

from __future__ import annotations

import torch

import qjl_kernel
from qjl_kernel import QuantizedValues

from .growable import GrowableTensors


class ValueStore:
    """Values of one layer.

    The most recent ``buffer_size`` values stay exact in ``window`` (``[B, H_kv, W, d]``); older
    ones are quantized per token (groups of ``group_size`` channels, ``bits`` bits) as
    :meth:`trim` pushes them out of the window. ``bits=16`` keeps every value exact. Invalid
    (padding) tokens are stored as zeros.
    """

    def __init__(self, bits: int, group_size: int, buffer_size: int) -> None:
        if bits not in (2, 4, 16):
            raise ValueError(f"bits must be 2, 4 or 16, got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.buffer_size = buffer_size
        self.clear()

    def clear(self) -> None:
        """Drop every stored token."""
        self._quantized = GrowableTensors(dim=2)
        self.window: torch.Tensor | None = None

    @property
    def num_quantized(self) -> int:
        return len(self._quantized)

    @property
    def num_window(self) -> int:
        return 0 if self.window is None else self.window.shape[2]

    @property
    def seq_len(self) -> int:
        return self.num_quantized + self.num_window

    @property
    def quantized(self) -> QuantizedValues | None:
        views = self._quantized.views()
        return None if views is None else QuantizedValues(*views, self.bits, self.group_size)

    def append(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add values ``[B, H_kv, L, d]``; ``valid`` is bool ``[B, L]`` (None = all valid)."""
        if valid is not None:
            values = values.masked_fill(~valid[:, None, :, None], 0)
        self.window = values if self.window is None else torch.cat([self.window, values], dim=2)

    def quantize(self, values: torch.Tensor) -> QuantizedValues:
        return qjl_kernel.quantize_values(values, self.group_size, self.bits)

    def trim(self) -> int:
        """Quantize window tokens beyond the newest ``buffer_size``; returns how many."""
        if self.bits == 16 or self.num_window <= self.buffer_size:
            return 0
        count = self.num_window - self.buffer_size
        q = self.quantize(self.window[:, :, :count])
        self._quantized.append((q.codes, q.scales, q.mins))
        self.window = self.window[:, :, count:]
        return count

    def crop(self, count: int) -> None:
        """Remove the newest ``count`` values, which must still be in the exact window."""
        if count > self.num_window:
            raise ValueError(
                f"cannot remove {count} values: only the newest {self.num_window} are still exact (the older "
                f"ones are quantized)"
            )
        if count > 0:
            self.window = self.window[:, :, :-count]

    def nbytes(self) -> int:
        return self._quantized.nbytes() + self._window_nbytes()

    def allocated_nbytes(self) -> int:
        """:meth:`nbytes` plus the quantized buffers' spare capacity."""
        return self._quantized.reserved_bytes() + self._window_nbytes()

    def _window_nbytes(self) -> int:
        return 0 if self.window is None else self.window.numel() * self.window.element_size()

    def quantized_nbytes(self) -> int:
        return self._quantized.nbytes()

    def reorder_batch(self, index: torch.Tensor) -> None:
        self._quantized.apply(lambda t: t.index_select(0, index.to(t.device)))
        if self.window is not None:
            self.window = self.window.index_select(0, index.to(self.window.device))

