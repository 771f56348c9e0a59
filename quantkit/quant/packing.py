"""Bit packing: the one home for it. Dense, LSB first, values may straddle int32 words.

This is the layout of compressed-tensors' pack-quantized (`pack_to_int32`, packed along K) and of
AutoGPTQ v1's `qweight` (packed along K, which is dim 0 there) and `qzeros` (packed along N): value
i of a row occupies bits [i*b, (i+1)*b) of the row's bit stream, word j holding bits [32j, 32j+32).
"""

from __future__ import annotations

import math

import torch


def packed_size(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned integers in [0, 2^bits) -> int32 words, packed along `dim`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 1 to 8 bits")
    v = values.movedim(dim, -1).to(torch.int64)  # int64: shifts past bit 31 are safe before the final cast
    n = v.shape[-1]
    words = packed_size(n, bits)
    start = torch.arange(n, device=v.device) * bits  # first bit of each value in the row's stream
    out = torch.zeros(*v.shape[:-1], words + 1, dtype=torch.int64, device=v.device)
    out.scatter_add_(-1, (start // 32).expand_as(v), v << (start % 32))
    spill = (start % 32) + bits - 32  # bits that run into the next word
    out.scatter_add_(-1, (start // 32 + 1).expand_as(v), torch.where(spill > 0, v >> (bits - spill), 0))
    out = out[..., :words] & 0xFFFFFFFF
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret as signed int32
    return out.to(torch.int32).movedim(-1, dim)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """int32 words -> n unsigned integers per row along `dim` (uint8), inverse of `pack`."""
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)  # room for the spill of the last value
    start = torch.arange(n, device=p.device) * bits
    lo = p.gather(-1, (start // 32).expand(*p.shape[:-1], n)) >> (start % 32)
    hi = p.gather(-1, (start // 32 + 1).expand(*p.shape[:-1], n)) << (32 - start % 32)
    v = (lo | torch.where(start % 32 + bits > 32, hi, 0)) & ((1 << bits) - 1)
    return v.to(torch.uint8).movedim(-1, dim)
