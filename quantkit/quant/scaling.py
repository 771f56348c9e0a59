"""Exact rescaling of a layer: input channels of linears multiplied by s, the output channels of the module before
them divided by s, so the float layer computes the same function (to float rounding). Activation-aware methods
(AWQ) choose s so that the scaled weights quantize better; which module precedes which is quantkit.model.layout's
SCALING_PAIRS."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError


@torch.no_grad()
def fold_scales(preceding: nn.Module, followers: list[nn.Linear], s: torch.Tensor, name: str = "layer"):
    """followers' weights (N, K) times s (K,) along K; preceding's output channels (an RMSNorm's weight, or a
    linear's rows and bias) divided by s. QuantkitError where the shapes do not pair (GQA's v_proj -> o_proj), or s
    is not finite and positive."""
    if not (bool(torch.isfinite(s).all()) and bool((s > 0).all())):
        raise QuantkitError(f"{name}: scales must be finite and positive")
    outputs = preceding.weight.shape[0]
    for linear in followers:
        if linear.in_features != s.numel() or outputs != s.numel():
            raise QuantkitError(f"{name}: {s.numel()} scales for a module of {outputs} output channels and a linear "
                                f"of {linear.in_features} inputs: they must all agree")
    for linear in followers:
        linear.weight.mul_(s.to(linear.weight.dtype))
    w = preceding.weight
    if w.dim() == 1:  # a norm's per-channel weight
        w.div_(s.to(w.dtype))
    else:  # a linear's output rows
        w.div_(s.to(w.dtype)[:, None])
        if getattr(preceding, "bias", None) is not None:
            preceding.bias.div_(s.to(preceding.bias.dtype))
