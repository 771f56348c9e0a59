"""Autoregressive generation: greedy or nucleus sampling, with the preallocated KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.dtypes import overflow_hint, short_name
from quantkit.errors import QuantkitError
from quantkit.model.llama import LlamaForCausalLM
from quantkit.model.tokenizer import pad_left


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise QuantkitError(f"max_new_tokens={self.max_new_tokens}: must be 0 or more")
        if self.temperature < 0:
            raise QuantkitError(f"temperature={self.temperature}: must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise QuantkitError(f"top_p={self.top_p}: must be in (0, 1]")


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        # Nucleus: keep the smallest set of tokens whose mass reaches top_p (Holtzman et al. 2019).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompts: list[list[int]], sampling: SamplingConfig, eos_id: int | None = None,
             pad_id: int = 0, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of ids); returns the new ids per prompt, cut after EOS.

    Prompts of different lengths are left-padded and masked. `on_token` gets each step's tokens (B,).
    """
    ids, mask = pad_left(prompts, pad_id)
    check_prompt_ids(ids, model.config.vocab_size)
    device = model.lm_head.weight.device
    ids, mask = ids.to(device), mask.to(device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    B = ids.shape[0]
    cache = model.new_cache(B, ids.shape[1] + sampling.max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    step_ids, step_mask = ids, mask
    for _ in range(sampling.max_new_tokens):
        logits = model(step_ids, step_mask, cache)[:, -1]  # (B, vocab)
        check_step_logits(model, logits, len(out))
        token = sample_next(logits, sampling, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                break
        if use_cache:  # only the new token goes through the model; the cache holds the rest
            step_ids, step_mask = token[:, None], torch.ones(B, 1, dtype=mask.dtype, device=device)
        else:
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step_ids, step_mask = ids, mask
    tokens = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    return [_cut_at(row, eos_id) for row in tokens]


def check_step_logits(model: LlamaForCausalLM, logits: torch.Tensor, step: int) -> None:
    """Inf/NaN logits (B, vocab) are an error, never a token: greedy would pick id 0 and sampling would crash."""
    if not bool(torch.isfinite(logits).all()):
        source = getattr(model, "source_dir", None) or "the model"
        raise QuantkitError(f"{source}: non-finite logits at generated token {step} (computing in "
                            f"{short_name(logits.dtype)}): {overflow_hint(logits.dtype)}")


def check_prompt_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Prompt ids (B, T) must have embedding rows: one line, not an IndexError inside the embedding."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise QuantkitError(f"prompt token id {low if low < 0 else high} is outside the model's vocabulary "
                            f"[0, {vocab_size}) (config.json vocab_size): encode prompts with the model's tokenizer")


def _cut_at(row: list[int], eos_id: int | None) -> list[int]:
    return row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row
