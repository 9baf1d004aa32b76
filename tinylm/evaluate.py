"""Greedy-decoding accuracy of the tiny model on the synthetic tasks, per KV cache method.

    python -m tinylm.evaluate --n 16 --methods exact qjl kivi --sketch_bits 512 1024 2048

Each prompt is decoded with ``model.generate`` (greedy, fresh cache per example, stop at EOS) and
counts as correct when the normalized prediction equals the answer (LongBench's ``qa_f1_score``
is then 1; with one-word answers it is exact match in practice). Method ``qjl`` is the paper
configuration scaled to the model (:func:`paper_qjl_config`); ``qjl-m<bits>`` uses a ``bits``-bit
sketch in every layer; ``kivi`` is 2-bit KIVI with the same group and buffer sizes.
"""

from __future__ import annotations

import argparse
import string
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import models
import synthetic_tasks
from cli_io import non_negative_int, positive_int
from tinylm import MODEL_DIR


def paper_qjl_config(num_layers: int, **overrides) -> models.QJLConfig:
    """The paper's LongBench configuration (config/qjl_paper_llama2.json: 15 of 32 layers use the
    bigger initial budget) with ``initial_layers_count`` scaled to ``num_layers // 2``."""
    return replace(models.QJLConfig(), initial_layers_count=num_layers // 2, **overrides)


def method_configs(num_layers: int, sketch_bits=()) -> dict[str, tuple[str, models.QJLConfig | None]]:
    """``{label: (cache method, QJLConfig)}`` for exact, qjl (paper), qjl-m<bits> and kivi."""
    configs = {"exact": ("exact", None), "qjl": ("qjl", paper_qjl_config(num_layers))}
    for m in sketch_bits:
        configs[f"qjl-m{m}"] = ("qjl", paper_qjl_config(num_layers, key_quantization_bits=m,
                                                        key_quantization_bits_initial_layers=m))
    configs["kivi"] = ("kivi", models.QJLConfig())
    return configs


def sketch_bits_arg(text: str) -> int:
    """argparse type of ``--sketch_bits``: an m that :func:`method_configs` can build (a multiple of 8
    no smaller than the paper's outlier sketches, which qjl-m<bits> keeps); needs no model."""
    m = positive_int(text)
    try:
        method_configs(1, [m])
    except ValueError:
        paper = models.QJLConfig()
        least = max(paper.outlier_sketch_dim_general, paper.outlier_sketch_dim_initial_layers)
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 8 of at least {least} (qjl-m<bits> keeps the paper's outlier sketches), got {m}"
        ) from None
    return m


def load(model_dir=MODEL_DIR, attn_implementation: str = "qjl"):
    """The shipped model (fp32, eval mode) and tokenizer; ``"qjl"`` attention runs every cache."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.eval(), tokenizer


def normalize(text: str) -> str:
    return "".join(ch for ch in text if ch not in string.punctuation).strip()


@torch.no_grad()
def predict(model, tokenizer, record: dict, method: str = "exact", qjl_config=None) -> str:
    """Greedy answer to one LongBench-format record of a synthetic task."""
    task = record["dataset"]
    prompt = synthetic_tasks.load_table("dataset2prompt")[task].format(**record)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    cache = models.make_cache(method, model.config, qjl_config)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=synthetic_tasks.load_table("dataset2maxlen")[task],
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **models.cache_kwargs(model, cache),
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def accuracy(model, tokenizer, records, method: str = "exact", qjl_config=None) -> float:
    hits = [normalize(predict(model, tokenizer, r, method, qjl_config)) == r["answers"][0] for r in records]
    return sum(hits) / len(hits)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=str(MODEL_DIR))
    p.add_argument("--n", type=positive_int, default=16, help="examples per task and length")
    # action="extend": a repeated flag adds to the list (nargs="+" alone keeps only the last one)
    p.add_argument("--lengths", type=positive_int, nargs="+", action="extend",
                   help=f"prompt lengths in tokens (default: {' '.join(map(str, synthetic_tasks.DEFAULT_LENGTHS))})")
    p.add_argument("--seed", type=non_negative_int, default=0, help="generator seed of the held-out examples")
    p.add_argument("--tasks", nargs="+", action="extend", choices=synthetic_tasks.TASKS, help="default: all of them")
    p.add_argument("--methods", nargs="+", action="extend",
                   help="exact, qjl, kivi, or qjl-m<bits> (needs --sketch_bits); default: exact qjl kivi")
    p.add_argument("--sketch_bits", type=sketch_bits_arg, nargs="*", action="extend",
                   help="also run qjl-m<bits> for these m")
    p.add_argument("--threads", type=positive_int, default=1)
    args = p.parse_args(argv)
    args.lengths = args.lengths or list(synthetic_tasks.DEFAULT_LENGTHS)
    args.tasks = list(dict.fromkeys(args.tasks or synthetic_tasks.TASKS))
    args.methods = args.methods or ["exact", "qjl", "kivi"]
    args.sketch_bits = args.sketch_bits or []
    # Everything the arguments decide is checked before the model loads: the labels (the layer
    # count only sets initial_layers_count) and the examples (a length too short for a task).
    known = method_configs(1, args.sketch_bits)
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        p.error(f"argument --methods: unknown methods {unknown}; known: {sorted(known)} "
                "(qjl-m<bits> needs --sketch_bits <bits>)")
    try:
        examples = {task: synthetic_tasks.generate(task, args.n * len(args.lengths), args.lengths, args.seed)
                    for task in args.tasks}
    except ValueError as e:
        p.error(f"argument --lengths: {e}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model_dir)
    configs = method_configs(model.config.num_hidden_layers, args.sketch_bits)
    labels = [m for m in args.methods if m in configs] + [f"qjl-m{m}" for m in args.sketch_bits]
    labels = list(dict.fromkeys(labels))
    rows = {}
    for task in args.tasks:
        records = examples[task]
        for length in args.lengths:
            subset = [r for r in records if r["_id"].endswith(f"L{length}")]
            for label in labels:
                method, config = configs[label]
                t0 = time.time()
                rows[(task, length, label)] = accuracy(model, tokenizer, subset, method, config)
                print(f"{task}@{length} {label}: {rows[(task, length, label)]:.3f} ({time.time() - t0:.0f}s)",
                      flush=True)
    print("\n| task | length | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for task in args.tasks:
        for length in args.lengths:
            cells = " | ".join(f"{rows[(task, length, label)]:.2f}" for label in labels)
            print(f"| {task} | {length} | {cells} |")


if __name__ == "__main__":
    main()
