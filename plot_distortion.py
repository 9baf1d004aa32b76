"""Relative error of QJL attention scores against sketch bits per channel (m/d = 1..8).

``--variant ours`` (default): with and without outlier handling, on keys and queries from a model
run on random token ids (``--model``: any local causal LM directory, e.g. the embedded
``tinylm/model``, or a real Llama; post-RoPE, captured per layer) or on synthetic keys with planted
outlier channels (``--source synthetic``, the default when no model is given). The error of a
score is ``|estimate - <q, k>| / (||q|| ||k||)``, averaged over query/key pairs and layers.

``--variant original``: the original code's plot. Real text (``--tokens`` tokens of the Python
standard library's sources) runs through a pretrained model (``--model``, default ``smollm2``:
SmolLM2-135M-Instruct, offline); for each of its layers 0, 1, 2, 4, 8, 16, 31 of Llama-2-7B (mapped
to the same relative depth of a model of L layers, ``round(l * (L - 1) / 31)``: 0, 1, 2, 4, 7, 15, 29
on SmolLM2's 30) one curve of ``||s_hat - q K^T|| / ||q K^T||``, where ``q`` is the last query,
``s_hat`` its QJL scores over all keys of the layer (every head pooled; complete blocks of
``--buffer_size`` keys sketched, the rest exact), with m = 64..512, no outliers, keys and queries
rounded to bfloat16.

    python plot_distortion.py                                  # synthetic keys, < 30 s on a CPU
    python plot_distortion.py --model tinylm/model --layers 0 1 2
    python plot_distortion.py --model /models/Llama-2-7b-hf --layers 0 15 31 --tokens 2048
    python plot_distortion.py --variant original               # SmolLM2 on real text, ~1 min on a CPU

Writes ``<output_dir>/distortion_<source>.json`` and ``.png`` (the original variant:
``distortion_<model>``) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cli_io import interruptible, require_output_paths, seed_int
from figures import format_table, non_negative_int, plot_panels, positive_int, write_json
from models import QJLSketch
from models.config import MAX_HEAD_DIM
from models.distortion import (ORIGINAL_LAYERS, last_query_distortion, map_layer, map_layers, score_distortion,
                                synthetic_keys)

BITS_PER_CHANNEL = (1, 2, 3, 4, 5, 6, 7, 8)
ORIGINAL_SKETCH_DIMS = tuple(64 * i for i in range(1, 9))  # the original's m, whatever d is
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ArgumentProblem(ValueError):
    """An argument that does not fit the model, found once the model is loaded (before any work on it);
    ``main`` reports it as a usage error. The message starts with ``argument --<name>:``."""


def check_head_dim(dim: int) -> None:
    """ValueError unless keys of ``dim`` channels can be sketched with m = 1..8 x ``dim`` bits."""
    if dim % 8 or not 0 < dim <= MAX_HEAD_DIM:
        raise ValueError(f"must be a multiple of 8 in [8, {MAX_HEAD_DIM}] (the sketch sizes m = 1..8 x head_dim are "
                         f"multiples of 8; outlier channel indices are uint8), got {dim}")


def head_dim_arg(text: str) -> int:
    """argparse type of ``--head_dim``."""
    value = positive_int(text)
    try:
        check_head_dim(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def check_model_fits(config, layers: list[int] | None, outlier_count: int | None) -> None:
    """ArgumentProblem when ``--layers`` names a layer the model lacks or, for ``outlier_count`` not
    None (the ours variant), when its head_dim cannot be sketched or is below ``--outlier_count``."""
    num_layers = config.num_hidden_layers
    missing = sorted({layer for layer in layers or () if layer >= num_layers})
    if missing:
        raise ArgumentProblem(f"argument --layers: {missing} not in the model's {num_layers} layers "
                              f"(0..{num_layers - 1})")
    if outlier_count is None:
        return
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        check_head_dim(dim)
    except ValueError as e:
        raise ArgumentProblem(f"argument --model: its head_dim {e}") from None
    if outlier_count > dim:
        raise ArgumentProblem(f"argument --outlier_count: must be at most the model's head_dim ({dim}), "
                              f"got {outlier_count}")


def synthetic_heads(tokens: int, head_dim: int, queries: int, seed: int):
    """One synthetic "layer": keys ``[1, 1, T, d]`` with 4 channels x10, Gaussian queries."""
    keys = synthetic_keys(tokens, head_dim, seed=seed)
    q = torch.randn(queries, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    return {0: (q.view(1, 1, queries, head_dim), keys.view(1, 1, tokens, head_dim))}


def model_heads(path: str, tokens: int, layers: list[int] | None, seed: int, outlier_count: int = 0):
    """Post-RoPE queries and keys of a local model on ``tokens`` random token ids (the arguments
    checked against the model before it runs: :func:`check_model_fits`)."""
    from transformers import AutoModelForCausalLM

    from models.capture import capture_queries_keys

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    check_model_fits(model.config, layers, outlier_count)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    records = capture_queries_keys(model, ids)
    return {i: records[i] for i in (layers if layers is not None else sorted(records))}


def text_model_heads(name: str, tokens: int, layers: list[int] | None):
    """Post-RoPE queries and keys of a pretrained model (``"smollm2"`` or a local path) on the first
    ``tokens`` tokens of the standard library's sources; ``(records by layer, number of layers)``.
    Without ``layers``: the original's layers, mapped to the model's depth."""
    from models.capture import capture_queries_keys
    from models.pretrained import load_causal_lm, load_tokenizer
    from real_text import stdlib_text

    tokenizer = load_tokenizer(name)  # the text before the model: too many --tokens is a usage error
    ids = tokenizer(stdlib_text(8 * tokens), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ArgumentProblem(
            f"argument --tokens: the standard library's sources gave only {ids.shape[1]} tokens, fewer than {tokens}"
        )
    model, _ = load_causal_lm(name, attn_implementation="sdpa", tokenizer=tokenizer)
    num_layers = model.config.num_hidden_layers
    check_model_fits(model.config, layers, None)
    records = capture_queries_keys(model, ids)
    chosen = layers if layers is not None else map_layers(ORIGINAL_LAYERS, num_layers)
    return {i: records[i] for i in chosen}, num_layers


def original_curves(heads: dict, sketch_dims, dtype: torch.dtype, buffer_size: int, group_size: int,
                    seed: int) -> dict[int, list[float]]:
    """Per layer, the original's distortion at each sketch size (one sketch per m, shared by layers)."""
    curves = {layer: [] for layer in heads}
    for m in sketch_dims:
        sketch = QJLSketch(next(iter(heads.values()))[1].shape[-1], m, seed=seed)
        for layer, (q, k) in heads.items():
            curves[layer].append(last_query_distortion(q.to(dtype), k.to(dtype), sketch, buffer_size=buffer_size,
                                                       group_size=group_size))
    return curves


