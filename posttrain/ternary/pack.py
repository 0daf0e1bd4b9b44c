"""2-bit packing of ternary weights in transformers' BitNet layout (transformers/integrations/bitnet.py).

Layout, for codes T of shape (out, *rest) with values in {-1, 0, +1}:
    R = ceil(out / 4); packed has shape (R, *rest), dtype uint8
    code c = T + 1 in {0, 1, 2}   (00 = -1, 01 = 0, 10 = +1; 11 is never written)
    packed[r] = sum_i  c[i * R + r] << (2 * i),  i = 0..3
i.e. the rows are cut into 4 consecutive blocks of R rows and block i lives in bits 2i..2i+1.

`pack_ternary` is byte-identical to `transformers.integrations.bitnet.pack_weights` for every shape, including
out % 4 != 0: there the missing rows of the last block are left as bits 00, which unpack to -1, exactly as
pack_weights leaves them. Unpacking therefore always yields 4 * R rows; pass `rows=out` to trim the padding.
Transformers' `BitLinear` allocates out // 4 packed rows, so it cannot load a layer whose out_features is not
a multiple of 4; `posttrain.ternary.export.hf` refuses such layers (see there) instead of writing a file that
fails to load. Unlike pack_weights, `pack_ternary` does not modify its argument, and it needs no
torch.compile (transformers' unpack_weights compiles for ~12 s on a CPU).
"""

from __future__ import annotations

import torch

from posttrain.errors import PosttrainError

VALUES_PER_BYTE = 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes (any integer or float dtype, values in {-1, 0, 1}) along dim 0 into uint8."""
    if codes.dim() == 0 or codes.shape[0] == 0:
        raise PosttrainError(f"pack_ternary needs a tensor with at least one row, got shape {tuple(codes.shape)}")
    lo, hi = codes.min().item(), codes.max().item()
    if lo < -1 or hi > 1 or (codes.is_floating_point() and not torch.equal(codes, codes.round())):
        raise PosttrainError(
            f"pack_ternary got values in [{lo}, {hi}], not ternary: quantize first with ternary_codes(weight)"
        )
    out = codes.shape[0]
    rows = (out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE
    c = (codes + 1).to(torch.uint8)
    if out != rows * VALUES_PER_BYTE:  # pad with code 0, the bits pack_weights leaves unset
        pad = torch.zeros(
            (rows * VALUES_PER_BYTE - out, *codes.shape[1:]),
            dtype=torch.uint8,
            device=c.device,
        )
        c = torch.cat([c, pad])
    blocks = c.view(VALUES_PER_BYTE, rows, *codes.shape[1:])
    packed = blocks[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= blocks[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, rows: int | None = None, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_ternary`: codes in {-1, 0, 1} of shape (4 * R, *rest), trimmed to `rows` if given."""
    if packed.dtype != torch.uint8:
        raise PosttrainError(f"unpack_ternary needs a uint8 packed tensor, got {packed.dtype}")
    full = packed.shape[0] * VALUES_PER_BYTE
    if rows is not None and not full - VALUES_PER_BYTE < rows <= full:
        raise PosttrainError(
            f"unpack_ternary: {packed.shape[0]} packed rows hold {full - 3}..{full} rows, not rows={rows}"
        )
    blocks = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(blocks).to(dtype) - 1
    return codes if rows is None else codes[:rows]
