"""Where a quantize run's seconds go, by phase (read, forward, statistics, transform, quantize, write), for the
summary and the progress bar. On CUDA a phase ends with a synchronize, so its seconds are the device's too."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseTimes:
    """Seconds per phase, added up over a run: `with times("forward"): ...`."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def merge(self, other: "PhaseTimes") -> "PhaseTimes":
        for phase, seconds in other.seconds.items():
            self.seconds[phase] += seconds
        return self

    def rounded(self) -> dict[str, float]:
        """Phase -> seconds (3 decimals), largest first."""
        return {p: round(s, 3) for p, s in sorted(self.seconds.items(), key=lambda item: -item[1])}
