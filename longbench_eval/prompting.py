"""Prompt construction with LongBench's rules: template, middle truncation, chat formatting."""

from __future__ import annotations

from collections.abc import Iterable

from .tables import NO_CHAT_DATASETS

# FastChat's "vicuna" conversation (vicuna_v1.1), which LongBench uses for longchat and vicuna
# models: system message, then "USER: <prompt> ASSISTANT:" separated by single spaces.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_FORMATS = ("auto", "tokenizer", "vicuna", "llama2", "none")


def truncate_middle(tokenizer, prompt: str, max_length: int) -> str:
    """LongBench's truncation: when the tokenized prompt (special tokens included) is longer than
    ``max_length``, keep the decoded first ``int(max_length / 2)`` and last ``int(max_length / 2)``
    tokens, concatenated as text (special tokens skipped). The middle is cut because instructions
    sit at both ends of the templates. The text is re-tokenized later, so the final length may
    differ from ``max_length`` by a few tokens, as in LongBench."""
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail


def resolve_chat_format(chat_format: str, tokenizer, model_names: Iterable[str]) -> str:
    """``auto``: the tokenizer's chat template when it has one; else the vicuna template for
    longchat/vicuna model names and ``[INST]...[/INST]`` for llama2 names (LongBench's choices);
    else no chat formatting (base models)."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_format == "tokenizer" and not has_template:
        raise ValueError("--chat_format tokenizer: this tokenizer has no chat template")
    if chat_format != "auto":
        return chat_format
    if has_template:
        return "tokenizer"
    names = " ".join(model_names).lower()
    if "longchat" in names or "vicuna" in names:
        return "vicuna"
    if "llama2" in names or ("llama-2" in names and "chat" in names):
        return "llama2"
    return "none"


def format_chat(tokenizer, prompt: str, chat_format: str) -> tuple[str, bool]:
    """The chat-formatted text and whether tokenizing it should add special tokens (a chat
    template writes its own BOS, the plain-text templates rely on the tokenizer's)."""
    if chat_format == "tokenizer":
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    if chat_format == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:", True
    if chat_format == "llama2":
        return f"[INST]{prompt}[/INST]", True
    if chat_format == "none":
        return prompt, True
    raise ValueError(f"resolved chat format must be one of {CHAT_FORMATS[1:]}, got {chat_format!r}")


def build_prompt(
    tokenizer, example: dict, dataset: str, prompt_format: str, max_length: int, chat_format: str
) -> tuple[str, bool]:
    """Template -> middle truncation to ``max_length`` tokens -> chat formatting (skipped for
    LongBench's few-shot and code tasks). ``chat_format`` is a resolved one (not ``auto``)."""
    prompt = truncate_middle(tokenizer, prompt_format.format(**example), max_length)
    if dataset in NO_CHAT_DATASETS:
        return prompt, True
    return format_chat(tokenizer, prompt, chat_format)


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, truncation=False, add_special_tokens=add_special_tokens).input_ids)


def stop_token_ids(tokenizer, generation_config, dataset: str) -> list[int]:
    """End-of-sequence ids: the model's generation config and the tokenizer's; for samsum also
    the newline token (LongBench: the last id of ``encode("\\n")``), which stops the model from
    writing further dialogue turns."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id):
        if value is not None and value not in ids:
            ids.append(int(value))
    if dataset == "samsum":
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        if newline not in ids:
            ids.append(int(newline))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an eos token")
    return ids
