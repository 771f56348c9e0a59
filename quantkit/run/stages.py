"""The decoder layer's forward split at the true-sequential group boundaries: each stage is computed once over the
calibration set and again only when a quantized group changes it.

  group       its linears' input                                   kept
  q/k/v       input_layernorm(x)                                   no (one norm: cheap)
  o           y = attention of the q/k/v of input_layernorm(x)     yes, until q/k/v change
  gate/up     post_attention_layernorm(h), h = x + o_proj(y)       h, until q/k/v or o change
  down        act(gate(m)) * up(m), m = post_attention_layernorm(h) yes where memory allows (keep_down), until
                                                                   gate/up change
  advance     h + down(...): the next layer's inputs, from the kept down inputs (or gate/up once more)

The activations and what is kept stay where x is (the layer's device, or CPU memory with --offload-activations: 70B's
128 x 2048 x 8192 fp32 activations are 8.6 GB a copy, and three are kept); each batch moves to the layer's device when
it is used, and what is kept moves back.

A layer so costs one attention and one MLP of forward passes (about two MLPs where down_proj's inputs, 2.7x the
activations, are not kept) instead of five full ones (one per group and the advance). The stages are the model's own (LlamaAttention.attend / .output, LlamaMLP.down_input): the same float
operations on the same batches as LlamaDecoderLayer.forward, so every group sees bit for bit the inputs a full
forward pass would give it (tests/run/test_stages.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from quantkit.model.layout import SEQUENTIAL_GROUPS

QKV, O, GATE_UP, DOWN = SEQUENTIAL_GROUPS
# How often the staged forward runs each linear of a layer (q/k/v for o_proj's inputs, o_proj for the residual,
# gate/up for down_proj's inputs (and again in the advance where those are not kept), down_proj in the advance):
# what `quantkit plan` times, for the worst case.
PASSES = {name: 2 if name in GATE_UP else 1 for group in SEQUENTIAL_GROUPS for name in group}


class LayerStages:
    """One decoder layer's stages over the calibration activations x (n, T, hidden), batch by batch.

    `on_nonfinite(i)` is called (and raises) when a stage's values in batch i are not finite. `device`: where the
    layer computes (None: x's device); x and the kept stages stay on x's device."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, batch_size: int, cos: torch.Tensor, sin: torch.Tensor,
                 on_nonfinite: Callable[[int], None], device: torch.device | None = None, keep_down: bool = False):
        """`keep_down`: keep down_proj's inputs (n, T, intermediate) as they stream, for the advance."""
        self.layer, self.cos, self.sin, self.on_nonfinite = layer, cos, sin, on_nonfinite
        self.store, self.device, self.keep_down = x.device, device or x.device, keep_down
        self.x = x.split(batch_size)
        self._y: list[torch.Tensor] | None = None  # o_proj's inputs
        self._h: list[torch.Tensor] | None = None  # the residual stream after self_attn
        self._d: list[torch.Tensor] = []  # down_proj's inputs, when kept

    def inputs(self, group: tuple[str, ...]) -> Iterator[torch.Tensor]:
        """The group's input, batch by batch (the linears of a true-sequential group share it)."""
        if group == QKV:
            return self._checked(self.layer.input_layernorm(self._in(x)) for x in self.x)
        if group == O:
            return map(self._in, self._attention())
        if group == GATE_UP:
            return self._checked(self.layer.post_attention_layernorm(self._in(h)) for h in self._residual())
        if group == DOWN:
            mlp, norm = self.layer.mlp, self.layer.post_attention_layernorm
            self._d = []
            return self._checked(self._kept_down(mlp.down_input(norm(self._in(h)))) for h in self._residual())
        raise ValueError(f"{group}: not a true-sequential group")

    def changed(self, group: tuple[str, ...] | None = None):
        """The group's linears were replaced (None: anything in the layer may have changed): drop what they feed."""
        if group in (None, QKV):
            self._y = None
        if group in (None, QKV, O):
            self._h = None
        if group in (None, QKV, O, GATE_UP):
            self._d = []

    def rescaled(self, group: tuple[str, ...], s: torch.Tensor):
        """The group's inputs were divided by s (K,) by an exact rescaling of the layer (quantkit.quant.scaling: its
        linears' inputs / s, their weights * s): the kept stage that holds them follows without a recompute, equal
        to one to float rounding; nothing else changes (the norms' outputs are computed when read)."""
        if group == O and self._y is not None:
            for y in self._y:
                y.div_(s.to(y))
        elif group == DOWN:
            for d in self._d:
                d.div_(s.to(d))

    def output(self) -> torch.Tensor:
        """The layer's outputs (n, T, hidden): h + mlp(post_attention_layernorm(h)), computed in h's batches."""
        h = self._residual()
        d = self._d if len(self._d) == len(h) else [None] * len(h)  # all of down_proj's inputs kept, or none used
        self._h, self._d = None, []
        finite = [torch.isfinite(self._advance(hb, db)).all() for hb, db in zip(h, d)]
        self._check(finite)
        return torch.cat(h)

    def _advance(self, h: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
        """h + mlp(post_attention_layernorm(h)), into h (kept where it is); from down_proj's kept inputs d if given
        (LlamaMLP.forward is down(down_input(m)): the same values)."""
        hd = self._in(h)
        mlp = self.layer.mlp
        hd.add_(mlp(self.layer.post_attention_layernorm(hd)) if d is None else mlp.down(self._in(d)))
        return h if hd is h else h.copy_(hd)

    def _kept_down(self, d: torch.Tensor) -> torch.Tensor:
        if self.keep_down:
            self._d.append(d.to(self.store))
        return d

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def _attention(self) -> list[torch.Tensor]:
        if self._y is None:
            attn, norm = self.layer.self_attn, self.layer.input_layernorm
            self._y = self._kept(attn.attend(norm(self._in(x)), self.cos, self.sin, None, None) for x in self.x)
        return self._y

    def _residual(self) -> list[torch.Tensor]:
        if self._h is None:
            attn = self.layer.self_attn
            self._h = self._kept(self._in(x) + attn.output(self._in(y)) for x, y in zip(self.x, self._attention()))
            self._y = None  # every group that reads it is quantized by now
        return self._h

    def _kept(self, batches: Iterator[torch.Tensor]) -> list[torch.Tensor]:
        """The batches, checked finite where they were computed, kept on x's device."""
        kept, finite = [], []
        for t in batches:
            finite.append(torch.isfinite(t).all())
            kept.append(t.to(self.store))
        self._check(finite)
        return kept

    def _checked(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The batches, then a check that all were finite (one sync for the pass, not one a batch)."""
        finite = []
        for t in batches:
            finite.append(torch.isfinite(t).all())
            yield t
        self._check(finite)

    def _check(self, finite: list[torch.Tensor]):
        first = first_nonfinite(finite)
        if first is not None:
            self.on_nonfinite(first)


def first_nonfinite(finite: list[torch.Tensor]) -> int | None:
    """The index of the first False among per-batch isfinite(...).all() flags, or None: one sync for the pass."""
    ok = torch.stack(finite)
    return None if ok.all() else int((~ok).nonzero()[0])
