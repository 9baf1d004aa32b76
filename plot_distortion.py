"""Relative error of QJL attention scores against sketch bits per channel (m/d = 1..8), with and
without outlier handling.

Keys and queries come from a model run (``--model``: any local causal LM directory, e.g. the
embedded ``tinylm/model``, or a real Llama; post-RoPE, captured per layer) or from synthetic keys
with planted outlier channels (``--source synthetic``, the default when no model is given).
The error of a score is ``|estimate - <q, k>| / (||q|| ||k||)``, averaged over query/key pairs.

    python plot_distortion.py                                  # synthetic keys, < 30 s on a CPU
    python plot_distortion.py --model tinylm/model --layers 0 1 2
    python plot_distortion.py --model /models/Llama-2-7b-hf --layers 0 15 31 --tokens 2048

Writes ``<output_dir>/distortion_<source>.json`` and ``.png`` and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from figures import format_table, non_negative_int, plot_panels, positive_int, write_json
from models import QJLSketch
from models.distortion import score_distortion, synthetic_keys

BITS_PER_CHANNEL = (1, 2, 3, 4, 5, 6, 7, 8)


def synthetic_heads(tokens: int, head_dim: int, queries: int, seed: int):
    """One synthetic "layer": keys ``[1, 1, T, d]`` with 4 channels x10, Gaussian queries."""
    keys = synthetic_keys(tokens, head_dim, seed=seed)
    q = torch.randn(queries, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    return {0: (q.view(1, 1, queries, head_dim), keys.view(1, 1, tokens, head_dim))}


def model_heads(path: str, tokens: int, layers: list[int] | None, seed: int):
    """Post-RoPE queries and keys of a local model on ``tokens`` random token ids."""
    from transformers import AutoModelForCausalLM

    from models.capture import capture_queries_keys

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    records = capture_queries_keys(model, ids)
    return {i: records[i] for i in (layers if layers is not None else sorted(records))}


def layer_errors(queries, keys, m: int, outliers: int, group_size: int, seed: int, max_queries: int) -> float:
    """Mean error over KV heads of one layer; queries ``[1, H_q, T, d]``, keys ``[1, H_kv, T, d]``."""
    kv_heads, tokens, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    tokens -= tokens % group_size
    ratio = queries.shape[1] // kv_heads
    sketch = QJLSketch(dim, m, seed=seed)
    errors = []
    for h in range(kv_heads):
        q = queries[0, h * ratio:(h + 1) * ratio, -max_queries:].reshape(-1, dim)
        d = score_distortion(keys[0, h, :tokens], q, sketch, outlier_count=outliers,
                             outlier_sketch_dim=min(m, 256), group_size=group_size)
        errors.append(d.mean_abs_error)
    return sum(errors) / len(errors)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local causal LM directory; keys/queries are captured from it")
    parser.add_argument("--source", choices=("synthetic", "model"), help="default: model if --model is given")
    parser.add_argument("--layers", type=non_negative_int, nargs="+", help="layers to average (default: all)")
    parser.add_argument("--tokens", type=positive_int, default=1024, help="tokens of keys per layer")
    parser.add_argument("--queries", type=positive_int, default=64, help="queries per head (the last ones)")
    parser.add_argument("--head_dim", type=positive_int, default=128, help="synthetic keys only")
    parser.add_argument("--outlier_count", type=non_negative_int, default=8)
    parser.add_argument("--group_size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="results/distortion")
    args = parser.parse_args(argv)
    source = args.source if args.source is not None else ("model" if args.model else "synthetic")
    if source == "model" and not args.model:
        parser.error("--source model needs --model PATH")
    if args.tokens < args.group_size:
        parser.error(f"--tokens must be at least --group_size ({args.group_size})")

    if source == "model":
        heads = model_heads(args.model, args.tokens, args.layers, args.seed)
        name = Path(args.model).name
    else:
        heads = synthetic_heads(args.tokens, args.head_dim, args.queries, args.seed)
        name = "synthetic"
    dim = next(iter(heads.values()))[1].shape[-1]
    sketch_dims = [b * dim for b in BITS_PER_CHANNEL]
    curves = {f"{args.outlier_count} outliers": [], "no outliers": []}
    for m in sketch_dims:
        for label, outliers in ((f"{args.outlier_count} outliers", args.outlier_count), ("no outliers", 0)):
            per_layer = [layer_errors(q, k, m, outliers, args.group_size, args.seed, args.queries)
                         for q, k in heads.values()]
            curves[label].append(sum(per_layer) / len(per_layer))

    stem = Path(args.output_dir) / f"distortion_{source}"
    data = dict(source=source, model=args.model, layers=sorted(heads), tokens=args.tokens, head_dim=dim,
                bits_per_channel=list(BITS_PER_CHANNEL), sketch_dims=sketch_dims, group_size=args.group_size,
                metric="mean |estimate - <q,k>| / (||q|| ||k||)", results=curves)
    write_json(stem.with_suffix(".json"), data)
    plot_panels(stem.with_suffix(".png"), list(BITS_PER_CHANNEL), [("mean |error| / (||q|| ||k||)", curves)],
                xlabel="sketch bits per channel (m / d)", title=f"QJL score distortion: {name}, d = {dim}",
                log2_x=False, logy=True)
    print(f"QJL score distortion ({name}, layers {sorted(heads)}, d = {dim}):")
    print(format_table("m/d", list(BITS_PER_CHANNEL), curves))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return data


if __name__ == "__main__":
    main()
