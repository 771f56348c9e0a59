"""The bitsandbytes format: the state_dict transformers writes for a bitsandbytes model.

Per quantized linear (N out, K in), exactly bitsandbytes' own module state_dict:
  4-bit: `weight` uint8 (N*K/2, 1) packed nibbles, `weight.absmax` (uint8 with double quant, else
         fp32) one per block, `weight.quant_map` fp32 (16,), with double quant `weight.nested_absmax`
         fp32 and `weight.nested_quant_map` fp32 (256,), and `weight.quant_state.bitsandbytes__nf4`
         (or __fp4): uint8 bytes of a JSON dict (shape, blocksize, dtype, nested blocksize/offset...);
  int8:  `weight` int8 (N, K), `SCB` fp32 (N,) row absmax, `weight_format` uint8 scalar 0 (row-major);
plus `bias` where the linear has one. config.json's `quantization_config` is what transformers'
BitsAndBytesConfig.to_dict() writes; one config covers the whole model (the 4-bit block size lives
in each module's quant_state, transformers has no key for it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.backends.bnb import (Bnb4bitConfig, BnbFP4Config, BnbInt8Config, BnbNF4Config, import_bitsandbytes,
                                   linear8bit, portable_state_dict, prequantized_linear4bit)
from quantkit.dtypes import DTYPES, dtype_name, parse_dtype, short_name
from quantkit.backends.registry import distinct_configs
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantFormat, finite_problems, raise_first

QUANT_STATE = "weight.quant_state.bitsandbytes__"  # the 4-bit module's marker tensor: ...bitsandbytes__nf4
INT8_KEYS = ("weight", "SCB", "weight_format")  # what transformers' Bnb8bitDeserialize reads
CONFIG_4BIT = {"nf4": BnbNF4Config, "fp4": BnbFP4Config}


def _bnb_config_dict(load_in_4bit: bool, skip: list[str], threshold: float = 6.0, quant_type: str = "fp4",
                     double_quant: bool = False, compute_dtype: str = "float32") -> dict[str, Any]:
    """BitsAndBytesConfig(...).to_dict() of transformers 5, key for key (its private flags included)."""
    return {"quant_method": "bitsandbytes", "_load_in_8bit": not load_in_4bit, "_load_in_4bit": load_in_4bit,
            "llm_int8_threshold": float(threshold), "llm_int8_skip_modules": skip,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": load_in_4bit, "load_in_8bit": not load_in_4bit}


class BnbFormat(QuantFormat):
    name = "bnb"

    def refuses_config(self, config: Any) -> str | None:
        if isinstance(config, (BnbInt8Config, Bnb4bitConfig)):
            return None
        return f"cannot hold method {config.method}: it holds bitsandbytes modules (bnb-int8, bnb-nf4, bnb-fp4)"

    def refuses_configs(self, configs: list[Any]) -> str | None:
        reason = super().refuses_configs(configs)
        distinct = distinct_configs(configs)
        if reason is None and len(distinct) > 1:
            return (f"transformers takes one bitsandbytes config per model, got {len(distinct)} "
                    f"({'; '.join(c.describe() for c in distinct)}): quantize every module with the same bnb config")
        return reason

    def _one_config(self, configs: dict[str, Any]):
        """The single bitsandbytes config every quantized module shares."""
        distinct = distinct_configs(configs.values())
        if not distinct:
            raise QuantkitError("bnb format: nothing was quantized, so there is no bitsandbytes config to write")
        reason = self.refuses_configs(distinct)
        if reason is not None:
            raise QuantkitError(f"bnb format: {reason}")
        return distinct[0]

    def refuses_module(self, module: nn.Module) -> str | None:
        bnb = import_bitsandbytes()

        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            return None
        return (f"{type(module).__name__} is not a bitsandbytes module: the bnb format holds bitsandbytes "
                f"modules (bnb-int8, bnb-nf4, bnb-fp4); export it to its own method's format")

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        reason = self.refuses_module(module)
        if reason is not None:
            raise QuantkitError(f"{name}: {reason}")
        return {f"{name}.{k}": v for k, v in portable_state_dict(module).items()}

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        config = self._one_config(configs)
        skip = list(dict.fromkeys([*ignored, "lm_head"]))
        if isinstance(config, BnbInt8Config):
            return _bnb_config_dict(False, skip, threshold=config.threshold)
        return _bnb_config_dict(True, skip, quant_type=config.quant_type, double_quant=config.double_quant,
                                compute_dtype=dtype_name(parse_dtype(config.compute_dtype)))

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "bitsandbytes"

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        modules = {t.partition("." + QUANT_STATE)[0] for t in tensor_names if "." + QUANT_STATE in t}
        return modules | {t.removesuffix(".SCB") for t in tensor_names if t.endswith(".SCB")}

    def load_module(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                    dtype: torch.dtype) -> nn.Module:
        is_4bit = any(k.startswith(QUANT_STATE) for k in tensors)
        load_in_4bit = quantization_config.get("load_in_4bit")
        if is_4bit != bool(load_in_4bit):
            raise QuantkitError(f"{name}: its tensors are {'4' if is_4bit else '8'}-bit but quantization_config says "
                                f"load_in_4bit={load_in_4bit}: the checkpoint is inconsistent")
        raise_first(_stat_problems(name, tensors))
        tensors = dict(tensors)
        if "bias" in tensors:
            tensors["bias"] = tensors["bias"].to(dtype)
        load = _load_4bit if is_4bit else _load_int8
        return load(name, tensors, quantization_config).eval()  # inference: Linear8bitLt computes differently in train

    def check_module_tensors(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                             shape: tuple[int, int]) -> list[str]:
        """The default load check (bitsandbytes reads the tensors), then every statistic's values."""
        problems = super().check_module_tensors(name, tensors, quantization_config, shape)
        if problems:
            return problems
        expected = {"weight": ((shape[0] * shape[1] + 1) // 2, 1)} if any(k.startswith(QUANT_STATE) for k in tensors) \
            else {"weight": tuple(shape), "SCB": (shape[0],)}
        return [f"{name}.{key}: stored as {list(tensors[key].shape)}, but config.json implies {list(want)}: "
                f"re-export the model" for key, want in expected.items() if tuple(tensors[key].shape) != want]

    def config_of(self, name: str, module: nn.Module, quantization_config: dict[str, Any]) -> Any:
        """The bnb config of a loaded module: 4-bit settings from its quant_state, int8's threshold from the config."""
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is None:
            return BnbInt8Config(float(quantization_config.get("llm_int8_threshold", 6.0)))
        compute = quantization_config.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default when unset
        # After a CPU forward bitsandbytes may have repacked the weight and dequantized a nested absmax
        # (quant_state.nested turns False): the portable tensors say how it was quantized.
        nested = "weight.nested_absmax" in portable_state_dict(module)
        return CONFIG_4BIT[quant_state.quant_type](double_quant=nested, blocksize=quant_state.blocksize,
                                                   compute_dtype=short_name(compute))


# statistic -> (what it is, whether it is non-negative): absmax 0 is an all-zero block; the maps are signed
STATS = {"weight.absmax": ("block absmax", True), "weight.nested_absmax": ("block absmax", True),
         "SCB": ("row absmax", True), "weight.quant_map": ("quantization map values", False),
         "weight.nested_quant_map": ("quantization map values", False)}


def _stat_problems(name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every floating-point statistic finite and of its sign (double quant's absmax is uint8: any value)."""
    problems = []
    for key, (what, non_negative) in STATS.items():
        if key in tensors and tensors[key].is_floating_point():
            problems += finite_problems(name, key, tensors[key], what, non_negative)
    return problems


def _load_4bit(name: str, tensors: dict[str, torch.Tensor], qc: dict[str, Any]) -> nn.Module:
    required = ["weight", "weight.absmax", "weight.quant_map"]
    if tensors.get("weight.absmax", torch.empty(0)).dtype == torch.uint8:  # double quant: absmax is quantized too
        required += ["weight.nested_absmax", "weight.nested_quant_map"]
    missing = [k for k in required if k not in tensors]
    if missing:
        raise QuantkitError(f"{name}: the 4-bit module lacks {', '.join(missing)}: the checkpoint is incomplete")
    compute = qc.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default when unset
    if compute not in DTYPES:
        raise QuantkitError(f"{name}: bnb_4bit_compute_dtype {compute!r} is not one of {', '.join(DTYPES)}: "
                            f"fix config.json")
    return prequantized_linear4bit(tensors, DTYPES[compute])


def _load_int8(name: str, tensors: dict[str, torch.Tensor], qc: dict[str, Any]) -> nn.Module:
    missing = [k for k in INT8_KEYS if k not in tensors]
    if missing:
        raise QuantkitError(f"{name}: the int8 module lacks {', '.join(missing)}: the checkpoint is incomplete")
    if int(tensors["weight_format"]) != 0:
        raise QuantkitError(f"{name}: weight_format {int(tensors['weight_format'])} is not 0 (row-major), the only "
                            f"layout bitsandbytes reads: re-export it with bitsandbytes >= 0.45")
    threshold = float(qc.get("llm_int8_threshold", 6.0))
    return linear8bit(tensors["weight"], tensors.get("bias"), threshold, scb=tensors["SCB"])
