"""Encode / decode / total generation time against sequence length, for exact, QJL and KIVI.

Random-weight models built from configs (no downloads), run through one harness:
encode = prefill of the prompt + quantization of the cache; decode = ``new_tokens`` greedy
steps; median of ``repeats`` runs with device-synchronized timers (CUDA events on GPU).

``--variant`` picks the QJL settings: ``original`` (default) is the original code's runtime plot,
one layer that falls in its 15 "initial layers" and so is sketched with m = 160
(``config/qjl_runtime_llama3_original.json``); ``ours`` sketches it with the general m = 256
(``config/qjl_runtime_llama3.json``). Both: no outliers, 2-bit values, group 32, buffer 128.
The llama3-8b preset has the rest of the original's settings (bf16, 2^9..2^16 tokens, 64 new
tokens, median of 10); the original counts the prefill's token among its 64 and times only exact
and QJL.

    python plot_runtime.py                       # CPU: tiny model, 256..2048 tokens, < 1 minute
    python plot_runtime.py --preset llama3-8b    # GPU: the paper's sweep 2^9..2^16 (Fig. 3)
    python plot_runtime.py --preset llama3-8b --variant ours
    python plot_runtime.py --preset llama2-7b --max_len 131072

Writes ``<output_dir>/runtime_<preset>.json`` after each length (``"complete": false`` until the
last one, so an interrupted sweep keeps what finished), then ``.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import models
import qjl_kernel
from cli_io import interruptible, require_output_paths, write_json_atomic
from figures import DeviceTimer, format_table, median, plot_panels, positive_int

ROOT = Path(__file__).resolve().parent
DEFAULT_METHODS = ("exact", "qjl", "kivi")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_LEN = 131072  # the longest sweep offered (the paper's, 2^17); the model has positions for 2^18
PRESETS = {
    # Llama-2-7B shapes (MHA), fp16; the paper generates 128 tokens.
    "llama2-7b": dict(
        model=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   head_dim=128, vocab_size=32000, rope_theta=10000.0),
        dtype="float16", new_tokens=128,
    ),
    # Llama-3-8B shapes (GQA, 4 query heads per KV head), bf16; the paper generates 64 tokens.
    "llama3-8b": dict(
        model=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, rope_theta=500000.0),
        dtype="bfloat16", new_tokens=64,
    ),
    # Small enough for a CPU run in seconds; head_dim 128 as QJL assumes.
    "tiny": dict(
        model=dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=128, vocab_size=1024, rope_theta=10000.0),
        dtype="float32", new_tokens=8,
    ),
}
ORIGINAL_QJL_CONFIG = ROOT / "config" / "qjl_runtime_llama3_original.json"  # its one layer: m = 160
OURS_QJL_CONFIG = ROOT / "config" / "qjl_runtime_llama3.json"  # its one layer: m = 256
DEFAULT_QJL_CONFIG = ORIGINAL_QJL_CONFIG
# --variant: the QJL preset and decoder-layer count each setting implies (flags given explicitly win)
VARIANTS = {
    "original": dict(qjl_config=ORIGINAL_QJL_CONFIG, num_layers=1),
    "ours": dict(qjl_config=OURS_QJL_CONFIG, num_layers=1),
}


def model_config(preset: str, num_layers: int) -> LlamaConfig:
    """The preset's shapes with ``num_layers`` decoder layers."""
    return LlamaConfig(**PRESETS[preset]["model"], num_hidden_layers=num_layers, max_position_embeddings=1 << 18,
                       tie_word_embeddings=False)


