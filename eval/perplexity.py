"""Perplexity with the GPTQ/AWQ protocol: one BOS, non-overlapping windows, exp(mean token NLL).

The text is tokenized whole with a single BOS at the start, cut into windows of seq_len tokens (the
last partial window is dropped), and each window predicts its seq_len - 1 next tokens. This is how
the Llama 2 quantization papers report WikiText-2 perplexity at seq_len 2048.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token, nats
    n_tokens: int  # scored (predicted) tokens: n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """(n_windows, seq_len) ids: BOS + the whole text's tokens, cut without overlap, remainder dropped."""
    if seq_len < 2:
        raise QuantkitError(f"seq_len={seq_len}: a window needs at least 2 tokens")
    ids = tokenizer.encode(text, bos=True)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise QuantkitError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: "
                            f"use more text or a smaller --seq-len")
    return torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    windows = token_windows(tokenizer, text, seq_len)
    device = next(model.parameters()).device
    total_nll = 0.0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(batch)[:, :-1].float()  # (B, T-1, vocab): position t predicts token t+1
        total_nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    n_tokens = windows.shape[0] * (seq_len - 1)
    nll = total_nll / n_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=windows.shape[0],
                            seq_len=seq_len)
