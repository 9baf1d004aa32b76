"""Append-only storage along the token axis with amortized O(1) appends."""

from __future__ import annotations

import torch


class GrowableTensors:
    """A tuple of tensors that share axis ``dim`` (the token or group axis), grown by doubling.

    Concatenating at every decode step would copy the whole cache each step (O(T^2) over a
    generation); doubling the capacity copies each element O(1) times on average.
    """

    def __init__(self, dim: int = 2) -> None:
        self.dim = dim
        self._buffers: list[torch.Tensor] | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, parts: tuple[torch.Tensor, ...]) -> None:
        added = parts[0].shape[self.dim]
        if self._buffers is not None and self._buffers[0].is_inference() and not torch.is_inference_mode_enabled():
            # Buffers allocated under torch.inference_mode() refuse in-place writes outside it (a
            # cache filled there, then continued by generate()): move them to normal tensors once.
            self._buffers = [b.clone() for b in self._buffers]
        if self._buffers is None:
            capacity = max(added, 1)
            self._buffers = [self._empty_like(p, capacity) for p in parts]
        elif self.length + added > self._buffers[0].shape[self.dim]:
            capacity = max(2 * self._buffers[0].shape[self.dim], self.length + added)
            grown = [self._empty_like(p, capacity) for p in parts]
            for new, old in zip(grown, self._buffers):
                new.narrow(self.dim, 0, self.length).copy_(old.narrow(self.dim, 0, self.length))
            self._buffers = grown
        for buffer, part in zip(self._buffers, parts):
            buffer.narrow(self.dim, self.length, added).copy_(part)
        self.length += added

    def views(self) -> tuple[torch.Tensor, ...] | None:
        """The stored prefix of every tensor (views, no copy), or None when empty."""
        if self._buffers is None or self.length == 0:
            return None
        return tuple(b.narrow(self.dim, 0, self.length) for b in self._buffers)

    def nbytes(self) -> int:
        """Bytes of the stored prefix (what the data needs, not the spare capacity)."""
        views = self.views()
        return 0 if views is None else sum(v.numel() * v.element_size() for v in views)

    def reserved_bytes(self) -> int:
        """Bytes allocated, spare capacity included."""
        return 0 if self._buffers is None else sum(b.numel() * b.element_size() for b in self._buffers)

    def apply(self, fn) -> None:
        """Replace every buffer by ``fn(buffer)`` (batch reordering, device moves)."""
        if self._buffers is not None:
            self._buffers = [fn(b) for b in self._buffers]

    def _empty_like(self, part: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = list(part.shape)
        shape[self.dim] = capacity
        return torch.empty(shape, dtype=part.dtype, device=part.device)
