"""GPU tier: generation through QJLCache with the CUDA kernels equals the reference path."""

import pytest
import torch

import models
import qjl_kernel
from tiny import step_logits, tiny_model, tokens

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(qjl_kernel.backend_info().extension is None, reason="the CUDA extension is not built"),
]

# A flipped sign bit on a sketch coordinate within rounding of 0 moves one score by about
# 2 sqrt(pi/2)/m ||k|| |(S q)_j|; over a decode that stays far below these bounds.
RELATIVE_LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["qjl", "kivi"])
def test_cuda_generation_equals_reference(dtype, method):
    model = tiny_model(head_dim=128, heads=8, kv_heads=2, dtype=dtype, init=0.04).cuda()
    ids = tokens(2, 200).cuda()
    config = models.QJLConfig(buffer_size=32, initial_layers_count=1)
    chunks = [150, 20] + [1] * 30  # prompt, a multi-token step across boundaries, decode

    def run(backend):
        with qjl_kernel.use_backend(backend):
            return step_logits(model, models.make_cache(method, model.config, config), ids, chunks)[:, 150:]

    cuda, reference = run("cuda"), run("reference")
    error = (cuda - reference).norm(dim=-1) / (reference - reference.mean(-1, keepdim=True)).norm(dim=-1)
    assert error.max() < RELATIVE_LOGIT_TOLERANCE[dtype], error.max()
    assert (cuda.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
