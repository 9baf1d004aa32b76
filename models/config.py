"""QJL hyper-parameters, with the original code's names and the paper's defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

VALUE_BITS = (2, 4, 16)  # 16 = values kept exact (an ablation the original lacks)
MAX_HEAD_DIM = 256  # outlier channel indices are stored as uint8


class LayerBudget(NamedTuple):
    """The key sketch budget of one layer."""

    sketch_dim: int  # m: inlier sketch bits per key
    outlier_count: int  # outlier channels per group of group_size tokens
    outlier_sketch_dim: int  # m_o: outlier sketch bits per key (first m_o rows of S)


@dataclass(frozen=True)
class QJLConfig:
    """QJL cache settings. Defaults are the paper's LongBench configuration (Llama-2 / longchat).

    The first ``initial_layers_count`` layers use the ``*_initial_layers`` budget, the others the
    general one. ``group_size`` is both the token group over which outlier channels are chosen
    and the channel group of value quantization; ``buffer_size`` recent tokens stay exact.
    """

    key_quantization_bits: int = 256
    key_quantization_bits_initial_layers: int = 512
    initial_layers_count: int = 15
    outlier_count_general: int = 8
    outlier_count_initial_layers: int = 8
    outlier_sketch_dim_general: int = 256
    outlier_sketch_dim_initial_layers: int = 128
    value_quantization_bits: int = 2
    group_size: int = 32
    buffer_size: int = 128
    seed: int = 42
    orthogonalize: bool = True
    hadamard: bool = False

    def __post_init__(self) -> None:
        # Types first: a float (2.0) or a string ("no") would pass the range checks below or be
        # truthy, then fail (or silently mean something else) in the middle of a generation.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{field.name} must be a bool (True or False), got {value!r}")
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{field.name} must be an int, got {type(value).__name__} {value!r}")
        if not 0 <= self.seed < 2**63 - 1:  # the second sketch uses seed + 1; torch seeds are 64-bit
            raise ValueError(f"seed must be an int in [0, 2**63 - 1), got {self.seed!r}")
        for name in ("key_quantization_bits", "key_quantization_bits_initial_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name} (sketch size m) must be a positive multiple of 8, got {value!r}")
        for kind in ("general", "initial_layers"):
            count = getattr(self, f"outlier_count_{kind}")
            dim = getattr(self, f"outlier_sketch_dim_{kind}")
            m = self.key_quantization_bits if kind == "general" else self.key_quantization_bits_initial_layers
            if not isinstance(count, int) or not 0 <= count <= MAX_HEAD_DIM:
                raise ValueError(f"outlier_count_{kind} must be an int in [0, {MAX_HEAD_DIM}], got {count!r}")
            if not isinstance(dim, int) or dim < 0 or dim % 8 or dim > m:
                raise ValueError(
                    f"outlier_sketch_dim_{kind} must be a multiple of 8 in [0, {m}] (its key sketch size), "
                    f"got {dim!r}"
                )
            if count and not dim:
                raise ValueError(f"outlier_sketch_dim_{kind} must be > 0 when outlier_count_{kind} > 0")
        if not isinstance(self.initial_layers_count, int) or self.initial_layers_count < 0:
            raise ValueError(f"initial_layers_count must be a non-negative int, got {self.initial_layers_count!r}")
        if self.value_quantization_bits not in VALUE_BITS:
            raise ValueError(f"value_quantization_bits must be one of {VALUE_BITS}, got {self.value_quantization_bits!r}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if not isinstance(self.buffer_size, int) or self.buffer_size <= 0 or self.buffer_size % self.group_size:
            raise ValueError(
                f"buffer_size must be a positive multiple of group_size ({self.group_size}), got {self.buffer_size!r}"
            )

    def layer_budget(self, layer_idx: int) -> LayerBudget:
        if layer_idx < self.initial_layers_count:
            return LayerBudget(
                self.key_quantization_bits_initial_layers,
                self.outlier_count_initial_layers,
                self.outlier_sketch_dim_initial_layers if self.outlier_count_initial_layers else 0,
            )
        return LayerBudget(
            self.key_quantization_bits,
            self.outlier_count_general,
            self.outlier_sketch_dim_general if self.outlier_count_general else 0,
        )

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError when this configuration cannot run on keys/values of ``head_dim``."""
        if not 0 < head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in (0, {MAX_HEAD_DIM}] (uint8 outlier indices), got {head_dim}")
        for kind in ("general", "initial_layers"):
            count = getattr(self, f"outlier_count_{kind}")
            if count > head_dim:
                raise ValueError(f"outlier_count_{kind} ({count}) exceeds head_dim ({head_dim})")
        if self.hadamard and head_dim & (head_dim - 1):
            raise ValueError(f"hadamard=True needs a power-of-two head_dim, got {head_dim}")
        bits = self.value_quantization_bits
        if bits != 16:
            if head_dim % self.group_size:
                raise ValueError(
                    f"group_size ({self.group_size}) must divide head_dim ({head_dim}) to group value channels"
                )
            if head_dim % (32 // bits):
                raise ValueError(f"head_dim ({head_dim}) must be a multiple of {32 // bits} for {bits}-bit values")

    def scaled_to_layers(self, num_layers: int, reference_layers: int = 32) -> "QJLConfig":
        """This configuration for a model of ``num_layers`` layers, keeping the share of layers with
        the initial-layer budget (the paper's 15 of Llama-2's 32 becomes 14 of SmolLM2's 30)."""
        for name, value in (("num_layers", num_layers), ("reference_layers", reference_layers)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive number of layers, got {value}")
        count = round(self.initial_layers_count * num_layers / reference_layers)
        return dataclasses.replace(self, initial_layers_count=min(count, num_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | Path) -> "QJLConfig":
        """Load a preset (e.g. ``config/qjl_paper_llama2.json``); unknown keys are an error."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a QJLConfig file holds a JSON object of fields, got a {type(data).__name__}")
        data.pop("_comment", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown QJLConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)
