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


def sentencepiece_corpus() -> list[str]:
    """A few KB of training lines: LongBench's templates, the vicuna system message, and prose,
    code and Chinese built from fixed words (deterministic)."""
    from longbench_eval import prompting, tables

    words = ("the story of a quick brown fox who reads long documents and answers questions about "
             "passages paragraphs code numbers summary dialogue").split()  # fmt: skip
    lines = [*tables.load_tables().dataset2prompt.values(), prompting.VICUNA_SYSTEM]
    for i in range(60):
        lines.append(" ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 9)) + f" {i * 37}.")
        lines.append(f"def f{i}(x):\n    return x  +  {i}\n\tpass")
    lines += ["长文本的问题和答案。", "请阅读以下文字并回答问题。"] * 5
    return [line for text in lines for line in text.splitlines() if line.strip()]


def save_sentencepiece_tokenizer(path: Path, legacy: bool | None = None, vocab_size: int = 700) -> Path:
    """A Llama-style tokenizer directory (tokenizer.model + tokenizer_config.json, no
    tokenizer.json: as lmsys/longchat-7b-v1.5-32k ships) with a tiny sentencepiece BPE model
    trained here with Llama's options: byte fallback, digits split, whitespace kept as is
    (identity normalization), dummy prefix, <unk>/<s>/</s> = 0/1/2."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentencepiece_corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.9995, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}  # fmt: skip
    if legacy is not None:
        config["legacy"] = legacy
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def save_tiny_sentencepiece_model(path: Path) -> Path:
    """:func:`save_tiny_model`'s random Llama with the sentencepiece tokenizer of
    :func:`save_sentencepiece_tokenizer` (the layout of a longchat / Llama-2 directory)."""
    import sentencepiece as spm

    save_sentencepiece_tokenizer(path)
    vocab_size = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=vocab_size, max_position_embeddings=1024, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
