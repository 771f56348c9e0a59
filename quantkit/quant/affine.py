"""Integer affine weight quantization: the one home for qparams, shared by int4, rtn and gptq.

A weight W (N out, K in) is cut into groups of `group_size` input columns; each (row, group) has a
scale s and an integer zero point z, and W ~= (q - z) * s with q unsigned in [0, 2^bits). Symmetric
quantization fixes z = 2^(bits-1). qparams and rounding come from torchao's affine primitives
(`choose_qparams_affine`, `quantize_affine`), so a weight quantizes exactly as torchao quantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """torchao's quant_min, quant_max: signed for symmetric (z = 0 there), unsigned for asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


PER_CHANNEL = -1  # group_size meaning one group per output row, in configs and in every format's metadata
AFFINE_BITS = (2, 3, 4, 8)  # the widths of the affine methods (rtn, gptq) and of the formats that hold them


def validate_affine(method: str, bits: int, group_size: int):
    """The checks every affine config makes: a supported width and a sensible group size (QuantkitError)."""
    if bits not in AFFINE_BITS:
        raise QuantkitError(f"{method}: --bits {bits} is not supported: use one of {', '.join(map(str, AFFINE_BITS))}")
    if group_size != PER_CHANNEL and group_size < 1:
        raise QuantkitError(f"{method}: --group-size {group_size} must be positive, or -1 for per-channel")


def resolve_group_size(group_size: int, in_features: int, name: str = "weight",
                       fix: str = "choose a --group-size that divides it, or -1 for per-channel",
                       partial_ok: bool = False) -> int:
    """Columns per group: -1 (PER_CHANNEL) means one group per row; otherwise it must divide in_features
    (unless partial_ok: a reader of files whose last group may be partial).

    The one place "-1 means per channel" is resolved; `fix` ends the error message (a stored file's
    readers say how to fix the file instead of the flag).
    """
    if group_size == PER_CHANNEL:
        return in_features
    if in_features % group_size and not partial_ok:
        raise QuantkitError(f"{name}: group size {group_size} does not divide in_features={in_features}: {fix}")
    return group_size


def trivial_g_idx(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """Whether g_idx (K,) is absent or just column // group_size (no act-order permutation)."""
    return g_idx is None or torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // group_size)


@dataclass(frozen=True)
class AffineScheme:
    """What a format needs to know of an integer-affine quantization, from a config (before any work)."""

    bits: int
    group_size: int  # PER_CHANNEL (-1) for one group per row
    symmetric: bool
    act_order: bool = False  # columns quantized in order of decreasing Hessian diagonal
    static_groups: bool = False  # with act-order: groups stay contiguous (no scattered g_idx)

    @property
    def scattered_groups(self) -> bool:
        """Act-order without static groups: the groups scatter over the columns (a g_idx is needed)."""
        return self.act_order and not self.static_groups


def affine_scheme(config) -> AffineScheme | None:
    """The scheme of any backend config that has `bits` and `group_size` (int4, rtn, gptq, a plugin's), else None.

    `symmetric`, `desc_act` and `static_groups` default to False when the config has no such field (int4).
    """
    if not (hasattr(config, "bits") and hasattr(config, "group_size")):
        return None
    return AffineScheme(config.bits, config.group_size, bool(getattr(config, "symmetric", False)),
                        bool(getattr(config, "desc_act", False)), bool(getattr(config, "static_groups", False)))


def choose_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Per-group scale (N, K/g) in w's dtype and unsigned integer zero point (N, K/g) int32."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine  # slow import: on use

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
    from torchao.quantization.quant_primitives import quantize_affine

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
