"""Shared pieces of the figure scripts: synchronized timers, JSON output, matplotlib panels."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from cli_io import non_negative_int, positive_int  # noqa: F401  (the figure scripts' argparse types)

METHOD_STYLE = {  # label, color, marker (the paper's colors)
    "exact": ("exact", "#ff3e30", "o"),
    "kivi": ("KIVI", "#176bef", "^"),
    "qjl": ("QJL", "#107c10", "s"),
    "quanto": ("quanto", "#ffa900", "D"),
}


def default_synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class DeviceTimer:
    """Times a region of device work: the device is synchronized before each clock reading, so
    queued kernels are inside the measurement. On CUDA the clock is a pair of CUDA events.

    ``synchronize`` and ``clock`` are injectable (the tests use fakes to check the order).
    """

    def __init__(self, device: torch.device | str, synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.device = torch.device(device)
        self.synchronize = default_synchronize(self.device) if synchronize is None else synchronize
        self.use_events = clock is None and self.device.type == "cuda"
        self.clock = time.perf_counter if clock is None else clock
        self.seconds = float("nan")

    def __enter__(self) -> "DeviceTimer":
        self.synchronize()
        if self.use_events:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        if self.use_events:
            self._end.record()
            self.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.synchronize()
            self.seconds = self.clock() - self._start


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def plot_panels(path: str | Path, x: list[float], panels: list[tuple[str, dict[str, list[float]]]], *,
                xlabel: str, title: str, log2_x: bool = True, logy: bool = False) -> Path:
    """One PNG with a panel per ``(ylabel, {method: values})``. No LaTeX needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for name, values in series.items():
            label, color, marker = METHOD_STYLE.get(name, (name, None, "o"))
            ax.plot(x[: len(values)], values, marker=marker, color=color, label=label, linewidth=2)
        if log2_x:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the directory) and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def format_table(x_name: str, x: list, columns: dict[str, list[float]], fmt: str = "{:.4f}") -> str:
    names = list(columns)
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{x_name:>10}" + "".join(f"{n:>{width}}" for n in names)]
    for i, xv in enumerate(x):
        cells = []
        for n in names:
            values = columns[n]
            cells.append(f"{fmt.format(values[i]):>{width}}" if i < len(values) else f"{'-':>{width}}")
        lines.append(f"{xv:>10}" + "".join(cells))
    return "\n".join(lines)