def layer_label(layer: int, num_layers: int) -> str:
    """``layer 7 (orig. 8)`` when ``layer`` is the image of one of the original's layers."""
    sources = [ref for ref in ORIGINAL_LAYERS if map_layer(ref, num_layers) == layer]
    if num_layers == 32 or not sources:
        return f"layer {layer}"
    return f"layer {layer} (orig. {'/'.join(map(str, sources))})"


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
    parser.add_argument("--variant", choices=("ours", "original"), default="ours",
                        help="ours: mean per-score error (synthetic or random-id keys); original: the original "
                             "code's plot on real text through a pretrained model")
    parser.add_argument("--model", help="ours: local causal LM directory; original: 'smollm2' (default) or a path")
    parser.add_argument("--source", choices=("synthetic", "model"), help="ours only; default: model if --model")
    parser.add_argument("--layers", type=non_negative_int, nargs="+", action="extend",  # a repeated flag adds
                        help="ours: layers to average (default: all); original: layers to plot (default: the "
                             "original's 0 1 2 4 8 16 31 mapped to the model's depth)")
    parser.add_argument("--tokens", type=positive_int, help="tokens of keys per layer (default: 1024 ours, 2048 "
                                                            "original)")
    parser.add_argument("--queries", type=positive_int, default=64, help="ours: queries per head (the last ones)")
    parser.add_argument("--head_dim", type=head_dim_arg, default=128,
                        help=f"synthetic keys only: a multiple of 8 up to {MAX_HEAD_DIM}")
    parser.add_argument("--outlier_count", type=non_negative_int, default=8, help="ours only (original: none)")
    parser.add_argument("--group_size", type=positive_int, default=32)
    parser.add_argument("--buffer_size", type=positive_int, default=128,
                        help="original: the last tokens %% buffer_size keys stay exact")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="original: keys and queries are rounded to it (the original's bfloat16)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seeds the keys, queries and sketches (64-bit)")
    parser.add_argument("--output_dir", default="results/distortion")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 2048 if args.variant == "original" else 1024
    if args.variant == "original":
        if args.buffer_size % args.group_size or args.tokens < args.buffer_size:
            parser.error(f"need --buffer_size a multiple of --group_size ({args.group_size}) and at most --tokens")
        check_output_dir(parser, args.output_dir, f"distortion_{Path(args.model or 'smollm2').name}")
        try:
            return original_main(args)
        except ArgumentProblem as e:
            parser.error(str(e))
    source = args.source if args.source is not None else ("model" if args.model else "synthetic")
    if source == "model" and not args.model:
        parser.error("--source model needs --model PATH")
    if args.tokens < args.group_size:
        parser.error(f"--tokens must be at least --group_size ({args.group_size})")
    if source == "synthetic" and args.outlier_count > args.head_dim:
        parser.error(f"argument --outlier_count: must be at most --head_dim ({args.head_dim}), "
                     f"got {args.outlier_count}")
    check_output_dir(parser, args.output_dir, f"distortion_{source}")

    if source == "model":
        try:
            heads = model_heads(args.model, args.tokens, args.layers, args.seed, args.outlier_count)
        except ArgumentProblem as e:
            parser.error(str(e))
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


