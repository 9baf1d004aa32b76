"""Shared oracles of the kernel tiers (CUDA and Triton): test cases, tolerances per dtype, and
the bit-exactness check with its rounding-tie exception."""

from __future__ import annotations

import torch

from qjl_kernel.packing import unpack_sign_bits

# A sign bit may differ from the reference only where the float64 sketch coordinate is within
# SIGN_MARGIN * sum_j |S_ij k_j| of 0 (the two sides round differently there).
SIGN_MARGIN = 1e-4
NORM_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
# Scores: |got - want| <= SCORE_ATOL * ||q|| ||k||.
SCORE_ATOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5}
# value_matmul: |got - want| <= MATMUL_RTOL * (|weights| @ |dequant(V)|).
MATMUL_RTOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5}


def generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def keys_case(case, dtype, device, seed=0):
    """Keys with planted outlier channels, their top-norm outliers and a Gaussian projection for
    ``case = (batch, kv_heads, ratio, n_groups, group, d, m, m_o, n_out)``."""
    batch, kv_heads, ratio, n_groups, group, d, m, m_o, n_out = case
    keys = torch.randn(batch, kv_heads, n_groups, group, d, device=device, generator=generator(seed, device))
    keys[..., :3] *= 8  # planted outlier channels
    keys = keys.to(dtype)
    outliers = keys.float().norm(dim=3).topk(n_out, dim=-1).indices.to(torch.uint8)
    projection = torch.randn(m, d, device=device, generator=generator(seed + 1, device))
    return keys, outliers, projection, m_o


def assert_safe_signs_equal(got, want, keys, outliers, projection, m_o):
    """Sign bits of ``got`` equal ``want``'s wherever the sketch is safely away from 0, and at
    least 99% of the coordinates are safe."""
    k = keys.double()
    mask = torch.zeros(*k.shape[:3], 1, k.shape[-1], dtype=torch.float64, device=k.device)
    mask.scatter_(-1, outliers.long().unsqueeze(3), 1.0)
    s = projection.double()
    for name, part, rows in (("bits", k * (1 - mask), s), ("outlier_bits", k * mask, s[:m_o])):
        sketch = part @ rows.T
        margin = SIGN_MARGIN * (part.abs() @ rows.abs().T)
        safe = (sketch.abs() > margin) | (margin == 0)
        got_bits, want_bits = getattr(got, name), getattr(want, name)
        assert got_bits.shape == want_bits.shape and got_bits.dtype == torch.uint8, name
        g, w = unpack_sign_bits(got_bits), unpack_sign_bits(want_bits)
        assert torch.equal(g[safe], w[safe]), f"{name}: {(g[safe] != w[safe]).sum()} sign bits differ"
        assert safe.numel() == 0 or safe.float().mean() > 0.99


def narrowed(t: torch.Tensor, extra: int) -> torch.Tensor:
    """The same values as a view of a bigger buffer along dim 2 (as the cache stores them)."""
    shape = list(t.shape)
    shape[2] += extra
    buf = torch.full(shape, 0, dtype=t.dtype, device=t.device)
    buf.narrow(2, 0, t.shape[2]).copy_(t)
    return buf.narrow(2, 0, t.shape[2])


def assert_matmul_close(got, want, weights, state, dtype):
    """value_matmul: float32 ``[B, H_q, L, d]`` within MATMUL_RTOL[dtype] * (|weights| @ |dequant(V)|)."""
    from qjl_kernel import reference

    assert got.shape == want.shape and got.dtype == torch.float32
    batch, q_heads, length, tokens = weights.shape
    dense = reference.dequantize_values_ref(state).abs()  # [B, H_kv, T, d]
    w = weights.float().abs().view(batch, dense.shape[1], q_heads // dense.shape[1], length, tokens)
    bound = MATMUL_RTOL[dtype] * (w @ dense.unsqueeze(2)).view_as(want) + 1e-6
    err = (got - want).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"
