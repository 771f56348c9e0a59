"""Layer 3, on-disk quantized formats and their registry: compressed-tensors (pack-quantized), GPTQ (v1 and v2),
bitsandbytes, GGUF (one file, llama.cpp's), and third-party formats; `base` (what a format is), `reader` (a quantized directory as a model:
`quantkit.load`), `verify`. Imports layers 0-2 and the backends beside it at rank 3; never a run, eval or the CLI.

A third-party package adds a format through the entry-point group `quantkit.formats`: the entry point's
name is the format's name (`--format NAME`) and its object a QuantFormat subclass, e.g.
`[project.entry-points."quantkit.formats"] my-format = "my_pkg.fmt:MyFormat"`. Classes are imported on
first use, so that e.g. bitsandbytes loads only when its format is needed.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantFormat

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "quantkit.formats"
BUILT_IN = {  # name -> "module:class"
    "compressed-tensors": "quantkit.formats.compressed_tensors:CompressedTensorsFormat",
    "gptq": "quantkit.formats.autogptq:GPTQFormat",
    "bnb": "quantkit.formats.bnb:BnbFormat",
    "gguf": "quantkit.formats.gguf:GGUFFormat",
}


def _targets() -> dict[str, str]:
    """Every format name -> "module:class": the built-in ones, then the plugins' (which may not shadow them)."""
    targets = dict(BUILT_IN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILT_IN:
            log.warning("quantkit format plugin %s (%s) ignored: %s is a built-in format", ep.name, ep.value, ep.name)
            continue
        targets[ep.name] = ep.value
    return targets


def format_names() -> list[str]:
    """The names `--format` accepts."""
    return list(_targets())


def _load_class(name: str, target: str) -> type[QuantFormat]:
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise QuantkitError(f"format {name} ({target}) failed to load: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, QuantFormat)):
        raise QuantkitError(f"format {name} ({target}) is not a quantkit.formats.base.QuantFormat subclass")
    return cls


def get_format(name: str) -> QuantFormat:
    targets = _targets()
    if name not in targets:
        raise QuantkitError(f"unknown format {name!r}: use one of {', '.join(targets)}")
    return _load_class(name, targets[name])()


def format_for(quantization_config: dict[str, Any]) -> QuantFormat:
    """The format whose `matches` accepts a config.json quantization_config."""
    targets = _targets()
    for name, target in targets.items():
        cls = _load_class(name, target)
        if cls.matches(quantization_config):
            return cls()
    method = quantization_config.get("quant_method")
    raise QuantkitError(f"quantization_config with quant_method={method!r} is not a format quantkit reads: "
                        f"known formats are {', '.join(targets)}")


__all__ = ["BUILT_IN", "ENTRY_POINT_GROUP", "QuantFormat", "format_for", "format_names", "get_format"]
