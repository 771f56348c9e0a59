"""Running a model over evaluation windows: fp32 log-probabilities of the scored positions, window by window.

Every window's logits are checked for inf/NaN here, where the message can still name the model and
the window (eval/finite.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

import quantkit.dist as dist
from quantkit.eval.data import EvalData, Window
from quantkit.eval.finite import check_logits, model_label


def model_device(model) -> torch.device:
    """Where the model's inputs go: its parameters' device; the CPU for a model with none (llama.cpp's)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def batch_logits(model, ids: torch.Tensor, windows: list[Window], label: str | None = None,
                 data: EvalData | None = None, cause: str | None = None) -> list[torch.Tensor]:
    """Per window, fp32 logits (n_scored, vocab) of the positions that predict its scored targets.

    Non-finite logits raise a QuantkitError naming `label` (default: the model's directory), the window
    (its index in `data` when given) and the likely `cause` (default: from the compute dtype).
    """
    logits = model(ids.to(model_device(model)))  # (B, T, vocab)
    # position t predicts token t + 1: targets [score_from, end) come from positions [score_from - 1, end - 1)
    out = [row[w.score_from - 1 - w.start: w.end - 1 - w.start].float().cpu() for row, w in zip(logits, windows)]
    for w, x in zip(windows, out):
        check_logits(x, w, label or model_label(model), logits.dtype, data, cause)
    return out


def batch_logprobs(model, ids: torch.Tensor, windows: list[Window], label: str | None = None,
                   data: EvalData | None = None) -> list[torch.Tensor]:
    """Per window, fp32 log-probs (n_scored, vocab) of the scored positions."""
    return [torch.log_softmax(x, dim=-1) for x in batch_logits(model, ids, windows, label, data)]


def window_logprobs(model, data: EvalData, batch_size: int = 1, progress: bool = True, desc: str = "eval",
                    label: str | None = None, shard: bool = False) -> Iterator[tuple[Window, torch.Tensor]]:
    """(window, log-probs (n_scored, vocab)) for every window of `data`, in order; shard: this rank's share only
    under torchrun (EvalData.shard; messages still name a window by its index in `data`)."""
    local = data.shard()[0] if shard else data
    with tqdm(total=len(local.windows), desc=desc, unit="window", disable=not progress or not dist.is_main()) as bar:
        for ids, windows in local.batches(batch_size):
            yield from zip(windows, batch_logprobs(model, ids, windows, label, data))
            bar.update(len(windows))


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) log-probability of each target token."""
    return logprobs.gather(-1, targets[:, None]).squeeze(-1)
