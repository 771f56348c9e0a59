"""`rtn`: round-to-nearest baseline, 2/3/4/8 bits, per group or per channel, symmetric or asymmetric."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.quant.affine import PER_CHANNEL, quantize_weight
from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.errors import QuantkitError
from quantkit.quant.linear import AffineLinear

AFFINE_BITS = (2, 3, 4, 8)


def validate_affine(method: str, bits: int, group_size: int):
    """The checks rtn and gptq share: supported widths and a sensible group size."""
    if bits not in AFFINE_BITS:
        raise QuantkitError(f"{method}: --bits {bits} is not supported: use one of {', '.join(map(str, AFFINE_BITS))}")
    if group_size != PER_CHANNEL and group_size < 1:
        raise QuantkitError(f"{method}: --group-size {group_size} must be positive, or -1 for per-channel")


@dataclass
class RTNConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        validate_affine("rtn", self.bits, self.group_size)


@register_backend("rtn", RTNConfig, formats=("compressed-tensors", "gptq"), requires=("torchao",),
                  description="round-to-nearest baseline (4 bits on the int4 kernels, others dequantize)")
def quantize_rtn(linear: nn.Linear, config: RTNConfig, name: str) -> nn.Module:
    w = quantize_weight(linear.weight.data, config.bits, config.group_size, config.symmetric, name=name)
    return AffineLinear(w, linear.bias, dtype=linear.weight.dtype)
