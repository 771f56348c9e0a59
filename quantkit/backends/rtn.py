"""`rtn`: round-to-nearest baseline, 2/3/4/8 bits, per group or per channel, symmetric or asymmetric."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.quant.affine import quantize_weight, validate_affine
from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.quant.linear import AffineLinear

@dataclass(frozen=True)
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