def check_output_dir(parser, output_dir: str, stem: str) -> None:
    """A usage error unless ``<output_dir>/<stem>.json`` and ``.png`` can be written."""
    require_output_paths(parser, "--output_dir", output_dir, [f"{stem}.json", f"{stem}.png"])


def original_main(args) -> dict:
    name = args.model or "smollm2"
    heads, num_layers = text_model_heads(name, args.tokens, args.layers)
    dim = next(iter(heads.values()))[1].shape[-1]
    curves = original_curves(heads, ORIGINAL_SKETCH_DIMS, DTYPES[args.dtype], args.buffer_size, args.group_size,
                             args.seed)
    x = [m / dim for m in ORIGINAL_SKETCH_DIMS]
    labels = {layer: layer_label(layer, num_layers) for layer in heads}
    model_name = Path(name).name
    stem = Path(args.output_dir) / f"distortion_{model_name}"
    mapping = ""
    if args.layers is None and num_layers != 32:
        mapping = (f"the original's layers {list(ORIGINAL_LAYERS)} of 32 mapped to {num_layers} "
                   f"by round(l * {num_layers - 1} / 31)")
    data = dict(variant="original", model=name, num_layers=num_layers, layers=list(heads), layer_mapping=mapping,
                text="Python standard-library sources (real_text.stdlib_text)", tokens=args.tokens, head_dim=dim,
                sketch_dims=list(ORIGINAL_SKETCH_DIMS), bits_per_channel=x, outlier_count=0,
                buffer_size=args.buffer_size, group_size=args.group_size, dtype=args.dtype,
                metric="||s_hat - q K^T|| / ||q K^T||, q = last query, all heads of the layer",
                results={labels[layer]: values for layer, values in curves.items()})
    write_json(stem.with_suffix(".json"), data)
    plot_panels(stem.with_suffix(".png"), x, [("||s_hat - q K^T|| / ||q K^T||", data["results"])],
                xlabel="sketch bits per channel (m / d)", log2_x=False, logy=True,
                title=f"{model_name}: last query, {args.tokens} tokens, no outliers")
    print(f"QJL distortion of the last query's scores ({model_name}, {args.tokens} tokens of real text, d = {dim}, "
          f"{args.dtype}, no outliers)" + (f"; {mapping}" if mapping else "") + ":")
    print(format_table("m/d", [f"{v:g}" for v in x], data["results"]))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return data


if __name__ == "__main__":
    sys.exit(interruptible(main, "nothing is written before the run ends; rerun it"))
