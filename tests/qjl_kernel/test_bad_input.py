"""Bad arguments raise ValueError/TypeError whose message names the argument."""

import pytest
import torch

import qjl_kernel
from qjl_kernel import QuantizedValues

D, M = 64, 128


def _keys(shape=(1, 2, 2, 8, D)):
    return torch.randn(shape)


def _outliers(n=4, shape=(1, 2, 2)):
    return torch.zeros(*shape, n, dtype=torch.uint8) + torch.arange(n, dtype=torch.uint8)


def _proj(m=M, d=D):
    return torch.randn(m, d)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(keys=torch.randn(1, 2, 8, D)), ValueError, "keys must have rank 5"),
        (dict(keys=torch.ones(1, 2, 2, 8, D, dtype=torch.int32)), TypeError, "keys must have dtype"),
        (dict(keys=[1.0]), TypeError, "keys must be a torch.Tensor"),
        (dict(outlier_indices=_outliers(shape=(1, 2, 3))), ValueError, "outlier_indices must be"),
        (dict(outlier_indices=torch.zeros(1, 2, 2, 4)), TypeError, "outlier_indices must have dtype"),
        (dict(outlier_indices=_outliers() + 100), ValueError, r"outlier_indices must lie in \[0, 64\)"),
        (dict(outlier_indices=_outliers().index_fill(-1, torch.tensor([1]), 3)), ValueError, "distinct channels"),
        (dict(outlier_indices=_outliers().int().index_fill(-1, torch.tensor([0]), -1)), ValueError, "must lie in"),
        (dict(projection=_proj(m=100)), ValueError, "sketch size m"),
        (dict(projection=_proj(d=32)), ValueError, "projection must be"),
        (dict(outlier_sketch_dim=12), ValueError, "outlier_sketch_dim"),
        (dict(outlier_sketch_dim=256), ValueError, "outlier_sketch_dim"),
        (dict(outlier_sketch_dim=0), ValueError, "outlier_sketch_dim must be > 0"),
    ],
)
def test_quantize_keys_rejects(kwargs, error, match):
    args = dict(keys=_keys(), outlier_indices=_outliers(), projection=_proj(), outlier_sketch_dim=64)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        qjl_kernel.quantize_keys(**args)


def test_key_scores_rejects():
    proj = _proj()
    state = qjl_kernel.quantize_keys(_keys(), _outliers(), proj, 64)
    with pytest.raises(ValueError, match="query must have rank"):
        qjl_kernel.key_scores(torch.randn(D), state, proj)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        qjl_kernel.key_scores(torch.randn(1, 3, 1, D), state, proj)
    with pytest.raises(ValueError, match="query batch"):
        qjl_kernel.key_scores(torch.randn(2, 2, 1, D), state, proj)
    with pytest.raises(ValueError, match="keys were sketched with m = 128"):
        qjl_kernel.key_scores(torch.randn(1, 2, 1, D), state, _proj(m=256))
    with pytest.raises(ValueError, match="projection must be"):
        qjl_kernel.key_scores(torch.randn(1, 2, 1, 32), state, proj)
    with pytest.raises(TypeError, match="keys must be a QuantizedKeys"):
        qjl_kernel.key_scores(torch.randn(1, 2, 1, D), tuple(state), proj)
    with pytest.raises(TypeError, match="keys.bits must have dtype"):
        qjl_kernel.key_scores(torch.randn(1, 2, 1, D), state._replace(bits=state.bits.int()), proj)


def test_key_scores_of_no_query_rows_are_empty():
    # zero new tokens used to fail with "torch.cat(): expected a non-empty list of Tensors"
    proj = _proj()
    state = qjl_kernel.quantize_keys(_keys(), _outliers(), proj, 64)
    for backend in ("auto", "reference"):
        with qjl_kernel.use_backend(backend):
            scores = qjl_kernel.key_scores(torch.randn(1, 4, 0, D), state, proj)
        assert scores.shape == (1, 4, 0, 16) and scores.dtype == torch.float32


