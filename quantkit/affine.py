"""Integer affine weight quantization: the one home for qparams, shared by int4, rtn and gptq.

A weight W (N out, K in) is cut into groups of `group_size` input columns; each (row, group) has a
scale s and an integer zero point z, and W ~= (q - z) * s with q unsigned in [0, 2^bits). Symmetric
quantization fixes z = 2^(bits-1). qparams and rounding come from torchao's affine primitives
(`choose_qparams_affine`, `quantize_affine`), so a weight quantizes exactly as torchao quantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from quantkit.errors import QuantkitError


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """torchao's quant_min, quant_max: signed for symmetric (z = 0 there), unsigned for asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def resolve_group_size(group_size: int, in_features: int, name: str = "weight") -> int:
    """-1 means one group per row (per channel); otherwise the group size must divide in_features."""
    if group_size == -1:
        return in_features
    if in_features % group_size:
        raise QuantkitError(f"{name}: group size {group_size} does not divide in_features={in_features}: "
                            f"choose a --group-size that divides it, or -1 for per-channel")
    return group_size


def choose_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Per-group scale (N, K/g) in w's dtype and unsigned integer zero point (N, K/g) int32."""
    qmin, qmax = qrange(bits, symmetric)
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    target = torch.int8 if symmetric else torch.uint8
    scale, zero = choose_qparams_affine(w, mapping, (1, group_size), target, qmin, qmax,
                                        zero_point_dtype=torch.int32)
    offset = 2 ** (bits - 1) if symmetric else 0
    return scale.view(w.shape[0], -1), zero.view(w.shape[0], -1) + offset


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool) -> torch.Tensor:
    """Round w (N, k) onto the grid of the given per-group qparams (N, k/g): unsigned q as uint8."""
    qmin, qmax = qrange(bits, symmetric)
    offset = 2 ** (bits - 1) if symmetric else 0
    target = torch.int8 if symmetric else torch.uint8
    q = quantize_affine(w, (1, group_size), scale, zero - offset, target, qmin, qmax)
    return (q.to(torch.int16) + offset).to(torch.uint8)


@dataclass
class AffineWeight:
    """A quantized weight in canonical form; formats and kernels are derived from it."""

    q: torch.Tensor  # uint8 (N, K) in [0, 2^bits), columns in their original order
    scale: torch.Tensor  # (N, G) float, G = number of groups
    zero: torch.Tensor  # int32 (N, G) unsigned zero points; 2^(bits-1) when symmetric
    bits: int
    group_size: int  # columns per group (K when per channel)
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 (K,) group of each column (act-order); None: column // group_size

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        g = self.group_index()  # (K,)
        w = (self.q.to(torch.int32) - self.zero[:, g]).to(self.scale.dtype) * self.scale[:, g]
        return w if dtype is None else w.to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, name: str = "weight") -> AffineWeight:
    """Round-to-nearest quantization of a (N, K) weight."""
    group_size = resolve_group_size(group_size, w.shape[1], name)
    scale, zero = choose_qparams(w, bits, group_size, symmetric)
    q = quantize_with(w, scale, zero, bits, group_size, symmetric)
    return AffineWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=group_size, symmetric=symmetric)
