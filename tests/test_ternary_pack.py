"""2-bit packing: byte-identical to transformers' pack_weights, exact round trip, rows not a multiple of 4."""

import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from posttrain.errors import PosttrainError
from posttrain.ternary import pack_ternary, unpack_ternary

# transformers' unpack_weights is torch.compile'd (~12 s cold on CPU): compare against its eager body
unpack_weights_eager = getattr(unpack_weights, "_torchdynamo_orig_callable", unpack_weights)


def random_codes(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("shape", [(4, 3), (8, 16), (64, 128), (128, 64), (12, 5), (16,), (5, 7), (6, 3), (1, 4), (7,)])
def test_pack_is_byte_identical_to_transformers(shape):
    codes = random_codes(*shape, seed=sum(shape))
    ours = pack_ternary(codes)
    theirs = pack_weights(codes.clone())  # pack_weights adds 1 to its argument in place
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert torch.equal(pack_ternary(codes.float()), ours)  # float codes pack the same
    assert torch.equal(codes, random_codes(*shape, seed=sum(shape)))  # ours does not modify its input


@pytest.mark.parametrize("shape", [(4, 3), (64, 128), (12, 5), (16,)])
def test_unpack_round_trip_and_transformers_layout(shape):
    codes = random_codes(*shape, seed=1)
    packed = pack_ternary(codes)
    assert torch.equal(unpack_ternary(packed), codes)
    assert torch.equal(unpack_weights_eager(packed, dtype=torch.float32), codes.float())


def test_layout_by_hand():
    # out = 8, R = 2: packed row r holds rows r, 2+r, 4+r, 6+r in bits 0-1, 2-3, 4-5, 6-7 (codes w + 1)
    codes = torch.tensor([[-1], [0], [1], [-1], [0], [1], [1], [0]])
    packed = pack_ternary(codes)
    assert packed.flatten().tolist() == [0b10_01_10_00, 0b01_10_00_01]


def test_rows_not_multiple_of_four_pad_with_minus_one_and_trim():
    codes = random_codes(5, 7, seed=3)
    packed = pack_ternary(codes)
    assert packed.shape == (2, 7)
    full = unpack_ternary(packed)
    assert full.shape == (8, 7) and bool((full[5:] == -1).all())  # the bits pack_weights leaves at 00
    assert torch.equal(unpack_ternary(packed, rows=5), codes)
    with pytest.raises(PosttrainError, match="rows=4"):
        unpack_ternary(packed, rows=4)


def test_pack_rejects_non_ternary_and_unpack_non_uint8():
    with pytest.raises(PosttrainError, match="not ternary"):
        pack_ternary(torch.tensor([[2, 0, 0, 1]]).t())
    with pytest.raises(PosttrainError, match="not ternary"):
        pack_ternary(torch.tensor([0.5, 0.0, 1.0, -1.0]))
    with pytest.raises(PosttrainError, match="uint8"):
        unpack_ternary(torch.zeros(2, 2, dtype=torch.int8))
