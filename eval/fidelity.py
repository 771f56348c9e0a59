"""Logit fidelity against a base model, with llama.cpp's `perplexity --kl-divergence` definitions.

Per scored token t, with p the base's and q the evaluated model's next-token distributions:
  KL(p||q) = sum_v p_v (ln p_v - ln q_v)                    nats
  same top-1: argmax p == argmax q;  top-5 overlap: |top5(p) & top5(q)| / 5
  delta-p = q(correct) - p(correct)                         probabilities, not log
  NLLs -ln p(correct), -ln q(correct): their Pearson correlation, and ln(PPL(q)/PPL(base)) = mean(NLL_q - NLL_p)
Standard errors are llama.cpp's: sqrt(var / (n - 1)) for means, sqrt(f (1 - f) / (n - 1)) for the
top-1 fraction, and 0.5 * stderr(dp^2) / RMS for the RMS of delta-p (delta method).

The base is either its full log-probs (both models in memory) or `TopK`, the compressed form saved in
base-logits files: the k most likely tokens' log-probs and the remaining mass in one bucket. The KL
of the bucketed distributions is a lower bound of the true KL (the log-sum inequality: merging tokens
can only lose divergence); top-1, top-5, delta-p and the NLLs are exact for k >= 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from quantkit.eval.perplexity import mean_stderr

KL_PERCENTILES = {"p99_9": 99.9, "p99": 99.0, "p90": 90.0, "median": 50.0, "p10": 10.0, "p5": 5.0, "p1": 1.0}
DP_PERCENTILES = {"p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "p75": 75.0, "median": 50.0, "p25": 25.0,
                  "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0_1": 0.1}
KL_HISTOGRAM_EDGES = np.logspace(-9, 2, 45)  # 4 bins a decade; KL below 1e-9 nats lands in the first


@dataclass
class TopK:
    """A base model's log-probs of n scored tokens, compressed to the k most likely and the rest's mass."""

    logprobs: torch.Tensor  # (n, k) fp32, descending
    ids: torch.Tensor  # (n, k) int64
    rest_logmass: torch.Tensor  # (n,) ln(1 - sum of the top k probabilities), -inf when nothing is left
    target_logprob: torch.Tensor  # (n,) ln p(correct token), exact

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def compress(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> TopK:
    """TopK of full log-probs (n, vocab)."""
    top, ids = logprobs.topk(k, dim=-1)
    return TopK(top, ids, _rest_logmass(logprobs, ids), logprobs.gather(-1, targets[:, None]).squeeze(-1))


def _rest_logmass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n,) ln of the probability outside `ids`: a logsumexp over the other tokens, accurate however small."""
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def kl_divergence(base: torch.Tensor | TopK, logprobs: torch.Tensor) -> torch.Tensor:
    """(n,) KL(base || model) in nats; bucketed (a lower bound) when the base is a TopK.

    Renormalised and summed in float64: fp32 log-probs near ln(vocab) are normalised only to ~1e-7
    nats, and in fp32 the vocabulary-wide sum of near-cancelling terms is off by as much, the size of
    an fp16 noise floor on a small model (measured: tests/test_cli_eval.py, test_saved_base_logits_round_trip).
    """
    logprobs = torch.log_softmax(logprobs.double(), -1)
    if isinstance(base, torch.Tensor):
        base = torch.log_softmax(base.double(), -1)
        return (base.exp() * (base - logprobs)).sum(-1).clamp(min=0)
    top, rest_mass = base.logprobs.double(), base.rest_logmass.double()
    norm = torch.logsumexp(torch.cat([top, rest_mass[:, None]], -1), -1)  # (n,): 0 up to fp32 rounding
    top, rest_mass = top - norm[:, None], rest_mass - norm
    head = (top.exp() * (top - logprobs.gather(-1, base.ids))).sum(-1)
    rest = rest_mass.exp() * (rest_mass - _rest_logmass(logprobs, base.ids))
    return (head + torch.nan_to_num(rest, nan=0.0)).clamp(min=0)  # nan: 0 * (-inf - x) when no mass is left


def _top_ids(base: torch.Tensor | TopK, k: int) -> torch.Tensor:
    return base.ids[:, :k] if isinstance(base, TopK) else base.topk(k, dim=-1).indices


def _target_logprob(base: torch.Tensor | TopK, targets: torch.Tensor) -> torch.Tensor:
    return base.target_logprob if isinstance(base, TopK) else base.gather(-1, targets[:, None]).squeeze(-1)


def compare_tokens(base: torch.Tensor | TopK, logprobs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token measures (each (n,)) of a window: base log-probs (or TopK) vs the model's log-probs (n, vocab)."""
    base_top5, top5 = _top_ids(base, 5), logprobs.topk(5, dim=-1).indices
    base_lp, lp = _target_logprob(base, targets), logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return {"kl": kl_divergence(base, logprobs),
            "same_top1": (base_top5[:, 0] == top5[:, 0]).float(),
            "top5_overlap": (base_top5[:, :, None] == top5[:, None, :]).any(-1).float().mean(-1),
            "delta_p": lp.exp() - base_lp.exp(),
            "base_nll": -base_lp, "nll": -lp}


class FidelityAccumulator:
    """Collects per-token measures window by window; `summary()` gives the report's fidelity object."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, tokens: dict[str, torch.Tensor]) -> None:
        for key, value in tokens.items():
            self.parts.setdefault(key, []).append(value.double())

    def tokens(self) -> dict[str, torch.Tensor]:
        return {key: torch.cat(values) for key, values in self.parts.items()}

    def summary(self, source: str, top_k: int | None = None) -> dict:
        t = self.tokens()
        n = t["kl"].numel()
        same = t["same_top1"].mean().item()
        ln_ratio, ln_ratio_stderr = mean_stderr(t["nll"] - t["base_nll"])
        return {"source": source, "top_k": top_k,
                "kl": distribution(t["kl"], KL_PERCENTILES),
                "top1": {"agreement": same, "stderr": math.sqrt(same * (1 - same) / max(n - 1, 1))},
                "top5_overlap": t["top5_overlap"].mean().item(),
                "delta_p": {**distribution(t["delta_p"], DP_PERCENTILES), **rms(t["delta_p"])},
                "nll_correlation": pearson(t["base_nll"], t["nll"]),
                "ln_ppl_ratio": {"value": ln_ratio, "stderr": ln_ratio_stderr},
                "kl_histogram": histogram(t["kl"])}


def distribution(x: torch.Tensor, percentiles: dict[str, float]) -> dict[str, float]:
    mean, stderr = mean_stderr(x)
    values = np.percentile(x.numpy(), list(percentiles.values()))
    return {"mean": mean, "stderr": stderr, "max": x.max().item(),
            **{key: float(v) for key, v in zip(percentiles, values)}, "min": x.min().item()}


def rms(x: torch.Tensor) -> dict[str, float]:
    mean_sq, mean_sq_stderr = mean_stderr(x * x)
    value = math.sqrt(mean_sq)
    return {"rms": value, "rms_stderr": 0.5 * mean_sq_stderr / value if value > 0 else 0.0}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    if denominator == 0:
        return 1.0  # constant NLLs: identical models
    return max(-1.0, min(1.0, (x @ y).item() / denominator))  # rounding can step past +-1


def histogram(kl: torch.Tensor) -> dict:
    clamped = np.clip(kl.numpy(), KL_HISTOGRAM_EDGES[0], KL_HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(clamped, bins=KL_HISTOGRAM_EDGES)
    return {"edges": [float(e) for e in KL_HISTOGRAM_EDGES], "counts": [int(c) for c in counts]}
