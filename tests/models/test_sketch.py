import math

import pytest
import torch

from models import QJLSketch


@pytest.mark.parametrize("dim,m", [(64, 64), (64, 200), (128, 256), (128, 96)])
def test_orthogonal_blocks_with_row_norm_sqrt_d(dim, m):
    s = QJLSketch(dim, m, seed=1).projection.double()
    assert s.shape == (m, dim) and s.dtype == torch.float64
    for start in range(0, m, dim):
        block = s[start : start + dim]
        torch.testing.assert_close(block @ block.T, dim * torch.eye(block.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-4)


def test_gaussian_rows_are_not_orthogonal():
    s = QJLSketch(64, 64, seed=1, orthogonalize=False).projection
    gram = s @ s.T
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() > 1.0


def test_hadamard_keeps_orthogonality_and_changes_matrix():
    plain = QJLSketch(64, 128, seed=2).projection
    rotated = QJLSketch(64, 128, seed=2, hadamard=True).projection
    assert not torch.allclose(plain, rotated)
    torch.testing.assert_close(rotated[:64] @ rotated[:64].T, 64 * torch.eye(64), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="power of two"):
        QJLSketch(96, 128, hadamard=True)


def test_seeded_and_deterministic():
    assert torch.equal(QJLSketch(64, 128, seed=5).projection, QJLSketch(64, 128, seed=5).projection)
    assert not torch.equal(QJLSketch(64, 128, seed=5).projection, QJLSketch(64, 128, seed=6).projection)


def test_projection_on_device_is_cached():
    sketch = QJLSketch(64, 64)
    assert sketch.projection_on("cpu") is sketch.projection


def test_projection_off_the_cpu_is_s_transposed_dense():
    # The GPU kernels read S^T rows in place (no copy per call); the CPU keeps [m, d] dense.
    sketch = QJLSketch(64, 256, seed=3)
    assert sketch.projection.is_contiguous()
    on_meta = sketch.projection_on("meta")
    assert on_meta is sketch.projection_on("meta")
    assert on_meta.shape == (256, 64) and on_meta.dtype == torch.float32
    assert on_meta.t().is_contiguous() and not on_meta.is_contiguous()


def test_gaussian_row_norms_near_sqrt_d():
    s = QJLSketch(128, 4096, seed=0, orthogonalize=False).projection
    assert abs(s.norm(dim=1).mean().item() / math.sqrt(128) - 1) < 0.02


@pytest.mark.parametrize("dim,m", [(0, 64), (64, 0), (64, 12)])
def test_rejects_bad_sizes(dim, m):
    with pytest.raises(ValueError):
        QJLSketch(dim, m)


def test_cache_runs_on_the_gpu_layout_of_the_projection():
    """A cache whose projection is S^T-dense (what projection_on gives off the CPU) computes what
    the [m, d]-dense one does: every op reads S through its strides. Checked on the CPU by giving
    the CPU that layout."""
    import models
    from tiny import step_logits, tiny_model, tokens

    model, ids = tiny_model(), tokens(2, 150)
    config = models.QJLConfig(buffer_size=32)

    def logits(transposed: bool):
        cache = models.QJLCache(model.config, config)
        if transposed:
            for layer in cache.layers:
                sketch = layer.key_store.sketch
                cpu = torch.device("cpu")
                sketch._projections[cpu] = sketch._projections[cpu].t().contiguous().t()
                assert not sketch.projection_on("cpu").is_contiguous()
        return step_logits(model, cache, ids, [100] + [1] * 50)

    torch.testing.assert_close(logits(True), logits(False), rtol=1e-4, atol=1e-4)
