"""The interface every on-disk quantized format implements, and the format registry.

A format turns quantized runtime modules into named tensors plus the `quantization_config` that
goes into config.json (export), and turns such tensors back into runtime modules (load). Tensor
names are full Hugging Face names (`model.layers.0.self_attn.q_proj.weight_packed`); the module
name is everything before the last dot-separated tensor suffix the format owns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.errors import QuantkitError


class QuantFormat:
    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]  # backend names whose modules this format can write

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of one quantized linear, keyed by full tensor name (name + '.' + suffix)."""
        raise NotImplementedError

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config`.

        configs: module name -> the QuantConfig it was quantized with (every quantized linear);
        ignored: names of the linears left in full precision (always including lm_head).
        """
        raise NotImplementedError

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        """Whether a config.json quantization_config is in this format."""
        raise NotImplementedError

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        """Names of the modules stored quantized, from the checkpoint's tensor names."""
        raise NotImplementedError

    def load_module(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                    dtype: torch.dtype) -> nn.Module:
        """A runtime module from one module's tensors (keys relative: 'weight_packed', 'qweight', ...)."""
        raise NotImplementedError


def format_for_config(quantization_config: dict[str, Any], formats: dict[str, type[QuantFormat]]) -> QuantFormat:
    for cls in formats.values():
        if cls.matches(quantization_config):
            return cls()
    method = quantization_config.get("quant_method")
    raise QuantkitError(f"quantization_config with quant_method={method!r} is not a format quantkit reads: "
                        f"known formats are {', '.join(formats)}")
