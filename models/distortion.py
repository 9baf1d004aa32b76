"""Score distortion of QJL: ours (mean per-score error, synthetic or captured keys, with and without
outlier handling) and the original code's (relative L2 error of the last query's score vector)."""

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


# The layers of Llama-2-7B (32 layers) whose keys the original code's distortion plot uses.
ORIGINAL_LAYERS = (0, 1, 2, 4, 8, 16, 31)
ORIGINAL_REFERENCE_LAYERS = 32


def map_layer(layer: int, num_layers: int, reference_layers: int = ORIGINAL_REFERENCE_LAYERS) -> int:
    """The layer of a ``num_layers``-layer model at the same relative depth as ``layer`` of a
    ``reference_layers``-layer one: ``round(layer * (num_layers - 1) / (reference_layers - 1))``."""
    if not 0 <= layer < reference_layers:
        raise ValueError(f"layer must be in [0, {reference_layers}), got {layer}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    return round(layer * (num_layers - 1) / max(reference_layers - 1, 1))


def map_layers(layers=ORIGINAL_LAYERS, num_layers: int = ORIGINAL_REFERENCE_LAYERS,
               reference_layers: int = ORIGINAL_REFERENCE_LAYERS) -> list[int]:
    """:func:`map_layer` of each of ``layers``, in order, without repeats (a shallow model maps
    several reference layers to one). SmolLM2's 30 layers: 0, 1, 2, 4, 7, 15, 29."""
    mapped = [map_layer(layer, num_layers, reference_layers) for layer in layers]
    return list(dict.fromkeys(mapped))


def relative_l2_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """``||estimate - exact|| / ||exact||`` over all entries, in float64."""
    estimate, exact = estimate.double(), exact.double()
    return (torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact)).item()


def last_query_scores(
    queries: torch.Tensor, keys: torch.Tensor, sketch: QJLSketch, *, buffer_size: int = 128, group_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(estimate, exact)`` scores ``[B, H_q, 1, T]`` (float64) of the last query against every key,
    as the original code's distortion plot forms them.

    queries ``[B, H_q, T_q, d]`` (only the last row is used), keys ``[B, H_kv, T, d]`` with
    ``H_q = r * H_kv``. The first ``T - T % buffer_size`` keys (complete blocks) are quantized in
    groups of ``group_size`` with the ``m``-bit sketch and no outlier channels; the remaining ones
    stay exact, as in a cache. ``exact`` is ``q K^T`` in float64 of the given (possibly rounded)
    inputs.
    """
    batch, kv_heads, tokens, dim = keys.shape
    if queries.shape[1] % kv_heads:
        raise ValueError(f"query heads ({queries.shape[1]}) must be a multiple of key heads ({kv_heads})")
    if buffer_size % group_size:
        raise ValueError(f"buffer_size ({buffer_size}) must be a multiple of group_size ({group_size})")
    ratio = queries.shape[1] // kv_heads
    query = queries[:, :, -1:]  # [B, H_q, 1, d]
    keys_per_query_head = keys.double().repeat_interleave(ratio, dim=1)
    exact = query.double() @ keys_per_query_head.transpose(-1, -2)  # [B, H_q, 1, T]
    committed = tokens - tokens % buffer_size
    if committed == 0:
        return exact.clone(), exact
    grouped = keys[:, :, :committed].reshape(batch, kv_heads, committed // group_size, group_size, dim)
    projection = sketch.projection_on(keys.device)
    state = qjl_kernel.quantize_keys(grouped, select_outliers(grouped, 0), projection, 0)
    sketched = qjl_kernel.key_scores(query, state, projection).double()  # [B, H_q, 1, committed]
    estimate = torch.cat([sketched, exact[..., committed:]], dim=-1)
    return estimate, exact


def last_query_distortion(
    queries: torch.Tensor, keys: torch.Tensor, sketch: QJLSketch, *, buffer_size: int = 128, group_size: int = 32
) -> float:
    """The original code's distortion: :func:`relative_l2_error` of :func:`last_query_scores`,
    pooled over every head of the layer."""
    return relative_l2_error(*last_query_scores(queries, keys, sketch, buffer_size=buffer_size,
                                                group_size=group_size))
