"""Tiny offline stand-ins for LongBench runs: a byte-level tokenizer, a random Llama, and
LongBench-format jsonl data, all built inside the test session (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ("<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# QJL / KIVI settings that fit head_dim 32 and make short prompts cross several commit groups.
SMALL_QJL_FLAGS = [
    "--key_quantization_bits", "64", "--key_quantization_bits_initial_layers", "128",
    "--initial_layers_count", "1", "--outlier_count_general", "2", "--outlier_count_initial_layers", "2",
    "--outlier_sketch_dim_general", "32", "--outlier_sketch_dim_initial_layers", "32",
    "--value_quantization_bits", "2", "--group_size", "16", "--buffer_size", "32",
]  # fmt: skip


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: one token per UTF-8 byte (ids 0-255), then <s>, </s>,
    <unk>; BOS prepended when special tokens are added; decoding round-trips any text."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        out.chat_template = chat_template
    return out


def save_tiny_model(path: Path) -> Path:
    """A random 2-layer GQA Llama (head_dim 32) and its byte tokenizer, saved like a hub model.
    Weights are drawn wider than usual (initializer_range 0.3) so greedy outputs vary."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=1024, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _example(i: int, dataset: str, length: int) -> dict:
    words = " ".join(f"w{(i * 7 + k) % 13}" for k in range(40 + 10 * i))
    example = {
        "_id": f"{dataset}-{i:03d}",
        "input": "question " + " ".join(f"q{(i * 5 + k) % 11}" for k in range(3 + 2 * i)) + "?",
        "context": f"story {i}: {words}",
        "answers": [f"w{i % 13}", "answer"],
        "length": length,
        "dataset": dataset,
        "language": "en",
        "all_classes": None,
    }
    if dataset == "trec":
        example["all_classes"] = ["Location", "Number", "Person"]
        example["answers"] = [example["all_classes"][i % 3]]
    return example


def write_longbench_data(directory: Path, datasets: dict[str, int], longbench_e: bool = False) -> Path:
    """``{dataset: n_examples}`` -> LongBench-format files ``<dataset>[_e].jsonl``; lengths cycle
    through the three LongBench-E buckets."""
    directory.mkdir(parents=True, exist_ok=True)
    for dataset, n in datasets.items():
        name = f"{dataset}_e" if longbench_e else dataset
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(_example(i, dataset, (1000, 5000, 9000)[i % 3])) + "\n")
    return directory
