"""Calibrated quantization, one decoder layer at a time: the orchestration around the backends' observers.

The calibration tokens are embedded once; then for each decoder layer, in order, and inside it for
each sequential group (true-sequential: q/k/v -> o -> gate/up -> down, as GPTQ's llama.py), four phases:

  collect    run the layer on the current inputs; each target linear's observer (its backend's:
             GPTQ's Hessian, activation magnitudes, ...) sees that linear's inputs;
  transform  backends that rewrite a group before quantizing it (activation-aware scaling: rescale
             the preceding norm or linear and the group's linears) do so, with the statistics;
  quantize   every target linear of the group is swapped for its quantized module, the handler
             receiving its observer's statistics (later groups thus see the quantized earlier ones);
and once per layer:
  advance    recompute the layer's outputs with the quantized layer: the next layer's inputs.

So layer i is calibrated on the outputs of the already-quantized layers before it. Only one layer's
weights, the activations (n, T, hidden) and one group's statistics are in memory at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantkit.backends import BACKENDS, QuantConfig, Recipe, replace_linear
from quantkit.model.checkpoint import Checkpoint, check_device
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import SEQUENTIAL_GROUPS, layer_prefix
from quantkit.model.llama import rotary_embedding
from quantkit.record import LinearReport, linear_reports
from quantkit.walker import quantized_modules

log = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    """Where calibration data comes from and how a layer is calibrated (the CLI's --calib ... --device).

    `source`: a LongTensor (n, seq_len) of token ids, or anything quantkit.calibrate reads (wikitext2,
    c4, ptb, a text/jsonl/parquet/csv file, a saved dataset, a .pt/.safetensors token tensor, a list of
    strings), sampled into n_samples windows of seq_len tokens with `seed` (`mode`, `text_field`: see
    quantkit.calibrate). `batch_size` windows go through a layer at once, on `device`.
    """

    source: Any = None
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    mode: str | None = None
    text_field: str = "text"
    batch_size: int = 8
    device: str = "cpu"

    @classmethod
    def of(cls, calibration) -> "CalibrationOptions | None":
        """Options as given, or the defaults around a bare source (a tensor, a path, a dataset name)."""
        if calibration is None or isinstance(calibration, CalibrationOptions):
            return calibration
        return cls(source=calibration)


def calibration_tensor(options: CalibrationOptions, ckpt: Checkpoint) -> torch.Tensor:
    """Token ids (n, seq_len): a tensor is used as is (after calibrate's checks); a source is sampled."""
    from quantkit.calibrate import calibration_tokens
    from quantkit.calibrate.sampling import ready_windows
    from quantkit.calibrate.sources import check_token_tensor, is_token_source, load_tokens
    from quantkit.model.tokenizer import Tokenizer

    o, vocab = options, ckpt.config.vocab_size
    if isinstance(o.source, torch.Tensor):
        check_token_tensor(o.source, vocab, "calibration tensor")
        return o.source.long()
    if is_token_source(o.source):  # a .pt/.safetensors of token ids: no tokenizer needed
        tokens, name = load_tokens(o.source)
        return ready_windows(tokens, name, vocab, o.n_samples, o.seq_len)
    return calibration_tokens(o.source, Tokenizer(ckpt.dir), n_samples=o.n_samples, seq_len=o.seq_len, seed=o.seed,
                              mode=o.mode, text_field=o.text_field)


@dataclass
class GroupContext:
    """What a backend's transform sees of a sequential group, after collect and before quantize."""

    layer: nn.Module  # the decoder layer, still full precision in this group
    prefix: str  # 'model.layers.3.'
    names: tuple[str, ...]  # the group's target linears, names inside the layer ('mlp.gate_proj', ...)
    configs: dict[str, QuantConfig]  # target -> its config
    observers: dict[str, Any]  # target -> its observer (calibrated targets only)
    run: Callable[[], torch.Tensor] = field(repr=False)  # the layer on the current calibration inputs


class LayerCalibrator:
    """Holds the calibration activations (n, T, hidden) and walks them through the layers as they are quantized."""

    def __init__(self, config: LlamaConfig, tokens: torch.Tensor, embed_weight: torch.Tensor, recipe: Recipe,
                 batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True):
        self.recipe, self.batch_size, self.device, self.progress = recipe, batch_size, check_device(device), progress
        self.hidden = F.embedding(tokens.to(self.device), embed_weight.to(self.device))  # (n, T, hidden)
        positions = torch.arange(tokens.shape[1], device=self.device)[None]
        self.cos, self.sin = rotary_embedding(config, positions, self.hidden.dtype)  # (1, 1, T, D)
        self.true_sequential = all(getattr(c, "true_sequential", True) for c in recipe.configs())

    @torch.no_grad()
    def _run(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat([layer(x, self.cos, self.sin) for x in self.hidden.split(self.batch_size)])

    def step(self, layer: nn.Module, prefix: str) -> nn.Module:
        """Quantize one decoder layer in place on the current activations, then advance them through it."""
        layer.to(self.device)
        # Observers hook the linears, which pretraining_tp's slicing bypasses: calibrate at tp=1.
        tp = layer.self_attn.pretraining_tp
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = 1
        groups = SEQUENTIAL_GROUPS if self.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
        for names in tqdm(groups, desc=prefix.rstrip("."), leave=False, disable=not self.progress):
            configs = self._targets(layer, prefix, names)
            observers = self.collect(layer, prefix, configs)
            self.transform(layer, prefix, configs, observers)
            self.quantize(layer, prefix, configs, observers)
        self.advance(layer)
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = tp
        return layer

    def _targets(self, layer: nn.Module, prefix: str, names: tuple[str, ...]) -> dict[str, QuantConfig]:
        """The group's full-precision linears that the recipe quantizes, with their configs."""
        configs = {n: self.recipe.config_for(prefix + n) for n in names if type(layer.get_submodule(n)) is nn.Linear}
        return {n: c for n, c in configs.items() if c is not None}

    def collect(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig]) -> dict[str, Any]:
        """One forward pass feeding each calibrated target's observer its inputs; no pass if none needs it."""
        observers = {}
        for n, config in configs.items():
            make = BACKENDS.for_config(config).observer
            if make is not None:
                observers[n] = make(layer.get_submodule(n), config)
        hooks = [layer.get_submodule(n).register_forward_hook(lambda mod, args, out, n=n: observers[n].add(args[0]))
                 for n in observers]
        try:
            if hooks:
                self._run(layer)
        finally:
            for hook in hooks:
                hook.remove()
        return observers

    def transform(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig], observers: dict[str, Any]):
        """Each backend with a transform rewrites the group once, before any of it is quantized."""
        backends = {b.name: b for b in map(BACKENDS.for_config, configs.values())}  # each backend once
        for backend in backends.values():
            if backend.transform is not None:
                backend.transform(GroupContext(layer, prefix, tuple(configs), configs, observers,
                                               run=lambda: self._run(layer)))

    def quantize(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig], observers: dict[str, Any]):
        for n, config in configs.items():
            stats = observers[n].handler_kwargs() if n in observers else {}
            replace_linear(layer, n, prefix + n, config, **stats)
        observers.clear()  # the statistics (GPTQ: one K x K Hessian each) are freed before the next group

    def advance(self, layer: nn.Module):
        self.hidden = self._run(layer)


def quantize_calibrated(model: nn.Module, config, tokens: torch.Tensor, ignore: tuple[str, ...] = (),
                        batch_size: int = 8, device: str | torch.device = "cpu",
                        progress: bool = True) -> list[LinearReport]:
    """GPTQ (or any recipe with calibrated methods) of an in-memory model, in place; returns per-linear errors."""
    from quantkit.backends import runnable_recipe

    recipe = runnable_recipe(config, ignore, calibrated=True)
    weight = model.model.embed_tokens.weight
    calibrator = LayerCalibrator(model.config, tokens, weight, recipe, batch_size, device, progress)
    reports = []
    for index, layer in enumerate(tqdm(model.model.layers, desc="quantize", unit="layer", disable=not progress)):
        calibrator.step(layer, layer_prefix(index)).to(weight.device)
        reports += linear_reports(quantized_modules(layer, layer_prefix(index)))
    model.quant_recipe = recipe.to_dict()
    return reports
