"""The random JL projection ``S`` shared by key quantization and query sketching."""

from __future__ import annotations

import functools
import math

import torch


def _haar_orthonormal_rows(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``rows <= dim`` orthonormal rows, Haar-distributed, from a Gaussian matrix via QR."""
    gaussian = torch.randn(dim, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian, mode="reduced")  # q: [dim, rows], orthonormal columns
    # Fixing the signs of R's diagonal makes Q exactly Haar-distributed (Mezzadri 2007).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T


def _hadamard(dim: int) -> torch.Tensor:
    """Normalized (orthogonal) Sylvester Hadamard matrix, ``dim`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


@functools.lru_cache(maxsize=32)
def _projection_matrix(head_dim: int, sketch_dim: int, seed: int, orthogonalize: bool, hadamard: bool) -> torch.Tensor:
    """The float32 CPU matrix of a sketch; memoized, since every new cache rebuilds the same sketches."""
    generator = torch.Generator().manual_seed(seed)
    if orthogonalize:
        blocks = []
        for start in range(0, sketch_dim, head_dim):
            rows = min(head_dim, sketch_dim - start)
            blocks.append(_haar_orthonormal_rows(rows, head_dim, generator) * math.sqrt(head_dim))
        matrix = torch.cat(blocks, 0)
    else:
        matrix = torch.randn(sketch_dim, head_dim, generator=generator, dtype=torch.float64)
    if hadamard:
        signs = torch.randint(0, 2, (head_dim,), generator=generator).double() * 2 - 1
        matrix = matrix @ (_hadamard(head_dim) * signs)
    return matrix.float().contiguous()


class QJLSketch:
    """A seeded ``m x d`` JL projection.

    Rows are drawn i.i.d. Gaussian; with ``orthogonalize`` (the paper's default) each block of
    ``d`` consecutive rows is replaced by a Haar-random orthonormal block scaled by ``sqrt(d)``, so
    every row keeps the expected norm ``sqrt(d)`` of a Gaussian row while rows within a block are
    orthogonal (lower estimator variance). With ``hadamard`` the projection is composed with a
    randomized Hadamard transform ``H D`` (``d`` a power of two), as the original's ``rht`` option.

    The matrix is generated on the CPU in float64 from ``seed`` (identical on every machine and
    device) and kept in float32; :meth:`projection_on` returns (and caches) a copy per device.
    """

    def __init__(
        self,
        head_dim: int,
        sketch_dim: int,
        *,
        seed: int = 42,
        orthogonalize: bool = True,
        hadamard: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if sketch_dim <= 0 or sketch_dim % 8:
            raise ValueError(f"sketch_dim must be a positive multiple of 8, got {sketch_dim}")
        if hadamard and head_dim & (head_dim - 1):
            raise ValueError(f"hadamard=True needs head_dim to be a power of two, got {head_dim}")
        self.head_dim = head_dim
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.orthogonalize = orthogonalize
        self.hadamard = hadamard

        matrix = _projection_matrix(head_dim, sketch_dim, seed, orthogonalize, hadamard)
        self._projections = {torch.device("cpu"): matrix}
        if device is not None:
            self.projection_on(device)

    @property
    def projection(self) -> torch.Tensor:
        """``S`` as float32 ``[m, d]`` on the CPU."""
        return self._projections[torch.device("cpu")]

    def projection_on(self, device: torch.device | str) -> torch.Tensor:
        """``S`` as float32 ``[m, d]`` on ``device`` (copied once, then cached). Off the CPU it is the
        transposed view of a dense ``[d, m]`` tensor: the GPU kernels walk sketch coordinates across
        threads, so they read ``S^T`` rows coalesced, in place; the CPU keeps ``[m, d]`` dense."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._projections:
            self._projections[device] = self.projection.t().to(device).contiguous().t()
        return self._projections[device]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every copy of ``S`` this sketch holds (one per device it was used on)."""
        return tuple(self._projections.values())

    def __repr__(self) -> str:
        return (
            f"QJLSketch(head_dim={self.head_dim}, sketch_dim={self.sketch_dim}, seed={self.seed}, "
            f"orthogonalize={self.orthogonalize}, hadamard={self.hadamard})"
        )
