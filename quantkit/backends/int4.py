"""`int4`: torchao int4 weight-only. 4 bits, asymmetric, per group, integer zero points."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.quant.affine import quantize_weight
from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.errors import QuantkitError
from quantkit.quant.linear import INT4_GROUP_SIZES, AffineLinear


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    group_size: int = 128

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise QuantkitError(f"int4: --group-size {self.group_size} is not supported: the int4 kernels take "
                                f"{', '.join(map(str, INT4_GROUP_SIZES))}")

    @property
    def bits(self) -> int:
        return 4


@register_backend("int4", Int4Config, formats=("compressed-tensors", "gptq"), requires=("torchao",),
                  description="torchao int4 weight-only (tinygemm kernels on CUDA and CPU)")
def quantize_int4(linear: nn.Linear, config: Int4Config, name: str) -> nn.Module:
    w = quantize_weight(linear.weight.data, 4, config.group_size, symmetric=False, name=name)
    return AffineLinear(w, linear.bias, dtype=linear.weight.dtype)
