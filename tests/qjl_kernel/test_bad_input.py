"""Bad arguments raise ValueError/TypeError whose message names the argument."""

import numpy as np
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
        (dict(outlier_sketch_dim=64.0), TypeError, "outlier_sketch_dim must be an int"),
        (dict(outlier_sketch_dim=True), TypeError, "outlier_sketch_dim must be an int"),
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
        (torch.randn(4, 64), True, 2, TypeError, "group_size must be an int"),
        (torch.randn(4, 64), 32, 2.0, TypeError, "bits must be an int, got float"),  # was a dispatcher error
        (torch.randn(4, 64), 32, 4.0, TypeError, "bits must be an int, got float"),
        (torch.randn(4, 64), 32, True, TypeError, "bits must be an int, got bool"),
        (torch.randn(4, 64), np.int64(32), 2, TypeError, "group_size must be an int"),
        (torch.randn(4, 64), 32, np.int64(2), TypeError, "bits must be an int"),  # as group_size
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


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(bits=2.0), "values.bits must be an int, got float"),
        (dict(bits=True), "values.bits must be an int, got bool"),
        (dict(group_size=32.0), "values.group_size must be an int, got float"),
        (dict(group_size=24), "values.group_size must be a positive divisor of head_dim 64"),
    ],
)
def test_value_states_with_bad_layout_are_refused(changes, match):
    """A QuantizedValues' bits and group_size are checked like quantize_values' arguments by every op
    that reads one (they used to reach the dispatcher, or a reshape, as raw errors)."""
    q = qjl_kernel.quantize_values(torch.randn(1, 2, 5, D), 32, 2)._replace(**changes)
    error = ValueError if changes.get("group_size") == 24 else TypeError
    with pytest.raises(error, match=match):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 5), q)
    with pytest.raises(error, match=match):
        qjl_kernel.dequantize_values(q)
    with pytest.raises(error, match=match):
        qjl_kernel.decode_attention(*_decode_args(values=q))


@pytest.mark.parametrize(
    "make",
    [
        # one scale per token where the codes' 64 channels hold two groups of 32 (broadcast silently)
        lambda q: QuantizedValues(q.codes, q.scales[..., :1], q.mins[..., :1], 2, 32),
        # group_size 64 on codes quantized in groups of 32 (read as 128 channels before)
        lambda q: q._replace(group_size=64),
        # a 4-bit label on 2-bit codes (32 channels, one group, but two scales per token)
        lambda q: q._replace(bits=4),
    ],
)
def test_value_states_whose_scales_do_not_fit_the_codes_are_refused(make):
    """Scales and mins must hold one entry per token and channel group of the codes, for every op
    that reads a QuantizedValues (dequantize_values broadcast them and returned wrong values)."""
    bad = make(qjl_kernel.quantize_values(torch.randn(1, 2, 5, D), 32, 2))
    with pytest.raises(ValueError, match="values.scales / values.mins must be"):
        qjl_kernel.dequantize_values(bad)
    with pytest.raises(ValueError, match="values.scales / values.mins must be"):
        qjl_kernel.value_matmul(torch.randn(1, 2, 1, 5), bad)


def _decode_args(d=D, keys=None, projection=None, values=None):
    """decode_attention arguments: 16 committed QJL keys (``keys`` / ``projection`` replace them) + 1
    residual key; 5 4-bit quantized values (``values`` replaces them) + 12 window values; B = 1, 2 KV heads."""
    gen = torch.Generator().manual_seed(0)
    if keys is None:
        projection = torch.randn(M, d, generator=gen)
        keys = qjl_kernel.quantize_keys(torch.randn(1, 2, 2, 8, d, generator=gen), _outliers(), projection, 64)
    if values is None:
        values = qjl_kernel.quantize_values(torch.randn(1, 2, 5, d, generator=gen), 8, 4)
    query, residual, window = (torch.randn(1, 2, t, d, generator=gen) for t in (1, 1, 12))
    return query, keys, projection, residual, values, window


def test_key_head_dim_over_256_is_refused():
    """Outlier indices are stored as uint8: with d = 264 the index 260 used to be stored as 4 and the
    scores were silently wrong."""
    d = 264
    keys = torch.randn(1, 1, 1, 32, d)
    keys[..., 260] *= 50
    with pytest.raises(ValueError, match=r"head_dim must be at most 256 .*stored as uint8\), got 264"):
        qjl_kernel.quantize_keys(keys, torch.tensor([[[[260, 3]]]]), torch.randn(M, d), 64)
    # A state (whose indices are all below 128) read with d = 264 queries: refused by every op taking one.
    state = qjl_kernel.quantize_keys(_keys(), _outliers(), _proj(), 64)
    wide = _proj(d=d)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        qjl_kernel.key_scores(torch.randn(1, 2, 1, d), state, wide)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        qjl_kernel.dequantize_keys(state, wide)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        qjl_kernel.decode_attention(*_decode_args(d=d, keys=state, projection=wide))
    # no QJL keys: any head_dim
    values = qjl_kernel.quantize_values(torch.randn(1, 2, 5, d), 8, 4)
    query, residual, window = torch.randn(1, 2, 1, d), torch.randn(1, 2, 17, d), torch.randn(1, 2, 12, d)
    out = qjl_kernel.decode_attention(query, None, None, residual, values, window)
    assert out.shape == (1, 2, 1, d)


