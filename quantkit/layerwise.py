"""Calibrated quantization, one decoder layer at a time (the orchestration around quantkit/gptq.py).

The calibration tokens are embedded once; then for each decoder layer, in order:
  for each sub-group (true-sequential: q/k/v -> o -> gate/up -> down, as GPTQ's llama.py):
      run the layer on the current inputs with hooks accumulating each target linear's Hessian,
      quantize the sub-group (later sub-groups thus see the already-quantized earlier ones);
  recompute the layer's outputs with the quantized layer: they are the next layer's inputs.
So layer i is calibrated on the outputs of the already-quantized layers before it. Only one layer's
weights, the activations (n, T, hidden) and one sub-group's Hessians are in memory at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantkit.backends import BACKENDS, Recipe, replace_linear
from quantkit.gptq_solver import HessianAccumulator
from quantkit.model.checkpoint import check_device
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import SEQUENTIAL_GROUPS, layer_prefix
from quantkit.model.llama import rotary_embedding

log = logging.getLogger(__name__)



@dataclass
class LinearReport:
    name: str
    method: str
    relative_error: float | None
    kind: str  # "output": ||(W - Q) X|| / ||W X|| on the calibration inputs (GPTQ); "weight": ||W - Q|| / ||W||


def linear_reports(module: nn.Module, prefix: str = "") -> list[LinearReport]:
    """The error replace_linear recorded on each quantized linear inside `module`."""
    return [LinearReport(prefix + name, m.quant_config.method, m.quant_error, m.quant_error_kind)
            for name, m in module.named_modules() if hasattr(m, "quant_config")]


class LayerCalibrator:
    """Holds the calibration activations (n, T, hidden) and walks them through the layers as they are quantized."""

    def __init__(self, config: LlamaConfig, tokens: torch.Tensor, embed_weight: torch.Tensor, recipe: Recipe,
                 batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True):
        self.recipe, self.batch_size, self.device, self.progress = recipe, batch_size, check_device(device), progress
        self.hidden = F.embedding(tokens.to(self.device), embed_weight.to(self.device))  # (n, T, hidden)
        positions = torch.arange(tokens.shape[1], device=self.device)[None]
        self.cos, self.sin = rotary_embedding(config, positions, self.hidden.dtype)  # (1, 1, T, D)
        self.true_sequential = all(getattr(c, "true_sequential", True) for c in recipe.configs())
        self.reports: list[LinearReport] = []

    @torch.no_grad()
    def _run(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat([layer(x, self.cos, self.sin) for x in self.hidden.split(self.batch_size)])

    def step(self, layer: nn.Module, prefix: str) -> nn.Module:
        """Quantize one decoder layer in place on the current activations, then advance them through it."""
        layer.to(self.device)
        # Hessians come from forward hooks on the linears, which pretraining_tp's slicing bypasses: calibrate at tp=1.
        tp = layer.self_attn.pretraining_tp
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = 1
        groups = SEQUENTIAL_GROUPS if self.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
        for names in tqdm(groups, desc=prefix.rstrip("."), leave=False, disable=not self.progress):
            self._quantize_group(layer, prefix, names)
        self.hidden = self._run(layer)
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = tp
        return layer

    def _quantize_group(self, layer: nn.Module, prefix: str, names: tuple[str, ...]):
        targets = {n: layer.get_submodule(n) for n in names
                   if type(layer.get_submodule(n)) is nn.Linear and self.recipe.config_for(prefix + n) is not None}
        calibrated = {n: m for n, m in targets.items()
                      if BACKENDS.for_config(self.recipe.config_for(prefix + n)).needs_calibration}
        hessians = {n: HessianAccumulator(m.in_features, self.device) for n, m in calibrated.items()}
        hooks = [m.register_forward_hook(lambda mod, args, out, n=n: hessians[n].add(args[0]))
                 for n, m in calibrated.items()]
        try:
            if hooks:
                self._run(layer)
        finally:
            for hook in hooks:
                hook.remove()
        for n in targets:
            extra = {"hessian": hessians[n].H} if n in hessians else {}
            module = replace_linear(layer, n, prefix + n, self.recipe.config_for(prefix + n), **extra)
            self.reports += linear_reports(module, prefix + n)


def quantize_calibrated(model: nn.Module, config, tokens: torch.Tensor, ignore: tuple[str, ...] = (),
                        batch_size: int = 8, device: str | torch.device = "cpu",
                        progress: bool = True) -> list[LinearReport]:
    """GPTQ (or any recipe with calibrated methods) of an in-memory model, in place; returns per-linear errors."""
    from quantkit.backends import runnable_recipe

    recipe = runnable_recipe(config, ignore, calibrated=True)
    weight = model.model.embed_tokens.weight
    calibrator = LayerCalibrator(model.config, tokens, weight, recipe, batch_size, device, progress)
    for index, layer in enumerate(tqdm(model.model.layers, desc="quantize", unit="layer", disable=not progress)):
        calibrator.step(layer, layer_prefix(index)).to(weight.device)
    model.quant_recipe = recipe.to_dict()
    return calibrator.reports
