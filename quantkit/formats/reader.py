"""Reading quantized directories: the formats' knowledge on top of the native model's checkpoint reader.

`open_checkpoint(path)` indexes any directory quantkit reads, dense or quantized (the format found
from config.json's quantization_config says which modules are stored quantized); `load_model`
builds the native model with each quantized module loaded by its format and carrying the same
QuantRecord as a freshly quantized one: the config from quantkit's recorded recipe (or, for a file
another tool wrote, what the format stores) and the error from quantkit_errors.json where present.
So a loaded model re-exports (`quantkit.save_quantized`) and re-evaluates like a fresh one.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from quantkit.dtypes import parse_dtype
from quantkit.errors import QuantkitError
from quantkit.formats.base import raise_first, shape_problems
from quantkit.formats.gguf import gguf_config, is_gguf, load_gguf
from quantkit.io.manifest import check_intact
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.build import build_model, check_device, ready_for_inference
from quantkit.model.layout import checkpoint_shapes
from quantkit.model.llama import LlamaForCausalLM
from quantkit.quant.record import ERRORS_FILE, QuantRecord
from quantkit.quant.surgery import set_module

log = logging.getLogger(__name__)


class QuantizedCheckpoint(Checkpoint):
    """A Checkpoint that also reads quantized directories in any registered format."""

    format = None

    def _stored_quantized(self) -> set[str]:
        if not self.quantization_config:
            return set()
        from quantkit.formats import format_for  # formats import backends (torchao): only for quantized files

        self.format = format_for(self.quantization_config)
        return self.format.quantized_modules(set(self.weight_map))

    def recipe(self):
        """The Recipe quantkit recorded in config.json, or None (a dense or another tool's checkpoint)."""
        record = self.config.extra.get("quantkit") or {}
        if not record.get("recipe"):
            return None
        from quantkit.backends import Recipe

        try:
            return Recipe.from_dict(record["recipe"], source=str(self.dir / "config.json"))
        except QuantkitError as e:  # e.g. a plugin backend that is not installed here
            log.warning("%s: quantkit's recorded recipe cannot be read (%s): install the backend that made it to "
                        "re-export with its exact config; the format's metadata stands in", self.dir, e)
            return None

    def module_files(self, module: str) -> str:
        """The file(s) holding a quantized module's tensors, for messages."""
        files = sorted({self.weight_map[n] for n in self.weight_map if n.startswith(module + ".")})
        return ", ".join(str(self.dir / f) for f in files) or str(self.dir)

    def errors(self) -> dict[str, dict]:
        """Per-linear errors quantkit recorded (name -> row of quantkit_errors.json); {} if none."""
        file = self.dir / ERRORS_FILE
        if not file.is_file():
            return {}
        try:
            rows = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{file}: not valid JSON ({e}): quantize again to rewrite it") from None
        return {row["name"]: row for row in rows}


def open_checkpoint(path: str | os.PathLike) -> QuantizedCheckpoint:
    """Any checkpoint directory (or hub id) quantkit reads, dense or quantized."""
    return QuantizedCheckpoint(path)


def model_config(path: str | os.PathLike):
    """The LlamaConfig of a model directory (config.json) or a .gguf file (its llama.* keys)."""
    return gguf_config(path) if is_gguf(path) else open_checkpoint(path).config


def load_model(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A dense or quantized checkpoint as a native model; quantized modules run on their kernels.

    Files that differ from quantkit's manifest (size or sha256), and quantization parameters that make no sense
    (NaN or non-positive scales, a broken group map), are refused with the file named.
    """
    device = check_device(device)
    if is_gguf(path):  # one file, llama.cpp's
        return load_gguf(path, parse_dtype(dtype) or torch.float16).to(device)
    ckpt = open_checkpoint(path)
    check_intact(ckpt.dir)
    dtype = parse_dtype(dtype) or ckpt.default_dtype()
    tp = ckpt.config.pretraining_tp  # divides every dimension: Checkpoint checks it against the shapes
    ckpt.config.pretraining_tp = 1  # built at tp=1: the quantized modules are sliced once they are in (_set_tp)
    try:
        model = build_model(ckpt, dtype, device)
    finally:
        ckpt.config.pretraining_tp = tp
    if ckpt.quantized_modules:
        _load_quantized(model, ckpt, dtype, device)
    model = ready_for_inference(model)
    _set_tp(model, ckpt, tp)
    return model


def _set_tp(model: LlamaForCausalLM, ckpt: QuantizedCheckpoint, tp: int):
    """Honour config.json's pretraining_tp; quantized modules that cannot be sliced (bitsandbytes, act-order,
    groups across the slices: files of other tools or older quantkit) run at tp=1, with one warning."""
    if tp == 1:
        return
    try:
        model.set_pretraining_tp(tp)
    except QuantkitError as e:
        if not ckpt.quantized_modules:
            raise
        log.warning("%s sets pretraining_tp=%d, which its quantized modules cannot run (%s): running with "
                    "pretraining_tp=1 (the same weights; only the float summation order differs, and "
                    "transformers 5 ignores it)", ckpt.dir / "config.json", tp, e)
        model.set_pretraining_tp(1)


def _load_quantized(model: LlamaForCausalLM, ckpt: QuantizedCheckpoint, dtype: torch.dtype, device: torch.device):
    recipe, errors, qc = ckpt.recipe(), ckpt.errors(), ckpt.quantization_config
    shapes = checkpoint_shapes(ckpt.config)
    for name in sorted(ckpt.quantized_modules):  # their stored tensors are kept as stored (packed ints)
        try:
            module = ckpt.format.load_module(name, ckpt.module_tensors(name), qc, dtype)
            raise_first(shape_problems(name, (module.out_features, module.in_features), shapes[f"{name}.weight"]))
        except QuantkitError as e:  # the format names the module and tensor; add the file holding it
            raise QuantkitError(f"{ckpt.module_files(name)}: {e}") from None
        config = recipe.config_for(name) if recipe is not None else None
        if config is None:
            config = _config_from_format(ckpt, name, module)
        row = errors.get(name, {})
        module.quant_record = QuantRecord(config, row.get("relative_error"), row.get("kind"),
                                          dead_inputs=row.get("dead_inputs"))
        set_module(model, name, module.to(device))
    model.quant_recipe = recipe.to_dict() if recipe is not None else None


def _config_from_format(ckpt: QuantizedCheckpoint, name: str, module):
    """What the format's metadata says the module is; None (logged) for a scheme no quantkit backend has."""
    try:
        return ckpt.format.config_of(name, module, ckpt.quantization_config)
    except QuantkitError as e:
        log.warning("%s: loaded and runs, but no quantkit method stands for its scheme (%s): it cannot be "
                    "re-exported", name, e)
        return None
