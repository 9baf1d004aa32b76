"""Bit layouts shared by every backend.

Sign bits (QJL keys): a sketch of ``m`` coordinates is stored as ``m / 8`` uint8 bytes; bit ``i``
(least significant first) of byte ``j`` is 1 when coordinate ``8 j + i`` is > 0. A zero coordinate
is stored as 0 and read back as the sign -1.

Value codes: ``b``-bit codes (b in {2, 4}) of ``d`` channels are stored as ``d * b / 32`` int32
words; channel ``c = w * (32 / b) + j`` occupies bits ``[j b, (j + 1) b)`` of word ``w``. Words are
int32 because that is what kernels load; the top code sets the sign bit, which is harmless.
"""

from __future__ import annotations

import torch

SIGN_BITS_PER_BYTE = 8
SUPPORTED_VALUE_BITS = (2, 4)

_SHIFTS_CACHE: dict[tuple[torch.device, int], torch.Tensor] = {}


def _bit_positions(device: torch.device, count: int) -> torch.Tensor:
    key = (device, count)
    if key not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[key] = torch.arange(count, device=device, dtype=torch.int64)
    return _SHIFTS_CACHE[key]


def pack_sign_bits(sketch: torch.Tensor) -> torch.Tensor:
    """Pack ``sketch > 0`` along the last axis: ``[..., m]`` -> uint8 ``[..., m / 8]``."""
    m = sketch.shape[-1]
    if m % SIGN_BITS_PER_BYTE:
        raise ValueError(f"sketch size must be a multiple of 8, got {m}")
    positive = (sketch > 0).view(*sketch.shape[:-1], m // SIGN_BITS_PER_BYTE, SIGN_BITS_PER_BYTE)
    # uint8 throughout (distinct powers of two sum to at most 255): 8x less memory than int64.
    return (positive.to(torch.uint8) * _byte_weights(sketch.device)).sum(-1, dtype=torch.uint8)


_BYTE_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _byte_weights(device: torch.device) -> torch.Tensor:
    """uint8 ``[8]``: 1, 2, 4, ..., 128 (bit i of a byte is coordinate 8 j + i)."""
    if device not in _BYTE_WEIGHTS:
        _BYTE_WEIGHTS[device] = torch.tensor([1 << i for i in range(SIGN_BITS_PER_BYTE)], dtype=torch.uint8,
                                             device=device)
    return _BYTE_WEIGHTS[device]


def unpack_sign_bits(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_sign_bits`: uint8 ``[..., m / 8]`` -> bool ``[..., m]`` (True = +1)."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"sign bits must be uint8, got {bits.dtype}")
    shifts = _bit_positions(bits.device, SIGN_BITS_PER_BYTE)
    unpacked = torch.bitwise_right_shift(bits.to(torch.int64).unsqueeze(-1), shifts) & 1
    return unpacked.bool().flatten(-2)


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """float32 ``[256, 8]``: row b holds the +1/-1 signs encoded by byte b."""
    if device not in _SIGN_TABLES:
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
        table = (torch.bitwise_right_shift(byte, torch.arange(SIGN_BITS_PER_BYTE)) & 1).float() * 2.0 - 1.0
        _SIGN_TABLES[device] = table.to(device)
    return _SIGN_TABLES[device]


def unpack_signs(bits: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., m / 8]`` -> float32 ``[..., m]`` of +1 / -1 (a table lookup per byte)."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"sign bits must be uint8, got {bits.dtype}")
    return _sign_table(bits.device)[bits.long()].flatten(-2)


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_VALUE_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_VALUE_BITS}, got {bits}")
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)``: ``[..., d]`` -> int32 ``[..., d * bits / 32]``."""
    per_word = codes_per_word(bits)
    d = codes.shape[-1]
    if d % per_word:
        raise ValueError(f"channel count {d} must be a multiple of {per_word} for {bits}-bit codes")
    grouped = codes.to(torch.int64).view(*codes.shape[:-1], d // per_word, per_word)
    shifts = _bit_positions(codes.device, per_word) * bits
    words = torch.bitwise_left_shift(grouped, shifts).sum(-1)
    # Words live in [0, 2^32); reinterpret the upper half as negative int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., w]`` -> int64 codes ``[..., w * 32 / bits]``."""
    per_word = codes_per_word(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"packed codes must be int32, got {words.dtype}")
    shifts = _bit_positions(words.device, per_word) * bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.bitwise_right_shift(unsigned.unsqueeze(-1), shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)
