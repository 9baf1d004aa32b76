import pytest
import torch

from models import QJLConfig, QJLKeyStore, QJLSketch, ValueStore

DIM, GROUP, BUFFER = 64, 16, 64


def _key_store(outliers=4):
    config = QJLConfig(key_quantization_bits=128, outlier_count_general=outliers, outlier_sketch_dim_general=64,
                       initial_layers_count=0, group_size=GROUP, buffer_size=BUFFER)
    budget = config.layer_budget(0)
    return QJLKeyStore(QJLSketch(DIM, budget.sketch_dim, seed=0), budget, GROUP, BUFFER)


def _assert_same_keys(a, b):
    qa, qb = a.quantized, b.quantized
    for name, x, y in zip(qa._fields, qa, qb):
        assert torch.equal(x, y), name
    assert torch.equal(a.residual, b.residual)


@pytest.mark.parametrize("outliers", [0, 4])
def test_key_streaming_equals_one_shot_and_follows_policy(outliers):
    keys = torch.randn(2, 2, 300, DIM, generator=torch.Generator().manual_seed(0))
    streamed = _key_store(outliers)
    for t in range(300):
        streamed.append(keys[:, :, t : t + 1])
        streamed.commit()
        seen = t + 1
        assert streamed.num_committed == (seen // BUFFER) * BUFFER
        assert streamed.num_residual == seen % BUFFER
    one_shot = _key_store(outliers)
    one_shot.append(keys)
    assert one_shot.commit() == 256
    _assert_same_keys(streamed, one_shot)
    assert one_shot.quantized.bits.shape == (2, 2, 256 // GROUP, GROUP, 128 // 8)
    assert one_shot.quantized.outlier_indices.shape == (2, 2, 256 // GROUP, outliers)


def test_commit_keep_leaves_tokens_in_the_residual():
    store = _key_store()
    store.append(torch.randn(1, 1, 130, DIM))
    assert store.commit(keep=3) == 64 and store.num_residual == 66


def test_padding_does_not_leak_into_the_quantized_state():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 128, DIM, generator=gen)
    valid = torch.ones(1, 128, dtype=torch.bool)
    valid[:, :20] = False
    garbage = keys.clone()
    garbage[:, :, :20] = 1000 * torch.randn(1, 2, 20, DIM, generator=gen)
    a, b = _key_store(), _key_store()
    a.append(keys, valid)
    b.append(garbage, valid)
    a.commit(), b.commit()
    _assert_same_keys(a, b)
    assert torch.count_nonzero(a.quantized.inlier_norms.flatten(2)[..., :20]) == 0
    # Outlier choice of the first group depends on its valid tokens only.
    clean = keys.clone()
    clean[:, :, :20] = 0
    c = _key_store()
    c.append(clean)
    c.commit()
    assert torch.equal(a.quantized.outlier_indices, c.quantized.outlier_indices)


def test_scores_cover_committed_and_residual_tokens():
    store = _key_store()
    keys = torch.randn(1, 2, 100, DIM)
    store.append(keys)
    store.commit()
    query = torch.randn(1, 8, 1, DIM)  # GQA ratio 4
    committed, residual = store.committed_scores(query), store.residual_scores(query)
    assert committed.shape == (1, 8, 1, 64) and residual.shape == (1, 8, 1, 36)
    exact = query.view(1, 2, 4, 1, DIM) @ keys[:, :, 64:].unsqueeze(2).transpose(-1, -2)
    torch.testing.assert_close(residual, exact.view(1, 8, 1, 36))
    # QJL scores estimate the truth with error ~ ||q|| ||k|| / sqrt(m).
    truth = (query.view(1, 2, 4, 1, DIM) @ keys[:, :, :64].unsqueeze(2).transpose(-1, -2)).view(1, 8, 1, 64)
    scale = query.norm(dim=-1, keepdim=True) * keys[:, :, :64].norm(dim=-1).repeat_interleave(4, 1).unsqueeze(2)
    assert ((committed - truth) / scale).abs().mean() < 0.1


@pytest.mark.parametrize("bits", [2, 4, 16])
def test_value_window_slides_and_streaming_equals_one_shot(bits):
    values = torch.randn(2, 2, 200, DIM, generator=torch.Generator().manual_seed(2))
    streamed = ValueStore(bits, GROUP, BUFFER)
    for t in range(200):
        streamed.append(values[:, :, t : t + 1])
        streamed.trim()
        seen = t + 1
        expected_window = seen if bits == 16 else min(seen, BUFFER)
        assert streamed.num_window == expected_window
        assert streamed.num_quantized == seen - expected_window
    one_shot = ValueStore(bits, GROUP, BUFFER)
    one_shot.append(values)
    one_shot.trim()
    assert torch.equal(streamed.window, one_shot.window)
    assert torch.equal(streamed.window, values[:, :, 200 - streamed.num_window :])
    if bits != 16:
        for x, y in zip(streamed.quantized[:3], one_shot.quantized[:3]):
            assert torch.equal(x, y)


def test_memory_accounting_of_stores():
    store = _key_store()
    store.append(torch.randn(1, 2, 130, DIM, dtype=torch.float16))
    store.commit()
    # 128 committed tokens: 16 + 8 bytes of bits, 2 x 4 bytes of float32 norms per token; 4 indices per group.
    committed = 2 * 128 * (16 + 8 + 8) + 2 * (128 // GROUP) * 4
    assert store.committed_nbytes() == committed
    assert store.nbytes() == committed + 2 * 2 * DIM * 2


def test_large_fp16_keys_keep_finite_norms_and_scores():
    # Channels of ~8000 give key norms above 65504, the fp16 maximum: stored as fp16 they were inf
    # and the scores NaN. The store keeps norms in float32, so fp16 keys score as their float32 copy.
    gen = torch.Generator().manual_seed(3)
    keys = (torch.randn(1, 2, BUFFER, DIM, generator=gen) * 8000).half().float()
    query = torch.randn(1, 4, 3, DIM, generator=gen).half().float()
    half, full = _key_store(), _key_store()
    half.append(keys.half())
    full.append(keys)
    half.commit()
    full.commit()
    state = half.quantized
    assert state.inlier_norms.dtype == state.outlier_norms.dtype == torch.float32
    assert (state.inlier_norms > torch.finfo(torch.float16).max).any()  # the case fp16 cannot hold
    got = half.committed_scores(query.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, full.committed_scores(query), rtol=1e-6, atol=0)
