"""Observers: the statistics a calibrated backend collects from a linear's inputs during calibration.

The layer calibrator (quantkit/run/calibrator.py) makes one observer per target linear of a sequential
group, feeds it that linear's input activations x (..., K) on every calibration forward pass, and
passes `observer.handler_kwargs()` to the backend's handler. Observers accumulate; they never hold
all of X (70B's down_proj sees 128 x 2048 tokens of 28672 features). A backend's own statistic lives beside
it (GPTQ's Hessian: quantkit/backends/gptq).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn



class Observer(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of the linear's inputs, (..., K)."""

    def merge(self, other: "Observer") -> "Observer":
        """Add the statistics of another observer of the same linear (other samples) to this one; returns self.
        Statistics add up, to float rounding (torchrun's ranks instead feed one observer rank after rank, for one
        process's sums bit for bit: quantkit/run/calibrator.py `chained`)."""

    def handler_kwargs(self) -> dict:
        """What the backend's handler receives as keyword arguments (handlers must not change them in place)."""

    # Under torchrun an observer is pickled from rank to rank, its tensor attributes moved to the receiving rank's
    # device (quantkit/run/calibrator.py `relocate`): keep its state in plain attributes.
    # Optional class attribute `shared_by_inputs = True`: the statistics depend on the inputs alone (not the linear's
    # weight or config), so linears that read the same input share one observer (quantkit/run/calibrator.py).


class ChannelMagnitudeObserver:
    """Mean |x| per input channel (K,) in fp32: the activation statistic of AWQ (Lin et al. 2023,
    arXiv:2306.00978, `get_act_scale`) and SmoothQuant's per-channel scales use the max instead."""

    shared_by_inputs = True

    def __init__(self, in_features: int, device=None):
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    @classmethod
    def for_linear(cls, linear: nn.Linear, config) -> "ChannelMagnitudeObserver":
        return cls(linear.in_features, linear.weight.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (tokens, K)
        self.total += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    def merge(self, other: "ChannelMagnitudeObserver") -> "ChannelMagnitudeObserver":
        self.total += other.total
        self.n += other.n
        return self

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.total / max(self.n, 1)).float()

    def handler_kwargs(self) -> dict:
        return {"channel_magnitude": self.mean_abs}
