"""Print QJL's bit accounting and score distortion for a configuration.

    python -m models.report                      # paper configuration, Llama-2-7B shapes
    python -m models.report --config config/qjl_paper_llama2.json --num_layers 32 --head_dim 128
"""

from __future__ import annotations

import argparse

import torch

from .accounting import qjl_bit_report
from .config import QJLConfig
from .distortion import score_distortion, synthetic_keys
from .sketch import QJLSketch

SKETCH_DIMS = (64, 128, 256, 512, 1024)


def distortion_table(head_dim: int, *, tokens: int = 1024, queries: int = 64, seed: int = 0) -> str:
    keys = synthetic_keys(tokens, head_dim, seed=seed)
    qs = torch.randn(queries, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    lines = [
        f"score error / (||q|| ||k||) on synthetic keys ({tokens} tokens, 4 channels x10), mean |err|:",
        f"{'m':>6} {'m/d':>5} {'gauss':>8} {'orth':>8} {'orth+8 outl':>12}",
    ]
    for m in SKETCH_DIMS:
        row = []
        for orth, outliers in ((False, 0), (True, 0), (True, 8)):
            sketch = QJLSketch(head_dim, m, seed=seed, orthogonalize=orth)
            d = score_distortion(keys, qs, sketch, outlier_count=outliers, outlier_sketch_dim=min(m, 256))
            row.append(d.mean_abs_error)
        lines.append(f"{m:>6} {m / head_dim:>5.1f} {row[0]:>8.4f} {row[1]:>8.4f} {row[2]:>12.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="QJLConfig preset JSON (default: the paper configuration)")
    parser.add_argument("--num_layers", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--storage_bits", type=int, default=16, choices=(16, 32))
    args = parser.parse_args(argv)
    config = QJLConfig.from_json(args.config) if args.config else QJLConfig()
    print(f"QJL bit accounting: {config}")
    print(qjl_bit_report(config, args.num_layers, args.head_dim, args.storage_bits).format())
    print()
    print(distortion_table(args.head_dim))


if __name__ == "__main__":
    main()
