"""Streaming quantization of a checkpoint: one decoder layer in memory at a time.

read layer i (memory-mapped, only its tensors) -> quantize its linears -> append its tensors to the
output shards (spooled to disk, see model/shards.py) -> free it. Peak memory is about one layer,
whatever the number of layers: this is what lets 70B (80 layers of ~1.7 GB in fp16) be quantized on
a 32 GB machine.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from quantkit.backends import QuantConfig, Recipe, needs_calibration, quantize, runnable_recipe
from quantkit.dtypes import parse_dtype
from quantkit.errors import QuantkitError
from quantkit.export import ExportOptions, choose_format, quantized_writer
from quantkit.io import DiskFull, check_output_dir
from quantkit.layerwise import CalibrationOptions, LayerCalibrator, calibration_tensor
from quantkit.loading import open_checkpoint
from quantkit.model.layout import layer_prefix, linear_of
from quantkit.model.shards import parse_size

log = logging.getLogger(__name__)


@dataclass
class QuantizeSummary:
    source: str
    output: str
    format: str
    recipe: dict
    layers: int
    bytes_before: int  # the source's weights, in its dtype
    bytes_after: int  # everything written to the safetensors shards
    bits_per_weight: float  # stored bits per weight of the quantized linears (scales and zeros included)
    seconds: float
    errors: list = field(default_factory=list)  # per quantized linear: name, method, relative_error, kind, dead_inputs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Written:
    """Bytes sent to the shards so far: the non-layer tensors, then the decoder layers one by one."""

    non_layer: int = 0
    layers: int = 0
    layer_bytes: int = 0

    def layer_done(self, total_size: int):
        self.layers += 1
        self.layer_bytes = total_size - self.non_layer


def space_needed(ckpt, recipe: Recipe, dtype: torch.dtype, written: Written,
                 max_shard_size: int | str) -> tuple[int, bool]:
    """(bytes the output needs, whether only a lower bound): extrapolated from the layers written so far; before
    the first one, the source's non-layer tensors plus its decoder linears at the recipe's lowest bit width.
    Plus one shard: ShardWriter holds a shard twice (spool and shard file) while it closes it."""
    n = ckpt.config.num_hidden_layers
    if written.layers:
        total, at_least = written.non_layer + written.layer_bytes * n // written.layers, False
    else:
        non_layer = sum(torch.Size(ckpt.shapes[name]).numel() for name in ckpt.non_layer_names()) * dtype.itemsize
        bits = min(getattr(c, "bits", 4) for c in recipe.configs())  # bitsandbytes configs: 4 bits or more
        linears = sum(torch.Size(shape).numel() for name, shape in ckpt.shapes.items()
                      if name.endswith(".weight") and linear_of(name) is not None)
        total, at_least = non_layer + linears * bits // 8, True
    return total + min(parse_size(max_shard_size), total), at_least


def quantize_checkpoint(src: str | os.PathLike, config: QuantConfig | Recipe, out_dir: str | os.PathLike,
                        export: ExportOptions | None = None, calibration=None, ignore: tuple[str, ...] = (),
                        progress: bool = True) -> QuantizeSummary:
    """Quantize the checkpoint at `src` layer by layer into `out_dir` in an export format.

    export: ExportOptions (format, dtype of what stays unquantized, shard size, overwrite).
    calibration: for calibrated methods (gptq), CalibrationOptions, or just its source (a LongTensor
    (n, seq_len) of token ids, a dataset name or a file), sampled with the default options.
    Raises QuantkitError for a bad source, recipe or format before any layer is read.
    """
    start = time.perf_counter()
    export, calibration = export or ExportOptions(), CalibrationOptions.of(calibration)
    ckpt = open_checkpoint(src)
    if ckpt.quantization_config:
        raise QuantkitError(f"{ckpt.dir / 'config.json'}: the source is already quantized "
                            f"({ckpt.quantization_config.get('quant_method')}): start from the fp16/bf16 checkpoint")
    check_output_dir(out_dir, export.overwrite, keep=[ckpt.dir])  # before calibration data is fetched
    recipe = runnable_recipe(config, ignore, calibrated=calibration is not None)  # checked before any work
    fmt = choose_format(recipe.configs(), export.format)
    dtype = parse_dtype(export.dtype, "--dtype") or ckpt.output_dtype()  # never a silent cast of the source
    recipe_dict = recipe.to_dict()
    calibrator = None
    if needs_calibration(recipe):
        calib_dtype = calibration.compute_dtype(ckpt, dtype)  # refused here if it could overflow or round the layers
        tokens = calibration_tensor(calibration, ckpt)
        calibrator = LayerCalibrator(ckpt.config, tokens, ckpt.tensor("model.embed_tokens.weight", dtype), recipe,
                                     calibration.batch_size, calibration.device, progress, calib_dtype)
    written = Written()
    try:
        with quantized_writer(out_dir, fmt, export, ckpt.config, recipe_dict, dtype, ckpt.dir) as writer:
            writer.write_tensors(ckpt.read(ckpt.non_layer_names(), dtype))
            written.non_layer = writer.sink.total_size
            for index in tqdm(range(ckpt.config.num_hidden_layers), desc="quantize", unit="layer",
                              disable=not progress):
                prefix = layer_prefix(index)
                layer = ckpt.layer_module(index, dtype)
                layer = calibrator.step(layer, prefix).cpu() if calibrator else quantize(layer, recipe, prefix=prefix)
                writer.write(layer, prefix=prefix)
                written.layer_done(writer.sink.total_size)
                del layer  # the next layer replaces it: memory stays at one layer
    except DiskFull as e:  # the temporary directory is gone; say how much the whole output needs
        needed, at_least = space_needed(ckpt, recipe, dtype, written, export.max_shard_size)
        raise DiskFull(out_dir, e.written, needed, at_least, fix="free space or choose another output (-o)") from None
    before = sum(torch.Size(s).numel() for s in ckpt.shapes.values()) * ckpt.output_dtype().itemsize
    return QuantizeSummary(source=str(ckpt.dir), output=str(out_dir), format=fmt.name, recipe=recipe_dict,
                           layers=ckpt.config.num_hidden_layers, bytes_before=before,
                           bytes_after=writer.sink.total_size, bits_per_weight=writer.record.bits_per_weight(),
                           seconds=time.perf_counter() - start, errors=[asdict(r) for r in writer.reports])
