"""`bnb-int8`, `bnb-nf4`, `bnb-fp4`: bitsandbytes' LLM.int8 and 4-bit (QLoRA) linears.

The runtime modules are bitsandbytes' own, `bnb.nn.Linear8bitLt` and `bnb.nn.Linear4bit`, built as
transformers builds them, so their state_dict is the layout transformers reads and writes
(quantkit.formats.bnb) and a loaded checkpoint computes exactly what the quantized model computed.
bitsandbytes is imported inside the functions: the registry's `requires` reports it when missing.

Devices: bitsandbytes 0.50.2 quantizes and runs all three on CPU (slowly) and on CUDA.

CPU caveats (bitsandbytes 0.50.2, checked on this project's AVX512 machine):
- Its CPU 4-bit dequantize kernel indexes absmax per row, so blocks that cross rows (in_features not
  a multiple of blocksize) dequantize wrongly, silently (2-3x the NF4 error). Quantizing such a
  linear is refused here, and running such a module on CPU raises.
- On a CPU with AVX512-BF16, `Linear4bit.forward` (eval mode, no grad) repacks its weight in place
  into a host-specific layout with bf16 absmax and no double quant; its state_dict() then rebuilds
  the portable layout lossily (absmax re-quantized from bf16), so a plain state_dict() after a CPU
  forward is not what quantization produced. A forward pre-hook keeps references to the portable
  tensors before the first repack (no copies: bitsandbytes replaces those tensors, it does not modify
  them), and `portable_state_dict` exports those. The cost is the 4-bit weight held twice on such
  CPUs once a module has run, the trade AffineLinear makes too (portable buffers plus the kernel
  layout). The repack also needs out_features % 32 == 0; other modules take bitsandbytes' generic CPU
  path (dequantize + matmul) instead of failing inside it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.dtypes import CHOICES, parse_dtype
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
CPU_REPACK_BLOCK_N = 32  # bitsandbytes' _convert_weight_packed_for_cpu tiles out_features by 32
# bitsandbytes 0.50.2 logs a warning from this logger at import on AVX512-BF16 CPUs when it cannot fetch an
# optional hub kernel (`kernels` missing, offline, or the repository untrusted); it then uses its own CPU kernel.
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bitsandbytes():
    """`bitsandbytes`, imported with its hub-kernel import warning silenced (only for the import: nothing else).

    The message is noise for a quantkit user: the fallback is bitsandbytes' own CPU kernel (gemv_4bit_inference_cpu),
    the path it always took before `kernels` existed. Other bitsandbytes warnings still come through.
    """
    import importlib

    ops_log = logging.getLogger(BNB_CPU_OPS_LOGGER)
    level = ops_log.level
    ops_log.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        ops_log.setLevel(level)


# -- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BnbInt8Config(QuantConfig):
    """LLM.int8: int8 weights per output row; input columns above `threshold` run in fp16 (0 = none)."""

    threshold: float = 6.0

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise QuantkitError(f"bnb-int8: --threshold {t!r} must be a number >= 0 "
                                f"(6.0 is LLM.int8's outlier threshold, 0 turns the outlier path off)")
        object.__setattr__(self, "threshold", float(t))  # frozen; transformers' BitsAndBytesConfig insists on a float


@dataclass(frozen=True)
class Bnb4bitConfig(QuantConfig):
    """What bnb-nf4 and bnb-fp4 share: double quant of the absmax, block size, compute dtype."""

    quant_type: ClassVar[str] = ""
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "fp16"

    def __post_init__(self):
        if not isinstance(self.double_quant, bool):
            raise QuantkitError(f"{self.method}: --double-quant must be true or false, not {self.double_quant!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise QuantkitError(f"{self.method}: --blocksize {self.blocksize!r} is not supported by bitsandbytes: "
                                f"use one of {', '.join(map(str, BLOCKSIZES))}")
        if self.compute_dtype not in CHOICES:
            raise QuantkitError(f"{self.method}: --compute-dtype {self.compute_dtype!r} is not supported: "
                                f"use one of {', '.join(CHOICES)}")


@dataclass(frozen=True)
class BnbNF4Config(Bnb4bitConfig):
    quant_type: ClassVar[str] = "nf4"


@dataclass(frozen=True)
class BnbFP4Config(Bnb4bitConfig):
    quant_type: ClassVar[str] = "fp4"


# -- building bitsandbytes modules (quantizing here, loading in quantkit.formats.bnb) -----------


def _new_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


def linear8bit(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float,
               scb: torch.Tensor | None = None) -> nn.Module:
    """A Linear8bitLt from an fp weight (N, K), or from an int8 weight (N, K) with its row scales `scb` (N,)."""
    bnb = import_bitsandbytes()

    out_features, in_features = weight.shape
    module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                 threshold=threshold, device="meta")
    # As transformers: Int8Params quantizes on .to(device) only when moved from CPU; int8 data + SCB is loaded as is.
    param = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False, SCB=scb)
    module.weight = param.to(weight.device)
    module.bias = _new_bias(bias)
    keep_portable_state(module)
    return module


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str, double_quant: bool, blocksize: int,
               compute_dtype: torch.dtype) -> nn.Module:
    """A Linear4bit quantizing the fp weight (N, K) in blocks of `blocksize` consecutive elements."""
    bnb = import_bitsandbytes()

    out_features, in_features = weight.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                               compress_statistics=double_quant, quant_type=quant_type, device="meta")
    param = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8,
                              module=module)
    module.weight = param.to(weight.device)  # Params4bit quantizes on its first move to a real device
    module.bias = _new_bias(bias)
    keep_portable_state(module)
    return module


def prequantized_linear4bit(tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> nn.Module:
    """A Linear4bit from its state_dict tensors (`weight` packed uint8 (N*K/2, 1), `weight.absmax`, ...)."""
    bnb = import_bitsandbytes()

    weight = tensors["weight"]
    stats = {k: v for k, v in tensors.items() if k.startswith("weight.")}
    # As transformers' Bnb4bitDeserialize: the shape, blocksize, quant type and nesting come from the stats.
    param = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats, requires_grad=False,
                                                device=weight.device)
    out_features, in_features = param.quant_state.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in tensors, compute_dtype=compute_dtype,
                               compress_statistics=param.compress_statistics, quant_type=param.quant_type,
                               quant_storage=weight.dtype, device="meta")
    param.module, module.quant_state = module, param.quant_state
    module.weight = param
    module.bias = _new_bias(tensors.get("bias"))
    keep_portable_state(module)
    return module


# -- the portable state of a Linear4bit, whatever bitsandbytes' CPU path did to it ------------------


def _repacked_for_cpu(module: nn.Module) -> bool:
    quant_state = getattr(module.weight, "quant_state", None)  # Int8Params has none
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _before_forward(module: nn.Module, args):
    """Forward pre-hook of quantkit's bitsandbytes modules: runs before bitsandbytes' forward changes them.

    Their forward casts the bias in place to the compute dtype (every device), and on AVX512-BF16 CPUs
    repacks a Linear4bit (see top): the references kept here are what quantization produced.
    """
    if getattr(module, "quantkit_portable_state", None) is None:
        module.quantkit_portable_state = module.state_dict()  # references only: bitsandbytes replaces, never edits
    if args[0].device.type != "cpu" or not hasattr(module.weight, "quant_state"):
        return
    blocksize = module.weight.quant_state.blocksize
    if module.in_features % blocksize:
        raise QuantkitError(f"Linear4bit {module.out_features}x{module.in_features}: blocksize {blocksize} does not "
                            f"divide in_features, which bitsandbytes 0.50.2's CPU dequantize gets wrong: "
                            f"run it on CUDA")
    if not module.support_avx512bf16_for_cpu or _repacked_for_cpu(module):
        return
    if module.out_features % CPU_REPACK_BLOCK_N:
        module.support_avx512bf16_for_cpu = False  # bitsandbytes' repack would fail on this shape
        log.debug("Linear4bit %dx%d runs on bitsandbytes' generic CPU path", module.out_features, module.in_features)


def keep_portable_state(module: nn.Module):
    module.quantkit_portable_state = None
    module.register_forward_pre_hook(_before_forward)


def portable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors in the portable layout, keys relative ('weight', 'weight.absmax', 'SCB', ...)."""
    saved = getattr(module, "quantkit_portable_state", None)
    if saved is not None:  # kept before bitsandbytes' first CPU repack; the quantization never changes after
        return dict(saved)
    if _repacked_for_cpu(module):
        raise QuantkitError("this Linear4bit was repacked by bitsandbytes' AVX512-BF16 CPU path, which rounds "
                            "its absmax to bf16, and no portable copy was kept: quantize it with quantkit, "
                            "or export before running it on CPU")
    return module.state_dict()  # not repacked: bitsandbytes' own state_dict is the portable layout


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The (N, K) weight a bitsandbytes linear computes with, in fp32; None where it cannot be read back.

    Read before any CPU forward (bitsandbytes' AVX512 repack changes the 4-bit layout in place).
    """
    bnb = import_bitsandbytes()
    bf = bnb.functional

    if isinstance(module, bnb.nn.Linear4bit) and not _repacked_for_cpu(module):
        return bf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt) and getattr(module.weight, "SCB", None) is not None:
        return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127  # LLM.int8 row-wise absmax
    return None


# -- the registered backends --------------------------------------------------------------------


@register_backend("bnb-int8", BnbInt8Config, devices=("cpu", "cuda"), formats=("bnb",), requires=("bitsandbytes",),
                  dense_weight=dense_weight, description="bitsandbytes LLM.int8 (int8 rows, fp16 outlier columns)")
def quantize_bnb_int8(linear: nn.Linear, config: BnbInt8Config, name: str) -> nn.Module:
    return linear8bit(linear.weight.data, linear.bias, config.threshold).train(linear.training)


def quantize_bnb_4bit(linear: nn.Linear, config: Bnb4bitConfig, name: str) -> nn.Module:
    if linear.in_features % config.blocksize:  # blocks would cross rows: see the CPU caveats at the top
        raise QuantkitError(f"{name}: {config.method} --blocksize {config.blocksize} does not divide "
                            f"in_features={linear.in_features}: choose one that does (64 divides every Llama 2 linear)")
    module = linear4bit(linear.weight.data, linear.bias, config.quant_type, config.double_quant, config.blocksize,
                        parse_dtype(config.compute_dtype))
    return module.train(linear.training)


register_backend("bnb-nf4", BnbNF4Config, devices=("cpu", "cuda"), formats=("bnb",), requires=("bitsandbytes",),
                 dense_weight=dense_weight, description="bitsandbytes 4-bit NormalFloat (QLoRA), optional double quant")(quantize_bnb_4bit)
register_backend("bnb-fp4", BnbFP4Config, devices=("cpu", "cuda"), formats=("bnb",), requires=("bitsandbytes",),
                 dense_weight=dense_weight, description="bitsandbytes 4-bit float, optional double quant")(quantize_bnb_4bit)
