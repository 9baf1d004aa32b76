import pytest
import torch

from qjl_kernel.packing import pack_codes, pack_sign_bits, unpack_codes, unpack_sign_bits, unpack_signs

SHAPES = [(8,), (3, 16), (2, 5, 256), (1, 2, 3, 4, 1024)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_bits_round_trip(shape):
    sketch = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    bits = pack_sign_bits(sketch)
    assert bits.dtype == torch.uint8
    assert bits.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_sign_bits(bits), sketch > 0)


def test_sign_bits_hand_written_example():
    # Coordinates 0..15; bit i of byte j is 1 when coordinate 8j + i is > 0 (zero counts as negative).
    sketch = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.1, 3.0, 3.0, -2.0,   # bits 0,2,5,6 -> 1+4+32+64 = 101
                           -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 7.0])  # bit 7 -> 128
    bits = pack_sign_bits(sketch)
    assert bits.tolist() == [101, 128]
    assert unpack_signs(bits).tolist() == [1, -1, 1, -1, -1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1, 1]


def test_sign_bits_reject_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_sign_bits(torch.randn(12))
    with pytest.raises(TypeError, match="uint8"):
        unpack_sign_bits(torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_codes_round_trip(bits, dim):
    codes = torch.randint(0, 1 << bits, (3, 7, dim), generator=torch.Generator().manual_seed(1))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, 7, dim * bits // 32)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_codes_hand_written_example():
    # 2-bit codes: channel j of a word sits at bits [2j, 2j + 2).
    codes = torch.tensor([1, 2, 3, 0] + [0] * 11 + [3])
    expected = 1 + (2 << 2) + (3 << 4) + (3 << 30)  # = 3221225529 as unsigned
    assert pack_codes(codes, 2).tolist() == [expected - 2**32]  # stored as signed int32
    # 4-bit codes: channel j at bits [4j, 4j + 4).
    codes4 = torch.tensor([15, 0, 1, 0, 0, 0, 0, 9])
    assert pack_codes(codes4, 4).tolist() == [15 + (1 << 8) + (9 << 28) - 2**32]
