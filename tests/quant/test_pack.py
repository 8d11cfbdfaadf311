"""Bit packing: round trips at every width, exact sizes, range and length checks."""

from __future__ import annotations

import math

import pytest
import torch

from diffsqueeze.quant.primitives.pack import (
    pack_bool,
    pack_codes,
    packed_nbytes,
    unpack_bool,
    unpack_codes,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_round_trip_and_size(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, numel, bits).long(), codes)


def test_layouts_are_little_endian():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x81]
    assert pack_codes(torch.tensor([3, 0, 0, 2]), 2).tolist() == [0b10000011]
    # 3 bits: codes 5 (101) and 7 (111) -> bits 1,0,1,1,1,1 -> 0b111101
    assert pack_codes(torch.tensor([5, 7]), 3).tolist() == [0b111101]


def test_out_of_range_and_bad_buffers():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="widths 1..8"):
        pack_codes(torch.tensor([0]), 9)
    packed = pack_codes(torch.arange(16) % 8, 3)
    with pytest.raises(ValueError, match="must be 6 uint8 bytes"):
        unpack_codes(packed[:-1], 16, 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int16), 16, 3)


def test_bool_masks():
    m = torch.rand(5, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    p = pack_bool(m)
    assert p.numel() == 6
    assert torch.equal(unpack_bool(p, m.shape), m)
