"""Perplexity: exp(mean NLL of the scored tokens), with its standard error.

Windows come from eval/data.py: the GPTQ/AWQ protocol (one BOS, non-overlapping windows: what the
Llama 2 quantization papers report for WikiText-2 at seq_len 2048) or the sliding-window one.
The standard error is llama.cpp's: that of the mean NLL, carried to the perplexity by the delta
method (d exp(x) = exp(x) dx).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

import quantkit.dist as dist
from quantkit.calibrate.sources import SEQ_LEN
from quantkit.eval.data import EvalData, text_data
from quantkit.eval.finite import check_numbers, model_label
from quantkit.eval.runner import target_logprobs, window_logprobs

MAX_EXP = math.log(1.7e308)  # math.exp overflows above ~709.78


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float  # mean NLL per scored token, nats
    nll_stderr: float
    n_tokens: int  # scored (predicted) tokens
    n_windows: int
    seq_len: int
    stride: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> dict:
        """The report schema's perplexity object."""
        return {"ppl": self.ppl, "ppl_stderr": self.ppl_stderr, "nll": self.nll, "nll_stderr": self.nll_stderr,
                "n_tokens": self.n_tokens}


def mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error, sqrt(var / (n - 1)) as llama.cpp computes it."""
    x = x.double()
    mean = x.mean().item()
    if x.numel() < 2:
        return mean, 0.0
    var = (x * x).mean().item() - mean * mean
    return mean, math.sqrt(max(var, 0.0) / (x.numel() - 1))


def perplexity_from_nll(nll: torch.Tensor, data: EvalData) -> PerplexityResult:
    """From per-token NLLs (n_tokens,) of `data`'s scored tokens."""
    mean, stderr = mean_stderr(nll)
    ppl = math.exp(mean) if mean < MAX_EXP else math.inf  # inf (an error for check_numbers), not an OverflowError
    return PerplexityResult(ppl=ppl, ppl_stderr=ppl * stderr, nll=mean, nll_stderr=stderr, n_tokens=nll.numel(),
                            n_windows=len(data.windows), seq_len=data.seq_len, stride=data.stride)


def token_nll(model, data: EvalData, batch_size: int = 1, progress: bool = True,
              label: str | None = None) -> torch.Tensor | None:
    """(n_tokens,) NLL of every scored token, in window order. Under torchrun each rank runs its share of the windows
    (EvalData.shard) and rank 0 gets them all in window order (None on the others)."""
    indices = data.shard()[1]

    def run():
        return list(zip(indices, [-target_logprobs(lp, data.targets(w)) for w, lp in
                                  window_logprobs(model, data, batch_size, progress, "perplexity", label, shard=True)]))

    nll = dist.gather_ordered(dist.collective(run))
    return torch.cat(nll) if nll is not None else None


def perplexity_of(model, data: EvalData, batch_size: int = 1, progress: bool = True,
                  label: str | None = None) -> PerplexityResult:
    """Perplexity of `model` on `data`; a QuantkitError naming `label` (or the model) if anything is not finite.
    Under torchrun: rank 0's result, None on the other ranks."""
    nll = token_nll(model, data, batch_size, progress, label)
    if nll is None:
        return None
    result = perplexity_from_nll(nll, data)
    check_numbers(result.report(), label or model_label(model), "perplexity")
    return result


def perplexity(model, tokenizer, text: str, seq_len: int = SEQ_LEN, batch_size: int = 1, progress: bool = True,
               stride: int | None = None) -> PerplexityResult:
    """Perplexity of `model` on `text` (a string): non-overlapping windows, or sliding with `stride`."""
    return perplexity_of(model, text_data(tokenizer, text, seq_len, stride, vocab_size=model.config.vocab_size), batch_size, progress)