def test_key_head_dim_256_keeps_index_255():
    """The largest head_dim: index 255 is stored as such and passes the state checks."""
    d = 256
    indices = torch.tensor([[[[255, 0]]]])
    state = qjl_kernel.quantize_keys(torch.randn(1, 1, 1, 8, d), indices, torch.randn(M, d), 64)
    assert state.outlier_indices.flatten().tolist() == [255, 0]
    assert qjl_kernel.key_scores(torch.randn(1, 1, 1, d), state, torch.randn(M, d)).shape == (1, 1, 1, 8)


def test_stored_outlier_indices_out_of_range_are_refused():
    """A state whose indices reach past head_dim used to fail with a raw IndexError in reference.py."""
    proj = _proj()
    state = qjl_kernel.quantize_keys(_keys(), _outliers(), proj, 64)
    bad = state._replace(outlier_indices=state.outlier_indices.index_fill(-1, torch.tensor([1]), 200))
    match = r"keys.outlier_indices must lie in \[0, 64\) \(head_dim\), got a value 200"
    for backend in ("auto", "reference"):
        with qjl_kernel.use_backend(backend):
            with pytest.raises(ValueError, match=match):
                qjl_kernel.key_scores(torch.randn(1, 2, 1, D), bad, proj)
            with pytest.raises(ValueError, match=match):
                qjl_kernel.dequantize_keys(bad, proj)
            with pytest.raises(ValueError, match=match):
                qjl_kernel.decode_attention(*_decode_args(keys=bad, projection=proj))


def test_stored_outlier_index_check_does_not_read_device_data():
    """Off the CPU the range check is a device-side assertion: meta tensors (no data to read) pass."""
    from qjl_kernel import _checks

    _checks.stored_outlier_channels(torch.zeros(1, 2, 2, 4, dtype=torch.uint8, device="meta"), D)


def test_decode_attention_refuses_head_dim_zero():
    """d = 0 used to fail computing the default scaling d ** -0.5 (ZeroDivisionError)."""
    query, residual, window = torch.randn(1, 2, 1, 0), torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0)
    with pytest.raises(ValueError, match="query must have head_dim d > 0"):
        qjl_kernel.decode_attention(query, None, None, residual, None, window)


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


def test_use_backend_holds_for_its_own_thread():
    # One process-wide variable: a block in one thread forced every thread, and two threads leaving
    # their blocks out of order left the backend forced to "reference" for good (C++ kernels off).
    import threading

    from qjl_kernel import ops

    default = ops.forced_backend()  # "auto" unless QJL_BACKEND says otherwise
    entered, leave_first, left_first = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with qjl_kernel.use_backend("reference"):
            entered.set()
            leave_first.wait(5)
        left_first.set()

    def second():
        entered.wait(5)
        seen["while the other thread's block runs"] = ops.forced_backend()
        with qjl_kernel.use_backend("triton"):
            leave_first.set()
            left_first.wait(5)  # the first block ends inside this one
            seen["own block"] = ops.forced_backend()
        seen["after"] = ops.forced_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"while the other thread's block runs": default, "own block": "triton", "after": default}
    assert ops.forced_backend() == default
    with qjl_kernel.use_backend("reference"):  # nesting on one thread restores the outer block
        with qjl_kernel.use_backend("triton"):
            assert ops.forced_backend() == "triton"
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() == default


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
    _fails_in_a_child(
        "import torch, qjl_kernel\n"
        "k = torch.randn(1, 2, 2, 8, 64, device='cuda')\n"
        "i = torch.zeros(1, 2, 2, 4, dtype=torch.uint8, device='cuda')\n"  # channel 0 four times
        "qjl_kernel.quantize_keys(k, i, torch.randn(128, 64, device='cuda'), 64)\n"
        "torch.cuda.synchronize()\n",
        "distinct channels",
    )


def _fails_in_a_child(code: str, message: str) -> None:
    """``code`` fails in a fresh interpreter with ``message`` or a device-side assertion (a failed
    device assertion ends the CUDA context, so it cannot run in the test process)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out or "device-side assert" in out, out[-3000:]


@gpu_tier
def test_key_state_checks_do_not_sync_on_gpu():
    """The range check of a state's stored indices must not read back to the host (one per decode step)."""
    from qjl_kernel import _checks

    proj = _proj().cuda()
    state = qjl_kernel.quantize_keys(_keys().cuda(), _outliers().cuda(), proj, 64)
    query = torch.randn(1, 2, 1, D, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _checks.key_scores_args(query, state, proj)
        _checks.dequantize_keys_args(state, proj)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu_tier
def test_bad_stored_outlier_indices_fail_on_gpu():
    """A stored index past head_dim on the GPU fails the device assertion (in a child: it ends the CUDA context)."""
    _fails_in_a_child(
        "import torch, qjl_kernel\n"
        "p = torch.randn(128, 64, device='cuda')\n"
        "i = torch.arange(4, device='cuda').expand(1, 2, 2, 4)\n"
        "s = qjl_kernel.quantize_keys(torch.randn(1, 2, 2, 8, 64, device='cuda'), i, p, 64)\n"
        "s = s._replace(outlier_indices=torch.full_like(s.outlier_indices, 200))\n"
        "qjl_kernel.key_scores(torch.randn(1, 2, 1, 64, device='cuda'), s, p)\n"
        "torch.cuda.synchronize()\n",
        "keys.outlier_indices must lie in",
    )
