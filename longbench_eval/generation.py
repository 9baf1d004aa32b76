"""Model loading and greedy generation with any cache method of ``models``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import models  # registers the "qjl" attention function
from models import MemoryReport, QJLConfig
from models.pretrained import SMOLLM2, SMOLLM2_INSTALL, load_causal_lm, smollm2_gguf

from .tokenization import load_tokenizer

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def attention_implementation() -> str:
    """``"qjl"``: it runs every method's cache (SDPA for exact and quanto)."""
    return models.ATTN_IMPLEMENTATION


def check_model_source(path: str) -> None:
    """ValueError, before anything loads, when ``path`` cannot name a model: ``"smollm2"`` without
    its wheel, a local directory that is missing or has no config.json. A hub id (``name`` or
    ``org/name``, not on disk) passes: the hub answers for it when the model loads."""
    if path == SMOLLM2:
        try:
            smollm2_gguf()
            if importlib.util.find_spec("gguf") is None:
                raise ModuleNotFoundError(f"reading the SmolLM2 GGUF file needs the gguf package: `{SMOLLM2_INSTALL}`")
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise ValueError(f"model {SMOLLM2!r}: {e}") from e
        return
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory: it has no config.json")
        return
    hub_like = path.count("/") <= 1 and not path.startswith((".", "/", "~")) and "\\" not in path
    if not hub_like or ("/" in path and local.parent.is_dir()):
        raise ValueError(
            f"model directory {path} does not exist; give an existing directory, a key of config/model2path.json "
            "or a hub id (org/name)"
        )


def load_model_and_tokenizer(
    path: str, dtype: str, device: torch.device | None, device_map: str | None = None, tokenizer: str = "slow"
):
    """``device_map`` (e.g. ``auto``) spreads layers over the visible GPUs through accelerate;
    otherwise the whole model goes to ``device``. ``path`` ``"smollm2"`` is the offline
    SmolLM2-135M-Instruct (:mod:`models.pretrained`; its GGUF file holds only a BPE tokenizer).
    ``tokenizer``: ``slow`` (LongBench's) or ``fast``, see :func:`.tokenization.load_tokenizer`;
    :func:`.tokenization.tokenizer_kind` tells which one was loaded."""
    if path == SMOLLM2:
        model, tokenizer = load_causal_lm(SMOLLM2, DTYPES[dtype], attention_implementation())
        return (model if device_map else model.to(device)), tokenizer
    tokenizer = load_tokenizer(path, tokenizer)
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


def _greedy(model, ids: torch.Tensor, cache, max_new_tokens: int, min_new_tokens: int, stop_ids: list[int]):
    return model.generate(
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
    out = _greedy(model, ids, cache, max_new_tokens, min_new_tokens, stop_ids)
    new = out[0, ids.shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), models.memory_report(cache))


@dataclass(frozen=True)
class Prefill:
    """A prompt's exact prefill, shared by every method: the prompt with its first generated
    token appended (``[1, n + 1]``) and the prompt's keys and values."""

    ids: torch.Tensor
    cache: DynamicCache
    stopped: bool  # the first token is a stop token


def prefill(model, input_ids: list[int], stop_ids: list[int], min_new_tokens: int = 0) -> Prefill:
    """Run the prompt once with exact attention and pick the first token as :func:`generate` would."""
    ids = torch.tensor([input_ids], dtype=torch.long, device=input_device(model))
    cache = DynamicCache(config=model.config)
    out = _greedy(model, ids, cache, 1, min(min_new_tokens, 1), stop_ids)
    return Prefill(out, cache, int(out[0, -1]) in stop_ids)


def generate_after_prefill(
    model, tokenizer, shared: Prefill, method: str, qjl_config: QJLConfig | None, max_new_tokens: int,
    stop_ids: list[int], min_new_tokens: int = 0,
) -> Generation:  # fmt: skip
    """:func:`generate` for a prompt already prefilled by :func:`prefill`: the same tokens, without
    running the prompt again (the prompt step is exact attention for every method)."""
    cache = models.prefilled_cache(method, model.config, qjl_config, shared.cache)
    prompt_length = shared.ids.shape[1] - 1
    out = shared.ids
    if not shared.stopped and max_new_tokens > 1:
        out = _greedy(model, shared.ids, cache, max_new_tokens - 1, max(min_new_tokens - 1, 0), stop_ids)
    new = out[0, prompt_length:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), models.memory_report(cache))