def build_model(preset: str, num_layers: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-weight Llama with the preset's shapes and ``num_layers`` layers, "qjl" attention."""
    config = model_config(preset, num_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.set_attn_implementation(models.ATTN_IMPLEMENTATION)
    return model


@dataclass
class Measurement:
    encode_s: float
    decode_s: float
    cache_bytes: int  # bytes of the data the cache holds at the end
    peak_bytes: int | None  # peak device memory above the model weights (CUDA only)
    allocated_bytes: int = 0  # what the cache has allocated for it (buffers grown by doubling, sketches)


@torch.no_grad()
def measure(model, method: str, qjl_config: models.QJLConfig, seq_len: int, new_tokens: int,
            timer_factory=DeviceTimer) -> Measurement:
    """One generation: prefill ``seq_len`` random tokens, then ``new_tokens`` greedy steps."""
    device = model.device
    ids = torch.randint(model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    ids = ids.to(device)
    cache = models.make_cache(method, model.config, qjl_config)
    kwargs = models.cache_kwargs(model, cache)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    with timer_factory(device) as encode:
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits
        token = logits[:, -1:].argmax(-1)
    with timer_factory(device) as decode:
        for _ in range(new_tokens):
            logits = model(input_ids=token, use_cache=True, **kwargs).logits
            token = logits[:, -1:].argmax(-1)
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    report = models.memory_report(cache)
    del cache, kwargs, logits
    if device.type == "cuda":
        gc.collect()
    return Measurement(encode.seconds, decode.seconds, report.nbytes, peak, report.allocated)


def lengths_between(min_len: int, max_len: int) -> list[int]:
    lengths, n = [], min_len
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths


def sweep(model, methods, qjl_config, lengths, new_tokens, repeats, *, progress=True, after_length=None) -> dict:
    """Median encode / decode / total seconds and memory per method and length.
    ``after_length(k, results)`` is called once the first ``k`` lengths are measured."""
    results = {m: {"encode_s": [], "decode_s": [], "total_s": [], "cache_bytes": [], "peak_bytes": []} for m in methods}
    for method in methods:  # warm-up: first calls pay for allocations and lazy initialization
        measure(model, method, qjl_config, lengths[0], 2)
    for done, seq_len in enumerate(lengths, 1):
        for method in methods:
            runs = [measure(model, method, qjl_config, seq_len, new_tokens) for _ in range(repeats)]
            r = results[method]
            r["encode_s"].append(median([m.encode_s for m in runs]))
            r["decode_s"].append(median([m.decode_s for m in runs]))
            r["total_s"].append(median([m.encode_s + m.decode_s for m in runs]))
            r["cache_bytes"].append(runs[-1].cache_bytes)
            r["peak_bytes"].append(runs[-1].peak_bytes)
            if progress:
                print(f"  {seq_len:>7} {method:>6}: encode {r['encode_s'][-1]:.4f}s decode {r['decode_s'][-1]:.4f}s",
                      flush=True)
        if after_length is not None:
            after_length(done, results)
    return results


def device_arg(text: str) -> str:
    """argparse type of ``--device``: ``cpu`` or ``cuda[:N]``, the GPU present."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                                             f"is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def load_qjl_config(path: str | Path, head_dim: int) -> models.QJLConfig:
    """The QJLConfig preset at ``path``, checked to run on keys of ``head_dim``; ValueError naming the
    file when it cannot be read, is not a JSON object of QJLConfig fields, or holds invalid settings."""
    try:
        config = models.QJLConfig.from_json(path)
        config.check_head_dim(head_dim)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, TypeError) as e:  # a UnicodeDecodeError is a ValueError
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return config


def unusable_methods(methods, preset: str, num_layers: int, qjl_config: models.QJLConfig) -> list[str]:
    """``"<method>: <why>"`` for each of ``methods`` whose cache cannot be built for the preset's model
    with ``qjl_config`` (a missing backend, KIVI without 2- or 4-bit values, ...). Building the
    caches, empty, takes milliseconds: the sweep's model and warm-ups come after this check."""
    config, unusable = model_config(preset, num_layers), []
    for method in methods:
        try:
            models.make_cache(method, config, qjl_config)
        except (ValueError, ImportError) as e:
            unusable.append(f"{method}: {e}")
    return unusable


def parse_args(argv=None, *, description: str = __doc__, cpu_max_len: int = 2048, variants: dict = VARIANTS,
               default_variant: tuple[str, str] = ("original", "original"), output_prefix: str | None = None,
               timed: bool = True):
    """Arguments shared with plot_memory_peak.py (``timed=False``: no ``--repeats``, which only
    timings use); defaults depend on the device.

    ``variants`` maps each ``--variant`` to the ``qjl_config`` and ``num_layers`` it implies;
    ``default_variant`` is the ``(CPU, GPU)`` default. Every argument is checked here, before any
    work: the device, the QJL preset, and ``--output_dir`` (with ``<output_prefix>_<preset>.json``
    and ``.png`` in it when ``output_prefix`` is given)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny on CPU, llama3-8b on GPU")
    implied = "; ".join(f"{name}: {v['num_layers']} layer(s), {Path(v['qjl_config']).name}"
                        for name, v in variants.items())
    parser.add_argument("--variant", choices=sorted(variants),
                        help=f"{implied} (default: {default_variant[0]} on CPU, {default_variant[1]} on GPU)")
    # action="extend": a repeated flag adds to the list (nargs="+" alone keeps only the last one)
    parser.add_argument("--methods", nargs="+", action="extend", choices=models.METHODS,
                        help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--num_layers", type=positive_int, help="decoder layers (default: the variant's)")
    parser.add_argument("--min_len", type=positive_int, help="default: 256 on CPU, 512 on GPU")
    parser.add_argument("--max_len", type=positive_int,
                        help=f"default: {cpu_max_len} on CPU, 65536 on GPU (at most {MAX_LEN})")
    parser.add_argument("--new_tokens", type=positive_int, help="decode steps (default: the preset's)")
    if timed:
        parser.add_argument("--repeats", type=positive_int,
                            help="runs per point, median reported (default: 3 CPU, 10 GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda if a GPU is available)")
    parser.add_argument("--qjl_config", help="QJLConfig preset JSON (default: the variant's)")
    parser.add_argument("--output_dir", default="results/runtime")
    args = parser.parse_args(argv)
    if not timed:
        args.repeats = 1  # one measurement per point
    gpu = torch.device(args.device).type == "cuda"
    # Fill only what was not given (None): a given value, 0 included, is the user's.
    defaults = dict(methods=list(DEFAULT_METHODS), preset="llama3-8b" if gpu else "tiny",
                    variant=default_variant[int(gpu)], min_len=512 if gpu else 256,
                    max_len=65536 if gpu else cpu_max_len, repeats=10 if gpu else 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in variants[args.variant].items():
        if getattr(args, name) is None:
            setattr(args, name, str(value) if name == "qjl_config" else value)
    for name in ("new_tokens", "dtype"):
        if getattr(args, name) is None:
            setattr(args, name, PRESETS[args.preset][name])
    if args.min_len <= 0 or args.max_len < args.min_len:
        parser.error(f"need 0 < --min_len <= --max_len, got {args.min_len}, {args.max_len}")
    if args.max_len > MAX_LEN:
        parser.error(f"argument --max_len: must be at most {MAX_LEN}, got {args.max_len}")
    if args.num_layers <= 0 or args.repeats <= 0 or args.new_tokens <= 0:
        parser.error("--num_layers, --repeats and --new_tokens must be positive")
    args.methods = list(dict.fromkeys(args.methods))  # a method given twice is measured once
    try:
        qjl_config = load_qjl_config(args.qjl_config, PRESETS[args.preset]["model"]["head_dim"])
    except ValueError as e:
        parser.error(f"argument --qjl_config: {e}")
    if unusable := unusable_methods(args.methods, args.preset, args.num_layers, qjl_config):
        parser.error(f"argument --methods: cannot run on preset {args.preset} with --qjl_config {args.qjl_config}: "
                     f"{'; '.join(unusable)}")
    names = [f"{output_prefix}_{args.preset}{suffix}" for suffix in (".json", ".png")] if output_prefix else []
    require_output_paths(parser, "--output_dir", args.output_dir, names)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv, output_prefix="runtime")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    qjl_config = load_qjl_config(args.qjl_config, PRESETS[args.preset]["model"]["head_dim"])
    model = build_model(args.preset, args.num_layers, device, dtype)
    lengths = lengths_between(args.min_len, args.max_len)
    backend = qjl_kernel.ops_label(device)  # the C++ CPU kernels named when they run
    sketch_dims = [qjl_config.layer_budget(i).sketch_dim for i in range(args.num_layers)]  # m per layer
    print(f"runtime sweep: preset {args.preset}, variant {args.variant} (QJL m = {sorted(set(sketch_dims))}), "
          f"{args.num_layers} layer(s), {args.dtype}, {device}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, QJL ops backend: {backend}")
    stem = Path(args.output_dir) / f"runtime_{args.preset}"

    def document(done: int, results: dict) -> dict:  # the JSON once the first ``done`` lengths are measured
        return dict(preset=args.preset, variant=args.variant, num_layers=args.num_layers, dtype=args.dtype,
                    device=str(device), backend=backend, qjl_sketch_dims=sketch_dims, new_tokens=args.new_tokens,
                    repeats=args.repeats, lengths=lengths[:done], complete=done == len(lengths),
                    qjl_config=qjl_config.to_dict(), results=results)

    def save(done: int, results: dict) -> None:  # after each length: an interrupt keeps the lengths measured
        write_json_atomic(stem.with_suffix(".json"), document(done, results))

    results = sweep(model, args.methods, qjl_config, lengths, args.new_tokens, args.repeats, after_length=save)
    data = document(len(lengths), results)  # what the last save wrote
    panels = [(f"{label} (s)", {m: results[m][key] for m in args.methods})
              for label, key in (("encode + quantize", "encode_s"), (f"decode {args.new_tokens} tokens", "decode_s"),
                                 ("total", "total_s"))]
    plot_panels(stem.with_suffix(".png"), lengths, panels, xlabel="prompt tokens",
                title=f"{args.preset}, {args.variant} (QJL m = {sorted(set(sketch_dims))}), "
                      f"{args.num_layers} layer(s), {args.dtype}, {device.type} ({backend} ops)")
    for label, key in (("encode s", "encode_s"), ("decode s", "decode_s"), ("total s", "total_s")):
        print(f"\n{label}:")
        print(format_table("tokens", lengths, {m: results[m][key] for m in args.methods}))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return data


if __name__ == "__main__":
    sys.exit(interruptible(main, "the JSON holds the lengths measured so far (marked complete: false)"))
