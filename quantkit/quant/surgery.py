"""Module surgery, the one module walker: which linears are targets, which are quantized, swapping them.

By default every linear inside the decoder layers (q/k/v/o, gate/up/down) is a target; the
embedding and lm_head stay in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from quantkit.model.layout import is_decoder_linear
from quantkit.quant.record import record_of


def decoder_linears(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Linear]]:
    """(full name, module) of every plain nn.Linear inside the decoder layers."""
    for name, module in model.named_modules():
        full = prefix + name
        if type(module) is nn.Linear and is_decoder_linear(full):
            yield full, module


def quantized_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) of every quantized module (one with a quant_record) in `model`, in module order."""
    for name, module in model.named_modules():
        if record_of(module) is not None:
            yield prefix + name, module


def set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
