"""Model loading and greedy generation with any cache method of ``models``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import models  # registers the "qjl" attention function
from models import MemoryReport, QJLConfig

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def attention_implementation() -> str:
    """``"qjl"``: it runs every method's cache (SDPA for exact and quanto)."""
    return models.ATTN_IMPLEMENTATION


def load_model_and_tokenizer(path: str, dtype: str, device: torch.device | None, device_map: str | None = None):
    """``device_map`` (e.g. ``auto``) spreads layers over the visible GPUs through accelerate;
    otherwise the whole model goes to ``device``."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": DTYPES[dtype], "attn_implementation": attention_implementation()}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(device)
    return model.eval(), tokenizer


def unavailable_reason(method: str, model_config, qjl_config: QJLConfig | None) -> str | None:
    """Why ``method``'s cache cannot be built here (missing backend or not implemented), or None.
    Configuration errors (ValueError) are not caught: they are the user's to fix."""
    try:
        models.make_cache(method, model_config, qjl_config)
    except (ImportError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    memory: MemoryReport


def generate(
    model,
    tokenizer,
    input_ids: list[int],
    method: str,
    qjl_config: QJLConfig | None,
    max_new_tokens: int,
    stop_ids: list[int],
    min_new_tokens: int = 0,
) -> Generation:
    """Greedy decoding of one prompt (batch 1, no padding) with a fresh cache of ``method``; the
    returned memory report is measured on the cache after the last step."""
    ids = torch.tensor([input_ids], dtype=torch.long, device=input_device(model))
    cache = models.make_cache(method, model.config, qjl_config)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
        **models.cache_kwargs(model, cache),
    )
    new = out[0, ids.shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), models.memory_report(cache))
