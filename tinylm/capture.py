"""Post-RoPE queries and keys of the shipped tiny model on a synthetic task example: real (if
small) model keys for distortion plots and tests.

    from tinylm.capture import example_queries_keys
    qk = example_queries_keys("passkey", length=2048)
    q, k = qk.layers[0]  # [1, H_q, T, 128], [1, H_kv, T, 128] float32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import synthetic_tasks
from models.capture import capture_queries_keys
from tinylm import MODEL_DIR


@dataclass(frozen=True)
class ExampleQueriesKeys:
    """``layers[i] = (queries [1, H_q, T, d], keys [1, H_kv, T, d])`` after RoPE, float32 CPU,
    for the prompt ``input_ids [1, T]`` of ``record``; ``answer_positions`` are the prompt
    positions of the answer's number in the context (its two statements in the needle: where
    retrieval must attend)."""

    record: dict
    input_ids: torch.Tensor
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    answer_positions: list[int]


def load_model(model_dir=MODEL_DIR):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _answer_positions(tokenizer, ids: list[int], answer: str) -> list[int]:
    token = tokenizer.convert_tokens_to_ids(answer)
    return [i for i, t in enumerate(ids) if t == token]


def example_queries_keys(
    task: str = "passkey", length: int = 2048, seed: int = 0, index: int = 0, model=None, tokenizer=None
) -> ExampleQueriesKeys:
    """Queries and keys of every layer on example ``index`` of ``synthetic_tasks.generate(task,
    ..., [length], seed)``; loads the shipped model unless ``model`` and ``tokenizer`` are given."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model()
    record = synthetic_tasks.generate(task, index + 1, [length], seed)[index]
    prompt = synthetic_tasks.load_table("dataset2prompt")[task].format(**record)
    ids = tokenizer(prompt).input_ids
    input_ids = torch.tensor([ids])
    layers = capture_queries_keys(model, input_ids)
    return ExampleQueriesKeys(record, input_ids, layers, _answer_positions(tokenizer, ids, record["answers"][0]))
