"""The quantized-module record: what every quantized linear carries, made by a handler or loaded from disk.

`module.quant_record` holds the config it was quantized with, and its relative error with the kind
of error measured: "output", ||(W - Q) X|| / ||W X|| on the calibration inputs (GPTQ), or "weight",
||W - Q|| / ||W||. Exporters read the config to write a format's quantization_config, the pipeline
and `quantkit eval` read the error, so a model loaded from a quantized directory re-exports and
re-evaluates like a freshly quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

BITS_PER_WEIGHT = ("bits/weight: stored bits of the decoder linears (weights, scales, zero points, group maps, "
                   "biases; quantized and full-precision linears alike) per weight")


def bits_per_weight(stored_bytes: int, weights: int) -> float | None:
    """The one definition of bits per weight (quantize's summary, plan, every report; BITS_PER_WEIGHT says it):
    8 x the stored bytes of the decoder linears (the seven of every layer, quantized or kept in full precision;
    weights, scales, zero points, group maps, biases) over their weight count. None without weights."""
    return 8 * stored_bytes / weights if weights else None


@dataclass
class QuantRecord:
    config: Any  # the backend's QuantConfig
    error: float | None = None  # relative error of the kind below; None where it cannot be measured
    error_kind: str | None = None  # "output" | "weight"
    dead_inputs: int | None = None  # input channels zero on every calibration token (GPTQ); None: not calibrated

    @property
    def method(self) -> str:
        return self.config.method


def record_of(module: nn.Module) -> QuantRecord | None:
    """The record of a quantized module; None for anything else (nn.Linear, norms, ...)."""
    return getattr(module, "quant_record", None)


ERRORS_FILE = "quantkit_errors.json"  # in a quantized directory: per linear name, method, relative_error, kind


@dataclass
class LinearReport:
    """One row of quantkit_errors.json and of the quantize summary's errors."""

    name: str
    method: str
    relative_error: float | None
    kind: str | None  # "output" | "weight", as QuantRecord.error_kind
    dead_inputs: int | None = None  # as QuantRecord.dead_inputs; absent from errors files before quantkit wrote it


def linear_reports(named_modules) -> list[LinearReport]:
    """Rows for (name, quantized module) pairs, e.g. `linear_reports(quantized_modules(layer, prefix))`."""
    return [LinearReport(name, r.method, r.error, r.error_kind, r.dead_inputs) for name, m in named_modules
            if (r := record_of(m)) is not None]
