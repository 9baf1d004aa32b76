"""Method names on the command line: a cache method of ``models``, optionally with a sketch size.

``qjl@1024`` is QJL with ``key_quantization_bits = key_quantization_bits_initial_layers = 1024``
(outlier sketches capped at 1024), everything else from the run's QJLConfig: one run can sweep
sketch sizes to show where accuracy recovers.
"""

from __future__ import annotations

import dataclasses
import re

from models import METHODS, QJLConfig


def parse_method(name: str) -> tuple[str, int | None]:
    """``"qjl@1024"`` -> ``("qjl", 1024)``; ``"kivi"`` -> ``("kivi", None)``. ValueError otherwise."""
    base, sep, size = name.partition("@")
    if base not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or qjl@<sketch bits>)")
    if not sep:
        return base, None
    # ASCII digits without a leading zero: str.isdigit() takes "²" (then int() fails), and "08" would
    # file the results of qjl@8 in a second directory
    if base != "qjl" or not re.fullmatch(r"[1-9][0-9]*", size) or int(size) % 8:
        raise ValueError(f"method {name!r}: only qjl takes a sketch size, a positive multiple of 8 written without "
                         f"leading zeros (e.g. qjl@1024)")
    return base, int(size)


def method_config(name: str, qjl_config: QJLConfig) -> tuple[str, QJLConfig]:
    """The base method and the QJLConfig its cache is built with."""
    base, sketch_bits = parse_method(name)
    if sketch_bits is None:
        return base, qjl_config
    return base, dataclasses.replace(
        qjl_config,
        key_quantization_bits=sketch_bits,
        key_quantization_bits_initial_layers=sketch_bits,
        outlier_sketch_dim_general=min(qjl_config.outlier_sketch_dim_general, sketch_bits),
        outlier_sketch_dim_initial_layers=min(qjl_config.outlier_sketch_dim_initial_layers, sketch_bits),
    )
