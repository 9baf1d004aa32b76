"""What the command-line scripts share (plot_*.py, perplexity.py, stdlib_tasks.py, synthetic_tasks.py,
benchmarks/): argparse types that refuse bad numbers with a usage error, an output-path check to run
before the expensive work, and atomic JSON writes. Imports nothing heavy (no torch), so the data
scripts stay quick to start."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable


def _int_in(least: int, what: str, below: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < least or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in its messages
    return parse


# argparse types: a command-line 0 is refused with a usage error, never replaced by a default
positive_int = _int_in(1, "a positive integer")
non_negative_int = _int_in(0, "a non-negative integer")
# a torch seed (torch.Generator.manual_seed): a 64-bit integer, negative ones included, as they work
# (a larger one was an "Overflow when unpacking long long" traceback from deep inside the run)
seed_int = _int_in(-(2**63), "an integer in [-2**63, 2**63)", below=2**63)
# a seed for both numpy (np.random.default_rng: non-negative only) and torch (at most 64 bits)
numpy_torch_seed_int = _int_in(0, "an integer in [0, 2**64)", below=2**64)


def _float_in(least: float, most: float | None, what: str, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        # NaN fails every comparison, so it is refused here too; so are the infinities
        low_ok = value > least if open_low else value >= least
        if not (math.isfinite(value) and low_ok and (most is None or value <= most)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_float = _float_in(0.0, None, "a positive finite number", open_low=True)
non_negative_float = _float_in(0.0, None, "a non-negative finite number")
fraction_float = _float_in(0.0, 1.0, "a number in [0, 1]")


def check_output_paths(directory: str | Path, names=()) -> None:
    """ValueError unless ``directory`` is a writable directory or can be created as one, and none of
    the files ``names`` in it is a directory or read-only. A script calls this before its expensive
    work, so that a bad output path fails at once rather than after the run, losing its results."""
    directory = Path(directory)
    if os.path.lexists(directory):
        if not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ValueError(f"{directory} is not writable")
    else:
        ancestor = directory.parent  # the nearest existing ancestor must let us create the rest
        while not os.path.lexists(ancestor):
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ValueError(f"cannot create {directory}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"cannot create {directory}: {ancestor} is not writable")
    for name in names:
        path = directory / name
        if path.is_dir():
            raise ValueError(f"{path} is a directory")
        if os.path.lexists(path) and not os.access(path, os.W_OK):
            raise ValueError(f"{path} is not writable")


def write_json_atomic(path: str | Path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON through a temporary file and a rename: an interrupt leaves the old
    file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def require_output_paths(parser: argparse.ArgumentParser, flag: str, directory: str | Path, names=()) -> None:
    """:func:`check_output_paths`, failing as a usage error of ``flag`` (exit 2, no traceback)."""
    try:
        check_output_paths(directory, names)
    except ValueError as e:
        parser.error(f"argument {flag}: {e}")


def interruptible(main: Callable[[], object], kept: str) -> int:
    """Run a script's ``main()``: 0 when it ends, and on Ctrl-C a line saying what is ``kept``
    instead of a traceback, with exit status 130 (the shell's for SIGINT)."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        return 130
    return 0
