"""Generation through QJLCache with the Triton kernels equals the reference path.

CPU tier (CI): the Triton kernels run under Triton's interpreter, which is fixed for a whole process
when triton is imported (other modules import it first), so the runs happen in one child process
started with ``TRITON_INTERPRET=1`` (this file run as a script), which writes the logits of both
backends; the parent compares them. GPU tier (``pytest -m cuda``): compiled kernels, in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import models
import qjl_kernel
from qjl_kernel import triton_ops
from tiny import step_logits, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[2]
# A flipped sign bit on a sketch coordinate within rounding of 0 moves one score by about
# 2 sqrt(pi/2)/m ||k|| |(S q)_j|; over a decode that stays far below these bounds.
RELATIVE_LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["qjl", "kivi"]
# CPU (interpreted): GQA 4, head_dim 64; prompt, a multi-token step across a commit boundary, decode.
# Groups of 16 tokens commit every 16 (keys) and values leave a 16-token window.
CPU_SETUP = dict(model=dict(head_dim=64, heads=4, kv_heads=1, layers=2), batch=1, length=56,
                 chunks=[40, 9] + [1] * 7, config=dict(buffer_size=16, group_size=16, initial_layers_count=1))
GPU_SETUP = dict(model=dict(head_dim=128, heads=8, kv_heads=2, layers=2), batch=2, length=200,
                 chunks=[150, 20] + [1] * 30, config=dict(buffer_size=32, initial_layers_count=1))


def logits_by_backend(method, dtype, setup, device="cpu"):
    """float32 logits of the decode steps ``{backend: [B, T - prompt, V]}`` for triton and reference."""
    model = tiny_model(**setup["model"], dtype=dtype, init=0.04).to(device)
    ids = tokens(setup["batch"], setup["length"]).to(device)
    config = models.QJLConfig(**setup["config"])
    prompt = setup["chunks"][0]
    out = {}
    for backend in ("triton", "reference"):
        with qjl_kernel.use_backend(backend):
            cache = models.make_cache(method, model.config, config)
            out[backend] = step_logits(model, cache, ids, setup["chunks"])[:, prompt:]
    return out


def assert_close_generation(out, dtype):
    triton_logits, reference_logits = out["triton"], out["reference"]
    centred = reference_logits - reference_logits.mean(-1, keepdim=True)
    error = (triton_logits - reference_logits).norm(dim=-1) / centred.norm(dim=-1)
    assert error.max() < RELATIVE_LOGIT_TOLERANCE[dtype], error.max()
    assert (triton_logits.argmax(-1) == reference_logits.argmax(-1)).float().mean() >= 0.95


if __name__ == "__main__":  # the interpreted child: OUT.pt
    assert triton_ops.interpreted(), "the child must run with TRITON_INTERPRET=1"
    results = {(method, name): logits_by_backend(method, dtype, CPU_SETUP)
               for method in METHODS for name, dtype in DTYPES.items()}
    torch.save(results, sys.argv[1])
    sys.exit(0)


import pytest  # noqa: E402  (the child above needs no pytest)

needs_triton = pytest.mark.skipif(triton_ops.TRITON_ERROR is not None,
                                  reason=f"triton is not importable: {triton_ops.TRITON_ERROR}")


@pytest.fixture(scope="module")
def interpreted_logits(tmp_path_factory):
    if triton_ops.interpreted():
        return {(method, name): logits_by_backend(method, dtype, CPU_SETUP)
                for method in METHODS for name, dtype in DTYPES.items()}
    out = tmp_path_factory.mktemp("triton_generation") / "logits.pt"
    this = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(this.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("QJL_BACKEND", None)
    proc = subprocess.run([sys.executable, str(this), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the TRITON_INTERPRET=1 child failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return torch.load(out)


@needs_triton
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_interpreted_triton_generation_equals_reference(method, dtype_name, interpreted_logits):
    assert_close_generation(interpreted_logits[(method, dtype_name)], DTYPES[dtype_name])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.skipif(triton_ops.interpreted(), reason="this process runs Triton's interpreter")
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_gpu_triton_generation_equals_reference(method, dtype_name):
    dtype = DTYPES[dtype_name]
    assert_close_generation(logits_by_backend(method, dtype, GPU_SETUP, "cuda"), dtype)
