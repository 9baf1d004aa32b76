"""Key storage policy of one layer: committed (compressed) groups + an exact residual buffer."""

from __future__ import annotations

import torch

import qjl_kernel
from qjl_kernel import QuantizedKeys
from qjl_kernel.reference import exact_scores

from .config import LayerBudget
from .growable import GrowableTensors
from .sketch import QJLSketch


def select_outliers(grouped_keys: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` channels of largest norm over each group's tokens.

    grouped_keys ``[B, H, N, G, d]`` -> uint8 ``[B, H, N, count]``.
    """
    norms = grouped_keys.float().norm(dim=-2)  # [B, H, N, d]
    return norms.topk(count, dim=-1).indices.to(torch.uint8)


class KeyStore:
    """The storage policy shared by every compressed key format.

    New keys enter an exact residual buffer (``[B, H_kv, R, d]``, with a validity mask ``[B, R]``).
    :meth:`commit` moves every complete block of ``buffer_size`` tokens, in groups of
    ``group_size``, into the compressed state. Subclasses define :meth:`quantize` (keys ->
    state), :meth:`scores` (query x state) and :meth:`dequantize_state`; the state is a tuple of
    tensors whose axis 2 is the group axis, grown in place.
    """

    def __init__(self, group_size: int, buffer_size: int) -> None:
        if group_size <= 0 or buffer_size <= 0 or buffer_size % group_size:
            raise ValueError(
                f"buffer_size ({buffer_size}) must be a positive multiple of group_size ({group_size})"
            )
        self.group_size = group_size
        self.buffer_size = buffer_size
        self.clear()

    def clear(self) -> None:
        """Drop every stored token."""
        self._committed = GrowableTensors(dim=2)
        self.residual: torch.Tensor | None = None
        self.residual_valid: torch.Tensor | None = None  # bool [B, R]

    # --- format (subclasses) -----------------------------------------------------------------
    def quantize(self, keys: torch.Tensor, valid: torch.Tensor):
        """Compress ``[B, H_kv, n, d]`` keys (``n`` a multiple of group_size), ``valid`` bool ``[B, n]``."""
        raise NotImplementedError

    def scores(self, state, query: torch.Tensor) -> torch.Tensor:
        """Estimated ``<q, k>`` for ``state``'s keys: query ``[B, H_q, L, d]`` -> float32 ``[B, H_q, L, T]``."""
        raise NotImplementedError

    def dequantize_state(self, state) -> torch.Tensor:
        """Key tensors standing in for ``state``: float32 ``[B, H_kv, T, d]``."""
        raise NotImplementedError

    def _wrap(self, tensors: tuple[torch.Tensor, ...]):
        """Rebuild a state from the stored tensors."""
        raise NotImplementedError

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_committed(self) -> int:
        return len(self._committed) * self.group_size

    @property
    def num_residual(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def seq_len(self) -> int:
        return self.num_committed + self.num_residual

    @property
    def quantized(self):
        views = self._committed.views()
        return None if views is None else self._wrap(views)

    # --- updates -----------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add keys ``[B, H_kv, L, d]`` to the residual; ``valid`` is bool ``[B, L]`` (None = all)."""
        if valid is None:
            valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        if self.residual is None:
            self.residual, self.residual_valid = keys, valid
        else:
            self.residual = torch.cat([self.residual, keys], dim=2)
            self.residual_valid = torch.cat([self.residual_valid, valid], dim=1)

    def commit(self, keep: int = 0) -> int:
        """Commit the largest multiple of buffer_size residual tokens that leaves at least ``keep``
        tokens in the residual; returns the number committed."""
        count = (max(self.num_residual - keep, 0) // self.buffer_size) * self.buffer_size
        if count:
            state = self.quantize(self.residual[:, :, :count], self.residual_valid[:, :count])
            self._committed.append(tuple(t for t in state if isinstance(t, torch.Tensor)))
            self.residual = self.residual[:, :, count:]
            self.residual_valid = self.residual_valid[:, count:]
        return count

    def crop(self, count: int) -> None:
        """Remove the newest ``count`` keys, which must still be in the residual buffer."""
        if count > self.num_residual:
            raise ValueError(
                f"cannot remove {count} keys: only the newest {self.num_residual} are still exact (the older "
                f"ones are committed to the compressed store, from which tokens cannot be removed)"
            )
        if count > 0:
            self.residual = self.residual[:, :, :-count]
            self.residual_valid = self.residual_valid[:, :-count]

    # --- scores ------------------------------------------------------------------------------
    def committed_scores(self, query: torch.Tensor) -> torch.Tensor | None:
        """Scores of the committed keys, float32 ``[B, H_q, L, T_c]`` (None when nothing is committed)."""
        state = self.quantized
        return None if state is None else self.scores(state, query)

    def residual_scores(self, query: torch.Tensor) -> torch.Tensor | None:
        """Exact ``<q, k>`` for the residual keys, float32 ``[B, H_q, L, R]``."""
        return None if self.num_residual == 0 else exact_scores(query, self.residual)

    def fused_parts(self):
        """What :func:`qjl_kernel.decode_attention` reads of these keys: ``(committed QJL keys or
        None, their projection or None, exact keys [B, H_kv, R, d])``. Formats the op cannot read
        from their compressed form pass their committed keys dequantized among the exact ones."""
        dense = self.dequantized()
        residual = self.residual
        if dense is None:
            return None, None, residual
        return None, None, torch.cat([dense.to(residual.dtype), residual], dim=2)

    def dequantized(self) -> torch.Tensor | None:
        """Key tensors for the committed part, float32 ``[B, H_kv, T_c, d]`` (slow path)."""
        state = self.quantized
        return None if state is None else self.dequantize_state(state)

    # --- memory and batch --------------------------------------------------------------------
    def committed_nbytes(self) -> int:
        return self._committed.nbytes()

    def nbytes(self) -> int:
        return self._committed.nbytes() + self._residual_nbytes()

    def allocated_nbytes(self) -> int:
        """:meth:`nbytes` plus the committed buffers' spare capacity and the residual's padding flags."""
        valid = 0 if self.residual_valid is None else self.residual_valid.numel()
        return self._committed.reserved_bytes() + self._residual_nbytes() + valid

    def _residual_nbytes(self) -> int:
        return 0 if self.residual is None else self.residual.numel() * self.residual.element_size()

    def reorder_batch(self, index: torch.Tensor) -> None:
        self._committed.apply(lambda t: t.index_select(0, index.to(t.device)))
        if self.residual is not None:
            self.residual = self.residual.index_select(0, index.to(self.residual.device))
            self.residual_valid = self.residual_valid.index_select(0, index.to(self.residual.device))


class QJLKeyStore(KeyStore):
    """QJL keys of one layer. At commit each group picks its ``outlier_count`` largest-norm
    channels, then every key is sketched (inlier and outlier parts, :func:`qjl_kernel.quantize_keys`).
    Invalid (padding) tokens are zeroed first: they affect neither the outlier choice nor any
    stored norm, and score 0. Committed state: :class:`QuantizedKeys`, with the norms in float32
    whatever the keys' dtype: an fp16 norm overflows to inf once a key's norm passes 65504 (a
    channel of ~8000 in a 64-channel head), which turns scores into NaN. The ops read norms of any
    float dtype; they cost 32 bits each in the accounting (:mod:`models.accounting`)."""

    def __init__(self, sketch: QJLSketch, budget: LayerBudget, group_size: int, buffer_size: int) -> None:
        super().__init__(group_size, buffer_size)
        if sketch.sketch_dim != budget.sketch_dim:
            raise ValueError(f"sketch has m={sketch.sketch_dim} but the budget asks for m={budget.sketch_dim}")
        self.sketch = sketch
        self.budget = budget

    def quantize(self, keys: torch.Tensor, valid: torch.Tensor) -> QuantizedKeys:
        batch, heads, tokens, dim = keys.shape
        keys = keys.masked_fill(~valid[:, None, :, None], 0)
        grouped = keys.reshape(batch, heads, tokens // self.group_size, self.group_size, dim)
        outliers = select_outliers(grouped, self.budget.outlier_count)
        projection = self.sketch.projection_on(keys.device)
        # Every backend sketches in float32 whatever the keys' dtype, so float32 keys give the same
        # sign bits and norms returned in float32 (the ops round norms to the keys' dtype).
        return qjl_kernel.quantize_keys(grouped.float(), outliers, projection, self.budget.outlier_sketch_dim)

    def scores(self, state: QuantizedKeys, query: torch.Tensor) -> torch.Tensor:
        return qjl_kernel.key_scores(query, state, self.sketch.projection_on(query.device))

    def fused_parts(self):
        return self.quantized, self.sketch.projection_on(self.residual.device), self.residual

    def dequantize_state(self, state: QuantizedKeys) -> torch.Tensor:
        """Unbiased estimates ``k_hat``; their dot products equal the QJL scores exactly."""
        return qjl_kernel.dequantize_keys(state, self.sketch.projection_on(state.bits.device)).flatten(2, 3)

    def _wrap(self, tensors) -> QuantizedKeys:
        return QuantizedKeys(*tensors)
