"""quantize_keys / key_scores against docs/DESIGN.md's estimator computed independently in float64."""

import math

import numpy as np
import pytest
import torch

import qjl_kernel
from models import QJLSketch, select_outliers

C = math.sqrt(math.pi / 2)


def _case(batch=2, kv_heads=2, ratio=1, n_groups=3, group=8, dim=64, m=128, n_out=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, n_groups, group, dim, generator=gen)
    keys[..., :3] *= 8  # planted outlier channels
    query = torch.randn(batch, kv_heads * ratio, 2, dim, generator=gen)
    outliers = select_outliers(keys, n_out)
    sketch = QJLSketch(dim, m, seed=seed)
    return keys, query, outliers, sketch.projection


def _formula_float64(keys, query, outliers, projection, m_o):
    """docs/DESIGN.md section 1, token by token in float64."""
    batch, kv_heads, n_groups, group, dim = keys.shape
    q_heads, length = query.shape[1], query.shape[2]
    ratio = q_heads // kv_heads
    s = projection.double()
    m = s.shape[0]
    out = torch.zeros(batch, q_heads, length, n_groups * group, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // ratio
            for n in range(n_groups):
                o = outliers[b, kv, n].long()
                mask = torch.zeros(dim, dtype=torch.float64)
                mask[o] = 1.0
                for t in range(group):
                    k = keys[b, kv, n, t].double()
                    k_in, k_out = k * (1 - mask), k * mask
                    sign_in = torch.where(s @ k_in > 0, 1.0, -1.0).double()
                    sign_out = torch.where(s[:m_o] @ k_out > 0, 1.0, -1.0).double()
                    for l in range(length):
                        q = query[b, h, l].double()
                        sq_in = s @ q - s[:, o] @ q[o]
                        est = C / m * k_in.norm() * (sq_in @ sign_in)
                        if m_o:
                            est += C / m_o * k_out.norm() * ((s[:m_o, o] @ q[o]) @ sign_out)
                        out[b, h, l, n * group + t] = est
    return out


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("n_out,m_o", [(0, 0), (4, 64), (4, 128)])
def test_scores_match_float64_formula(ratio, n_out, m_o):
    keys, query, outliers, projection = _case(ratio=ratio, n_out=n_out)
    state = qjl_kernel.quantize_keys(keys, outliers, projection, m_o)
    scores = qjl_kernel.key_scores(query, state, projection)
    expected = _formula_float64(keys, query, outliers, projection, m_o)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


def test_zero_outliers_is_plain_qjl():
    keys, query, _, projection = _case(n_out=0)
    none = torch.zeros(*keys.shape[:3], 0, dtype=torch.uint8)
    state = qjl_kernel.quantize_keys(keys, none, projection, 0)
    k = keys.flatten(2, 3).double()  # [B, H, T, d]
    s = projection.double()
    plain = C / s.shape[0] * k.norm(dim=-1).unsqueeze(2) * (
        (query.double() @ s.T) @ torch.where(k @ s.T > 0, 1.0, -1.0).double().transpose(-1, -2)
    )
    torch.testing.assert_close(qjl_kernel.key_scores(query, state, projection).double(), plain, rtol=1e-4, atol=1e-4)
    assert state.outlier_bits.shape[-1] == 0
    assert torch.count_nonzero(state.outlier_norms) == 0


def test_three_dim_query_is_one_row():
    keys, query, outliers, projection = _case()
    state = qjl_kernel.quantize_keys(keys, outliers, projection, 64)
    full = qjl_kernel.key_scores(query[:, :, :1], state, projection)
    assert torch.equal(qjl_kernel.key_scores(query[:, :, 0], state, projection), full[:, :, 0])


def test_dequantized_keys_reproduce_scores():
    keys, query, outliers, projection = _case(ratio=2)
    state = qjl_kernel.quantize_keys(keys, outliers, projection, 64)
    k_hat = qjl_kernel.dequantize_keys(state, projection).flatten(2, 3)  # [B, Hkv, T, d]
    k_hat = k_hat.repeat_interleave(2, dim=1)
    torch.testing.assert_close(
        query @ k_hat.transpose(-1, -2), qjl_kernel.key_scores(query, state, projection), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keys(dtype):
    keys, query, outliers, projection = _case()
    state = qjl_kernel.quantize_keys(keys.to(dtype), outliers, projection, 64)
    assert state.inlier_norms.dtype == dtype and state.outlier_norms.dtype == dtype
    reference = qjl_kernel.quantize_keys(keys.to(dtype).float(), outliers, projection, 64)
    assert torch.equal(state.bits, reference.bits)
    scores = qjl_kernel.key_scores(query.to(dtype), state, projection)
    assert torch.isfinite(scores).all()


def test_zero_keys_give_finite_zero_scores():
    keys, query, outliers, projection = _case()
    keys.zero_()
    state = qjl_kernel.quantize_keys(keys, outliers, projection, 64)
    scores = qjl_kernel.key_scores(query, state, projection)
    assert torch.equal(scores, torch.zeros_like(scores))


@pytest.mark.parametrize("n_out", [0, 4])
def test_unbiased_with_gaussian_sketch(n_out):
    # Fixed q, k; 400 independent Gaussian sketches; the mean estimate must be within 2% of
    # ||q|| ||k|| of the truth (its standard error is ~0.4% here).
    gen = torch.Generator().manual_seed(3)
    dim, m = 64, 128
    k = torch.randn(1, 1, 1, 32, dim, generator=gen)
    k[..., :2] *= 6
    q = torch.randn(1, 1, 1, dim, generator=gen)
    q = q + 0.5 * k[0, 0, 0, :1]  # correlated with the first key, so the truth is not ~0
    truth = (q[0, 0, 0].double() @ k[0, 0, 0].double().T)
    scale = q.double().norm() * k[0, 0, 0].double().norm(dim=-1)
    outliers = select_outliers(k, n_out)
    estimates = []
    for seed in range(400):
        s = QJLSketch(dim, m, seed=seed, orthogonalize=False).projection
        state = qjl_kernel.quantize_keys(k, outliers, s, 64 if n_out else 0)
        estimates.append(qjl_kernel.key_scores(q, state, s)[0, 0, 0].double())
    bias = (torch.stack(estimates).mean(0) - truth) / scale
    assert bias.abs().max() < 0.02, bias.abs().max()


def _mean_relative_error(m, orthogonalize, dim=64, trials=6):
    errors = []
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(1, 1, 8, 32, dim, generator=gen)
    q = torch.randn(1, 1, 32, dim, generator=gen)
    none = torch.zeros(1, 1, 8, 0, dtype=torch.uint8)
    truth = q.double() @ k.flatten(2, 3).double().transpose(-1, -2)
    scale = q.double().norm(dim=-1, keepdim=True) * k.flatten(2, 3).double().norm(dim=-1).unsqueeze(-2)
    for seed in range(trials):
        s = QJLSketch(dim, m, seed=100 + seed, orthogonalize=orthogonalize).projection
        est = qjl_kernel.key_scores(q, qjl_kernel.quantize_keys(k, none, s, 0), s).double()
        errors.append(((est - truth) / scale).abs().mean())
    return float(torch.stack(errors).mean())


def test_distortion_falls_like_inverse_sqrt_m():
    ms = [64, 128, 256, 512, 1024]
    errors = [_mean_relative_error(m, orthogonalize=False) for m in ms]
    slope = np.polyfit(np.log(ms), np.log(errors), 1)[0]
    assert -0.6 <= slope <= -0.4, (slope, errors)


def test_orthogonalized_sketch_has_lower_distortion():
    assert _mean_relative_error(256, orthogonalize=True) < 0.85 * _mean_relative_error(256, orthogonalize=False)


def test_scores_too_large_for_memory_fail_at_once():
    # The reference computed 64-row chunks and concatenated them at the end, so no allocation was
    # refused: a request for terabytes grew the process for minutes until the system killed it.
    import time

    from qjl_kernel import QuantizedKeys

    groups, group, rows, dim = 2**26, 32, 2**16, 16  # 2^31 keys x 2^16 rows: 512 TiB, past any address space
    keys = QuantizedKeys(
        torch.zeros(1, 1, 1, 1, 1, dtype=torch.uint8).expand(1, 1, groups, group, 1),
        torch.zeros(1, 1, groups, group, 0, dtype=torch.uint8),
        torch.ones(1, 1, 1, 1).expand(1, 1, groups, group),
        torch.ones(1, 1, 1, 1).expand(1, 1, groups, group),
        torch.zeros(1, 1, groups, 0, dtype=torch.uint8),
    )
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        qjl_kernel.key_scores(torch.randn(1, 1, 1, dim).expand(1, 1, rows, dim), keys, torch.randn(8, dim))
    assert time.perf_counter() - start < 10
