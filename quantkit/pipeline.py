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
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from quantkit.backends import QuantConfig, Recipe, quantize, runnable_recipe
from quantkit.errors import QuantkitError
from quantkit.export import (ExportRecord, choose_format, module_tensors, quantized_config_json, shard_metadata,
                             write_quantized_dir)
from quantkit.model.checkpoint import Checkpoint, atomic_output_dir
from quantkit.model.config import parse_dtype
from quantkit.model.shards import ShardWriter

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

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_checkpoint(src: str | os.PathLike, config: QuantConfig | Recipe, out_dir: str | os.PathLike,
                        format: str | None = None, ignore: tuple[str, ...] = (), dtype=None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False,
                        progress: bool = True) -> QuantizeSummary:
    """Quantize the checkpoint at `src` layer by layer into `out_dir` in an export format."""
    start = time.perf_counter()
    ckpt = Checkpoint(src)
    if ckpt.quantization_config:
        raise QuantkitError(f"{ckpt.dir / 'config.json'}: the source is already quantized "
                            f"({ckpt.quantization_config.get('quant_method')}): start from the fp16/bf16 checkpoint")
    recipe = runnable_recipe(config, ignore)  # checked before any work
    fmt = choose_format(recipe.configs(), format)
    dtype = parse_dtype(dtype) or ckpt.default_dtype()
    record = ExportRecord()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, metadata=shard_metadata(fmt, recipe.to_dict()))
        for name, t in ckpt.read(ckpt.non_layer_names(), dtype):
            record.n_params += t.numel()
            writer.add(name, t)
        for index in tqdm(range(ckpt.config.num_hidden_layers), desc="quantize", unit="layer", disable=not progress):
            layer = quantize(ckpt.layer_module(index, dtype), recipe, prefix=f"model.layers.{index}.")
            for name, t in module_tensors(layer, fmt, record, prefix=f"model.layers.{index}."):
                writer.add(name, t)
            del layer  # the next layer replaces it: memory stays at one layer
        writer.close()
        config_json = quantized_config_json(ckpt.config, fmt, record, recipe.to_dict(), dtype)
        write_quantized_dir(tmp, config_json, fmt, ckpt.dir)
    before = sum(torch.Size(s).numel() for s in ckpt.shapes.values()) * ckpt.default_dtype().itemsize
    return QuantizeSummary(source=str(ckpt.dir), output=str(out_dir), format=fmt.name, recipe=recipe.to_dict(),
                           layers=ckpt.config.num_hidden_layers, bytes_before=before, bytes_after=writer.total_size,
                           bits_per_weight=record.bits_per_weight(), seconds=time.perf_counter() - start)
