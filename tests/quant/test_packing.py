"""Bit packing: exact round trips at every width, byte counts, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unetquant.quant.packing import code_range, pack_codes, packed_size, unpack_codes

SHAPES = [(1,), (7,), (3, 5), (16, 3, 3, 3), (5, 7, 3, 3), (2, 3, 1, 1), (13, 1, 3, 3)]


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_width_and_shape(bits: int, shape: tuple[int, ...]) -> None:
    lowest, highest = code_range(bits)
    generator = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(lowest, highest + 1, shape, generator=generator, dtype=torch.int32)
    if bits == 1:
        codes = torch.where(codes == 0, torch.ones_like(codes), codes)
    codes.view(-1)[0] = lowest  # both extremes are stored
    codes.view(-1)[-1] = highest
    packed = pack_codes(codes, bits)
    count = int(np.prod(shape))
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_three_bit_codes_cross_byte_boundaries_in_the_documented_order() -> None:
    # codes 1, -1 (0b111), 2, -4 (0b100): stream LSB first = 100 111 010 001 -> bytes
    packed = pack_codes(torch.tensor([1, -1, 2, -4]), 3)
    # fields (LSB first): 1 -> 100, -1 -> 111, 2 -> 010, -4 -> 001
    stream = "100" + "111" + "010" + "001"  # bit k of the stream is bit k % 8 of byte k // 8
    expected = [int(stream[0:8][::-1], 2), int(stream[8:12][::-1], 2)]
    assert expected == [0b10111001, 0b1000]
    assert packed.tolist() == expected


def test_one_bit_codes_are_signs() -> None:
    packed = pack_codes(torch.tensor([1, -1, -1, 1, 1, 1, -1, -1, 1]), 1)
    assert packed.tolist() == [0b00111001, 0b1]
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack_codes(torch.tensor([1, 0]), 1)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_codes_outside_the_width_are_refused_not_wrapped(bits: int) -> None:
    lowest, highest = code_range(bits)
    with pytest.raises(ValueError, match=f"{bits}-bit fields cannot hold"):
        pack_codes(torch.tensor([0, highest + 1]), bits)
    with pytest.raises(ValueError, match="cannot hold"):
        pack_codes(torch.tensor([lowest - 1]), bits)


def test_damaged_or_misshapen_packed_data_is_refused() -> None:
    packed = pack_codes(torch.zeros(10, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="damaged"):
        unpack_codes(packed[:-1], 4, (10,))
    with pytest.raises(ValueError, match="damaged"):
        unpack_codes(packed.to(torch.int16), 4, (10,))
    with pytest.raises(ValueError, match="1 to 16 bits"):
        pack_codes(torch.zeros(3), 17)
