"""Print QJL's bit accounting for a configuration (score distortion: ``plot_distortion.py``).

    python -m models.report                      # paper configuration, Llama-2-7B shapes
    python -m models.report --config config/qjl_paper_llama2.json --num_layers 32 --head_dim 128
"""

from __future__ import annotations

import argparse

from .accounting import qjl_bit_report
from .config import QJLConfig


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


if __name__ == "__main__":
    main()
