"""KV cache memory against sequence length for exact, QJL and KIVI.

On a GPU: peak device memory of a generation above the model weights (the paper's memory
figure). On the CPU: the bytes each cache holds after the prompt and the decode steps, measured
by walking the cache's tensors.

``--variant original`` (the default on a GPU) is the original code's memory plot: the full
32-layer model, its first 15 layers sketched with m = 512 and the others with m = 256, no outliers
(``config/qjl_memory_llama3_original.json``). ``--variant ours`` (the default on the CPU, where a
32-layer sweep takes minutes) measures one layer at m = 256 (``config/qjl_runtime_llama3.json``).

    python plot_memory_peak.py                      # CPU: tiny model, 1 layer, 256..4096 tokens
    python plot_memory_peak.py --preset llama3-8b   # GPU: 32 layers, 2^9..2^16
    python plot_memory_peak.py --variant original --max_len 1024   # CPU: tiny model, 32 layers

Writes ``<output_dir>/memory_<preset>.json`` and ``.png`` and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import models
import plot_runtime
from cli_io import interruptible
from figures import format_table, plot_panels, write_json

FULL_DEPTH = 32  # decoder layers of Llama-2-7B and Llama-3-8B, the models of the paper
VARIANTS = {
    "original": dict(qjl_config=plot_runtime.ROOT / "config" / "qjl_memory_llama3_original.json",
                     num_layers=FULL_DEPTH),
    "ours": dict(qjl_config=plot_runtime.OURS_QJL_CONFIG, num_layers=1),
}


def parse_args(argv=None):
    return plot_runtime.parse_args(argv, description=__doc__, cpu_max_len=4096, variants=VARIANTS,
                                   default_variant=("ours", "original"), timed=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    qjl_config = models.QJLConfig.from_json(args.qjl_config)
    model = plot_runtime.build_model(args.preset, args.num_layers, device, plot_runtime.DTYPES[args.dtype])
    lengths = plot_runtime.lengths_between(args.min_len, args.max_len)
    # on the CPU what the cache has allocated (its data and the spare capacity of its growing
    # buffers), as the GPU's peak memory counts it; cache_bytes (the data alone) is kept in the JSON
    key = "peak_bytes" if device.type == "cuda" else "allocated_bytes"
    what = "peak GPU memory above weights" if device.type == "cuda" else "bytes allocated by the cache"
    sketch_dims = [qjl_config.layer_budget(i).sketch_dim for i in range(args.num_layers)]
    budget = ", ".join(f"{sketch_dims.count(m)} x m = {m}" for m in sorted(set(sketch_dims), reverse=True))
    print(f"memory sweep: preset {args.preset}, variant {args.variant} ({budget}), {args.num_layers} layer(s), "
          f"{args.dtype}, {device}: {what}")
    results = {m: {"cache_bytes": [], "allocated_bytes": [], "peak_bytes": []} for m in args.methods}
    for seq_len in lengths:
        for method in args.methods:
            m = plot_runtime.measure(model, method, qjl_config, seq_len, args.new_tokens)
            results[method]["cache_bytes"].append(m.cache_bytes)
            results[method]["allocated_bytes"].append(m.allocated_bytes)
            results[method]["peak_bytes"].append(m.peak_bytes)
    mib = {m: [b / 2**20 for b in results[m][key]] for m in args.methods}
    stem = Path(args.output_dir) / f"memory_{args.preset}"
    data = dict(preset=args.preset, variant=args.variant, num_layers=args.num_layers, qjl_sketch_dims=sketch_dims,
                dtype=args.dtype, device=str(device),
                measure=what, new_tokens=args.new_tokens, lengths=lengths, qjl_config=qjl_config.to_dict(),
                results=results)
    write_json(stem.with_suffix(".json"), data)
    plot_panels(stem.with_suffix(".png"), lengths, [(f"{what} (MiB)", mib)], xlabel="prompt tokens",
                title=f"{args.preset}, {args.variant}: {args.num_layers} layer(s) ({budget}), {args.dtype}, "
                      f"{device.type}", logy=True)
    print(format_table("tokens", lengths, mib, fmt="{:.3f}"))
    if "exact" in mib:
        for method in args.methods:
            if method != "exact":
                print(f"{method}: {mib['exact'][-1] / mib[method][-1]:.2f}x less than exact at {lengths[-1]} tokens")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return data


if __name__ == "__main__":
    sys.exit(interruptible(main, "nothing is written before the sweep ends; rerun it"))
