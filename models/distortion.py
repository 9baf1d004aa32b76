"""Score distortion of QJL on synthetic keys, with and without outlier handling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import qjl_kernel

from .key_store import select_outliers
from .sketch import QJLSketch


def synthetic_keys(
    tokens: int, head_dim: int, *, outlier_channels: int = 4, outlier_scale: float = 10.0, seed: int = 0
) -> torch.Tensor:
    """Gaussian keys ``[tokens, head_dim]`` with a few fixed channels ``outlier_scale`` times larger,
    the pattern seen in the keys of deeper LLM layers."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, head_dim, generator=gen)
    channels = torch.randperm(head_dim, generator=gen)[:outlier_channels]
    keys[:, channels] *= outlier_scale
    return keys


@dataclass(frozen=True)
class Distortion:
    sketch_dim: int
    outlier_count: int
    mean_abs_error: float  # mean |est - <q,k>| / (||q|| ||k||)
    rms_error: float  # sqrt(mean((est - <q,k>)^2)) / (||q|| ||k||)


def score_distortion(
    keys: torch.Tensor,
    queries: torch.Tensor,
    sketch: QJLSketch,
    *,
    outlier_count: int,
    outlier_sketch_dim: int,
    group_size: int = 32,
) -> Distortion:
    """Relative score error of QJL for keys ``[T, d]`` (T a multiple of group_size) and queries
    ``[Q, d]``, errors normalized by ``||q|| ||k||``."""
    tokens, dim = keys.shape
    grouped = keys.view(1, 1, tokens // group_size, group_size, dim)
    outliers = select_outliers(grouped, outlier_count)
    state = qjl_kernel.quantize_keys(grouped, outliers, sketch.projection, outlier_sketch_dim if outlier_count else 0)
    estimate = qjl_kernel.key_scores(queries.view(1, 1, -1, dim), state, sketch.projection)[0, 0]
    truth = queries.double() @ keys.double().T
    scale = queries.double().norm(dim=-1, keepdim=True) * keys.double().norm(dim=-1)
    rel = (estimate.double() - truth) / scale
    return Distortion(sketch.sketch_dim, outlier_count, rel.abs().mean().item(), rel.pow(2).mean().sqrt().item())
