"""`gptq`: native GPTQ, calibrated layer by layer (quantkit/run/calibrator.py); the solver beside it (solver.py).

Its observer collects each linear's Hessian from the calibration passes; the handler runs the solver. With
`awq=True` (`--awq`) AWQ's scaling rewrites each layer first (awq_then_gptq).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit.backends.awq import AWQConfig, awq_layer_transform
from quantkit.quant.affine import PER_CHANNEL, validate_affine
from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.errors import QuantkitError
from quantkit.backends.gptq.solver import HessianAccumulator, gptq_quantize
from quantkit.quant.linear import AffineLinear
from quantkit.quant.record import QuantRecord

log = logging.getLogger(__name__)


class HessianObserver(HessianAccumulator):
    """GPTQ's statistic: H = 2/n sum x x^T (K, K) in fp32 (Frantar et al. 2022, IST-DASLab gptq.py add_batch).

    It depends on the inputs alone, so linears that read the same input share one (gptq_quantize never changes
    the H it is given)."""

    shared_by_inputs = True

    @classmethod
    def for_linear(cls, linear: nn.Linear, config) -> "HessianObserver":
        return cls(linear.in_features, linear.weight.device)

    def handler_kwargs(self) -> dict:
        return {"hessian": self.H}


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    desc_act: bool = False  # act-order: quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # with act-order: qparams fixed per original group, no g_idx needed
    damp_percent: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down, each on recomputed inputs
    block_size: int = 128  # lazy-batch width
    mse: bool = False  # search the clipping range per group (minimum |w - q|^2.4)
    awq: bool = False  # AWQ's activation-aware scaling of each layer first (quantkit.backends.awq), then GPTQ

    def __post_init__(self):
        validate_affine("gptq", self.bits, self.group_size)
        if not 0 < self.damp_percent < 1:
            raise QuantkitError(f"gptq: --damp {self.damp_percent} must be in (0, 1); 0.01 is the usual value")
        if self.block_size < 1:
            raise QuantkitError(f"gptq: block_size {self.block_size} must be positive")
        if self.static_groups and self.group_size == PER_CHANNEL:
            raise QuantkitError("gptq: --static-groups needs a --group-size (it has no effect per channel)")


def awq_then_gptq(ctx):
    """The layer transform of `awq=True` linears: AWQ's scaling (its search fake-quantizes round-to-nearest on GPTQ's
    grid; no clipping search: GPTQ compensates its own rounding), before any group is collected, so GPTQ's Hessians
    are those of the scaled inputs (llm-compressor's AWQModifier followed by its GPTQModifier, in one pass a layer)."""
    chosen = {n: AWQConfig(c.bits, c.group_size, c.symmetric, clip=False) for n, c in ctx.configs.items() if c.awq}
    if chosen:
        awq_layer_transform(replace(ctx, configs=chosen))


@register_backend("gptq", GPTQConfig, formats=("gptq", "compressed-tensors"), requires=("torchao",),
                  observer=HessianObserver.for_linear, layer_transform=awq_then_gptq,
                  rewrites=lambda config: config.awq,
                  description="GPTQ (Frantar et al. 2022), calibrated, layer by layer")
def quantize_gptq(linear: nn.Linear, config: GPTQConfig, name: str, hessian: torch.Tensor | None = None) -> nn.Module:
    if hessian is None:
        raise QuantkitError(f"{name}: gptq needs calibration data: pass --calib (or calibration= in Python)")
    result = gptq_quantize(linear.weight.data, hessian, config.bits, config.group_size, config.symmetric,
                           act_order=config.desc_act, static_groups=config.static_groups,
                           damp=config.damp_percent, block_size=config.block_size, mse=config.mse, name=name)
    if result.dead_inputs:
        log.warning("%s: %d of %d input channels were zero on every calibration token; GPTQ set their weight "
                    "columns to 0 (the reference does too): calibrate on text that uses them",
                    name, result.dead_inputs, linear.in_features)
    # Built in the weight's dtype, the export dtype: replace_linear hands over the linear in it even when
    # the layer was calibrated in a wider dtype.
    module = AffineLinear(result.weight, linear.bias, dtype=linear.weight.dtype)
    module.quant_record = QuantRecord(config, result.relative_error, "output",  # ||(W - Q) X|| / ||W X||
                                      dead_inputs=result.dead_inputs)
    log.info("%s: gptq relative output error %.5f (loss %.4g)", name, result.relative_error, result.loss)
    return module
