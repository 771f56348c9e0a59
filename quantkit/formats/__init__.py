"""On-disk quantized formats: compressed-tensors (pack-quantized), GPTQ (AutoGPTQ v1), bitsandbytes."""

from __future__ import annotations

import importlib
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantFormat

# name -> "module:class"; imported on first use so that e.g. bitsandbytes loads only when needed.
FORMAT_CLASSES = {
    "compressed-tensors": "quantkit.formats.compressed_tensors:CompressedTensorsFormat",
    "gptq": "quantkit.formats.autogptq:GPTQFormat",
    "bnb": "quantkit.formats.bnb:BnbFormat",
}


def _load_class(name: str) -> type[QuantFormat]:
    module, _, cls = FORMAT_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_format(name: str) -> QuantFormat:
    if name not in FORMAT_CLASSES:
        raise QuantkitError(f"unknown format {name!r}: use one of {', '.join(FORMAT_CLASSES)}")
    return _load_class(name)()


def format_for(quantization_config: dict[str, Any]) -> QuantFormat:
    """The format whose `matches` accepts a config.json quantization_config."""
    for name in FORMAT_CLASSES:
        cls = _load_class(name)
        if cls.matches(quantization_config):
            return cls()
    method = quantization_config.get("quant_method")
    raise QuantkitError(f"quantization_config with quant_method={method!r} is not a format quantkit reads: "
                        f"known formats are {', '.join(FORMAT_CLASSES)}")


__all__ = ["FORMAT_CLASSES", "QuantFormat", "format_for", "get_format"]
