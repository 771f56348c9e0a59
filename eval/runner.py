"""Running a model over evaluation windows: fp32 log-probabilities of the scored positions, window by window."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from quantkit.eval.data import EvalData, Window


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_logits(model, ids: torch.Tensor, windows: list[Window]) -> list[torch.Tensor]:
    """Per window, fp32 logits (n_scored, vocab) of the positions that predict its scored targets."""
    logits = model(ids.to(model_device(model)))  # (B, T, vocab)
    # position t predicts token t + 1: targets [score_from, end) come from positions [score_from - 1, end - 1)
    return [row[w.score_from - 1 - w.start: w.end - 1 - w.start].float().cpu() for row, w in zip(logits, windows)]


def batch_logprobs(model, ids: torch.Tensor, windows: list[Window]) -> list[torch.Tensor]:
    """Per window, fp32 log-probs (n_scored, vocab) of the scored positions."""
    return [torch.log_softmax(x, dim=-1) for x in batch_logits(model, ids, windows)]


def window_logprobs(model, data: EvalData, batch_size: int = 1, progress: bool = True,
                    desc: str = "eval") -> Iterator[tuple[Window, torch.Tensor]]:
    """(window, log-probs (n_scored, vocab)) for every window of `data`, in order."""
    bar = tqdm(total=len(data.windows), desc=desc, unit="window", disable=not progress)
    for ids, windows in data.batches(batch_size):
        yield from zip(windows, batch_logprobs(model, ids, windows))
        bar.update(len(windows))
    bar.close()


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) log-probability of each target token."""
    return logprobs.gather(-1, targets[:, None]).squeeze(-1)
