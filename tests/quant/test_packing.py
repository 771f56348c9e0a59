import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantkit.quant.packing import pack, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [32, 96, 100, 7])
def test_round_trip_and_matches_compressed_tensors(bits, n):
    q = torch.randint(0, 2**bits, (6, n), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, -(-n * bits // 32))
    assert torch.equal(unpack(packed, bits, n), q)
    # compressed-tensors stores signed values + 2^(b-1), which are our unsigned values.
    assert torch.equal(packed, pack_to_int32((q.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8), bits))
    assert torch.equal(unpack(pack(q.T, bits, dim=0), bits, n, dim=0), q.T)


def test_lsb_first_by_hand():
    # 4-bit values 1..8 in one word: 0x87654321.
    packed = pack(torch.arange(1, 9, dtype=torch.uint8)[None], 4)
    assert packed.item() == 0x87654321 - 2**32
