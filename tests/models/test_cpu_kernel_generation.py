"""Generation through QJLCache / KIVICache with the C++ CPU kernel equals the reference path.

The cache runs every step whose rows all see the stored state (every single-token decode step but
the one that completes a block) through the fused op ``qjl_kernel.decode_attention``; on CPU tensors
that is the C++ kernel when the extension is built. Steps that complete a block take the composed path. The reference backend runs the
same steps with the pure-PyTorch references.
"""

from __future__ import annotations

import pytest
import torch

import models
import qjl_kernel
from qjl_kernel import ops as qjl_ops
from tiny import step_logits, tiny_model, tokens

needs_cpu_kernel = pytest.mark.skipif(
    not qjl_ops._HAS_CPU_KERNELS, reason=f"qjl_kernel._C has no CPU kernels: {qjl_kernel.backend_info().reason}"
)

# The kernel and the reference differ by float32 summation order only (scores from the same sign
# bits, the same dequantized values); relative logit error ||dl|| / ||l - mean(l)|| over a decode.
# 1e-3 for float32 is the goal; bfloat16 models round activations between layers, so a tiny
# score difference can move a rounding: 3e-2 as for the other backends.
RELATIVE_LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["qjl", "kivi"]
# GQA 3 (SmolLM2's ratio), head_dim 64, two sequences with left padding; a prompt, a multi-token
# step across a commit boundary (composed path), then single-token decode steps (fused path).
# Groups of 16 tokens commit every 32 and values leave a 32-token window.
SETUP = dict(model=dict(head_dim=64, heads=6, kv_heads=2, layers=2), batch=2, length=110, pad=7,
             chunks=[60, 9] + [1] * 41, config=dict(buffer_size=32, group_size=16, initial_layers_count=1))


class _CountingOps:
    """Stands in for ``torch.ops.qjl`` and counts the calls of the fused op."""

    def __init__(self, ops):
        self._ops, self.calls = ops, 0

    def __getattr__(self, name):
        if name == "decode_attention":
            self.calls += 1
        return getattr(self._ops, name)


def logits_by_backend(method, dtype, monkeypatch):
    model = tiny_model(**SETUP["model"], dtype=dtype, init=0.04)
    ids = tokens(SETUP["batch"], SETUP["length"])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, : SETUP["pad"]] = False  # the second sequence is left-padded
    config = models.QJLConfig(**SETUP["config"])
    prompt = SETUP["chunks"][0]
    counting = _CountingOps(qjl_ops._OPS)
    monkeypatch.setattr(qjl_ops, "_OPS", counting)
    out = {}
    for backend in ("auto", "reference"):
        with qjl_kernel.use_backend(backend):
            cache = models.make_cache(method, model.config, config)
            out[backend] = step_logits(model, cache, ids, SETUP["chunks"], attention_mask=mask)[:, prompt:]
        if backend == "auto":
            out["kernel_calls"] = counting.calls
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_cpu_kernel_generation_equals_reference(method, dtype_name, monkeypatch):
    dtype = DTYPES[dtype_name]
    out = logits_by_backend(method, dtype, monkeypatch)
    # Every decode step but the one that completes a block (it scores the block compressed on the fly
    # and takes the composed path) runs the kernel.
    decode_steps, buffer = SETUP["chunks"].count(1), SETUP["config"]["buffer_size"]
    first = sum(SETUP["chunks"]) - decode_steps
    fused_steps = sum((p + 1) % buffer != 0 for p in range(first, first + decode_steps))
    assert out["kernel_calls"] >= fused_steps * SETUP["model"]["layers"], "the decode steps did not run the kernel"
    kernel, reference = out["auto"], out["reference"]
    centred = reference - reference.mean(-1, keepdim=True)
    error = (kernel - reference).norm(dim=-1) / centred.norm(dim=-1)
    assert error.max() < RELATIVE_LOGIT_TOLERANCE[dtype], error.max()
    assert (kernel.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
