"""Layer 3, the methods: the registry (registry), recipes (recipe), one module per method (int4, rtn, bnb, awq, and gptq/
with its Hessian observer and solver), and the one entry point `quantize(model, config)`. Imports layers 0-2 and
the formats beside it at rank 3; never a run, eval or the CLI."""

from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.backends import int4, rtn, bnb, gptq, awq  # noqa: F401  (importing registers the built-in backends)
from quantkit.backends.registry import BACKENDS, Backend, QuantConfig, register_backend
from quantkit.errors import QuantkitError
from quantkit.backends.recipe import Recipe
from quantkit.quant.record import QuantRecord, record_of
from quantkit.quant.surgery import decoder_linears, set_module

log = logging.getLogger(__name__)


def runnable_recipe(config: QuantConfig | Recipe, ignore: tuple[str, ...] = (), calibrated: bool = False) -> Recipe:
    """The recipe for a config (or recipe) plus ignore patterns, once every backend in it is checked usable.

    calibrated: whether the caller feeds calibration data (else methods that need it are refused).
    """
    recipe = Recipe.of(config, ignore)
    for c in recipe.configs():
        backend = BACKENDS.for_config(c)
        backend.check_usable()
        if backend.needs_calibration and not calibrated:
            raise QuantkitError(f"method {backend.name} needs calibration data: pass --calib "
                                f"(or calibration= to quantkit.quantize_checkpoint / quantize_calibrated)")
    return recipe


def needs_calibration(recipe: Recipe) -> bool:
    return any(BACKENDS.for_config(c).needs_calibration for c in recipe.configs())


def check_finite(name: str, weight: torch.Tensor):
    """Every backend's inputs pass here: a NaN or Inf weight is a damaged checkpoint, named."""
    if not torch.isfinite(weight).all():
        raise QuantkitError(f"{name}: contains NaN or Inf: the checkpoint is damaged; fix or re-download it")


def replace_linear(model: nn.Module, name: str, full_name: str, config: QuantConfig, dtype: torch.dtype | None = None,
                   **handler_kwargs) -> nn.Module:
    """Swap the nn.Linear at `name` in `model` for its quantized module; `full_name` is its name in the full model.

    The one place every backend's handler is called from: NaN/Inf check, handler, the module's
    QuantRecord (config and error; exporters read the config to write quantization_config).
    `handler_kwargs`: the statistics of the backend's observer (GPTQ: hessian=). `dtype`: the dtype
    the module is built in (the export dtype) where the layer computes in another (calibration).
    """
    linear = model.get_submodule(name)
    check_finite(full_name, linear.weight)
    if dtype is not None:
        linear.to(dtype)  # in place (it is swapped out below): handlers build their modules in the weight's dtype
    quantized = BACKENDS.for_config(config).handler(linear, config, full_name, **handler_kwargs)
    measured = record_of(quantized)  # a handler that measured the output error records it itself
    if measured is None or measured.error is None:
        quantized.quant_record = QuantRecord(config, weight_error(linear.weight, quantized, config), "weight")
    set_module(model, name, quantized)
    log.debug("quantized %s with %s", full_name, config.describe())
    return quantized


def dense_weight(module: nn.Module, config: QuantConfig | None = None) -> torch.Tensor | None:
    """The (N, K) weight any linear computes with: a plain nn.Linear's own, a quantized module's through its
    backend (`config`: the one it was quantized with, else its QuantRecord's); None where it cannot be read."""
    if type(module) is nn.Linear:
        return module.weight
    record = record_of(module)
    config = config if config is not None else (record.config if record is not None else None)
    if config is None:
        raise QuantkitError(f"a {type(module).__name__} carries no quant_record: quantkit cannot tell its weight")
    return BACKENDS.for_config(config).dense_weight(module)


def weight_error(weight: torch.Tensor, quantized: nn.Module, config: QuantConfig) -> float | None:
    """||W - Q||_F / ||W||_F: the output error for isotropic inputs; None for modules quantkit cannot dequantize."""
    dense = dense_weight(quantized, config)
    if dense is None:
        return None
    w = weight.detach().float()
    return ((dense.float().to(w.device) - w).norm() / w.norm().clamp(min=1e-30)).item()


def quantize(model: nn.Module, config: QuantConfig | Recipe, ignore: tuple[str, ...] = (), prefix: str = "") -> nn.Module:
    """Quantize `model`'s decoder linears in place by the config (or recipe) and return it.

    `prefix` is prepended to module names, for quantizing a single decoder layer that lives at
    `model.layers.N.` in the full model.
    """
    recipe = runnable_recipe(config, ignore)
    targets = list(decoder_linears(model, prefix))
    if not targets:
        raise QuantkitError("nothing to quantize: the model has no full-precision decoder linears "
                            "(is it already quantized?)")
    if not prefix:  # the whole model: every pattern must apply to one of its modules (a part is checked by its caller)
        linears = {name for name, _ in targets}
        recipe.assign([n for n, _ in targets], [n for n, _ in model.named_modules() if n and n not in linears])
    for name, _ in targets:
        config_for = recipe.config_for(name)
        if config_for is not None:
            replace_linear(model, name[len(prefix):], name, config_for)
    model.quant_recipe = recipe.to_dict()  # recorded in config.json by the exporters
    return model


__all__ = ["BACKENDS", "Backend", "QuantConfig", "Recipe", "check_finite", "dense_weight", "needs_calibration", "quantize",
           "register_backend", "replace_linear", "runnable_recipe", "weight_error"]