@pytest.mark.parametrize(
    "values,group_size,bits,error,match",
    [
        (torch.randn(4, 64), 32, 3, ValueError, "bits must be one of"),
        (torch.randn(4, 64), 24, 2, ValueError, "group_size must be a positive divisor"),
        (torch.randn(4, 64), 0, 2, ValueError, "group_size"),
        (torch.randn(4, 64), 32.0, 2, TypeError, "group_size must be an int"),
        (torch.randn(64), 32, 2, ValueError, "values must be"),
        (torch.randint(0, 3, (4, 64)), 32, 2, TypeError, "values must have dtype"),
        (torch.randn(4, 24), 8, 2, ValueError, "multiple of 16"),
    ],
)
def test_quantize_values_rejects(values, group_size, bits, error, match):
    with pytest.raises(error, match=match):
        qjl_kernel.quantize_values(values, group_size, bits)


def test_value_matmul_rejects():
    q = qjl_kernel.quantize_values(torch.randn(1, 2, 5, D), 32, 2)
    with pytest.raises(ValueError, match="weights must be"):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 6), q)
    with pytest.raises(ValueError, match="weights heads"):
        qjl_kernel.value_matmul(torch.randn(1, 3, 1, 5), q)
    with pytest.raises(ValueError, match="weights must have rank 4"):
        qjl_kernel.value_matmul(torch.randn(2, 1, 5), q)
    with pytest.raises(ValueError, match="bits must be one of"):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 5), q._replace(bits=3))
    with pytest.raises(TypeError, match="values must be a QuantizedValues"):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 5), tuple(q))
    bad = QuantizedValues(q.codes, q.scales[..., :1], q.mins, 2, 32)
    with pytest.raises(ValueError, match="values.scales"):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 5), bad)


def test_backend_override():
    x = torch.randn(1, 1, 4, 32)
    assert qjl_kernel.backend_for(x) == "reference"
    with qjl_kernel.use_backend("reference"):
        assert qjl_kernel.backend_for(x) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        qjl_kernel.set_backend("tpu")
    with qjl_kernel.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="forced to 'cuda'"):
            qjl_kernel.quantize_values(x, 32, 2)
    assert qjl_kernel.backend_for(x) == "reference"


def test_outlier_index_check_reports_values_on_cpu():
    """CPU tensors: the check reads the indices back and names what is wrong."""
    from qjl_kernel import _checks

    _checks.outlier_channels(_outliers(), D)  # fine
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\), got values in \[0, 70\]"):
        _checks.outlier_channels(_outliers().index_fill(-1, torch.tensor([2]), 70), D)
    with pytest.raises(ValueError, match="distinct channels"):
        _checks.outlier_channels(_outliers().index_fill(-1, torch.tensor([0, 1]), 5), D)


def gpu_tier(test):
    """GPU tier: ``pytest -m cuda`` on a machine with a CUDA GPU."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.cuda(test)


@gpu_tier
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_quantize_keys_does_not_sync_on_gpu(backend):
    """The index check must not read back to the host (it was a sync per quantize_keys call)."""
    if backend == "triton" and qjl_kernel.backend_info().triton is None:
        pytest.skip("triton is not importable")
    keys, idx, proj = _keys().cuda(), _outliers().cuda(), _proj().cuda()
    with qjl_kernel.use_backend(backend):
        qjl_kernel.quantize_keys(keys, idx, proj, 64)  # compile / load before the sync check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            state = qjl_kernel.quantize_keys(keys, idx, proj, 64)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert state.bits.is_cuda


@gpu_tier
def test_bad_outlier_indices_fail_on_gpu():
    """A repeated index on the GPU fails the device assertion (in a child: it ends the CUDA context)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, qjl_kernel\n"
        "k = torch.randn(1, 2, 2, 8, 64, device='cuda')\n"
        "i = torch.zeros(1, 2, 2, 4, dtype=torch.uint8, device='cuda')\n"  # channel 0 four times
        "qjl_kernel.quantize_keys(k, i, torch.randn(128, 64, device='cuda'), 64)\n"
        "torch.cuda.synchronize()\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "distinct channels" in out or "device-side assert" in out, out[-3000:]
