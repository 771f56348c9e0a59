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
from quantkit.layerwise import LayerCalibrator, linear_reports
from quantkit.errors import QuantkitError
from quantkit.export import (ExportRecord, choose_format, module_tensors, quantized_config_json, shard_metadata,
                             write_quantized_dir)
from quantkit.model.checkpoint import Checkpoint, atomic_output_dir
from quantkit.dtypes import parse_dtype
from quantkit.model.layout import layer_prefix
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
    errors: list = field(default_factory=list)  # per quantized linear: name, method, relative_error, kind

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_checkpoint(src: str | os.PathLike, config: QuantConfig | Recipe, out_dir: str | os.PathLike,
                        format: str | None = None, ignore: tuple[str, ...] = (), dtype=None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
                        calibration=None, n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                        calib_mode: str | None = None, calib_field: str = "text", batch_size: int = 8,
                        device: str = "cpu") -> QuantizeSummary:
    """Quantize the checkpoint at `src` layer by layer into `out_dir` in an export format.

    Calibrated methods (gptq) need `calibration`: a LongTensor (n, seq_len) of token ids, or a
    source for `calibrate.calibration_tokens` (wikitext2, c4, ptb, a file, a list of strings), sampled
    into n_samples windows of seq_len with `seed` (`calib_mode`, `calib_field`: see calibrate/).
    `device` is where each layer is calibrated.
    """
    start = time.perf_counter()
    ckpt = Checkpoint(src)
    if ckpt.quantization_config:
        raise QuantkitError(f"{ckpt.dir / 'config.json'}: the source is already quantized "
                            f"({ckpt.quantization_config.get('quant_method')}): start from the fp16/bf16 checkpoint")
    recipe = runnable_recipe(config, ignore, calibrated=calibration is not None)  # checked before any work
    fmt = choose_format(recipe.configs(), format)
    dtype = parse_dtype(dtype) or ckpt.default_dtype()
    record = ExportRecord()
    recipe_dict = recipe.to_dict()
    calibrator, reports = None, []  # reports: what replace_linear recorded on each quantized linear
    if needs_calibration(recipe):
        tokens = calibration_tensor(calibration, ckpt, n_samples, seq_len, seed, calib_mode, calib_field)
        calibrator = LayerCalibrator(ckpt.config, tokens, ckpt.tensor("model.embed_tokens.weight", dtype), recipe,
                                     batch_size, device, progress)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, metadata=shard_metadata(fmt, recipe_dict))
        for name, t in ckpt.read(ckpt.non_layer_names(), dtype):
            writer.add(name, t)
        for index in tqdm(range(ckpt.config.num_hidden_layers), desc="quantize", unit="layer", disable=not progress):
            prefix = layer_prefix(index)
            layer = ckpt.layer_module(index, dtype)
            layer = calibrator.step(layer, prefix).cpu() if calibrator else quantize(layer, recipe, prefix=prefix)
            reports += linear_reports(layer, prefix)
            for name, t in module_tensors(layer, fmt, record, prefix=prefix):
                writer.add(name, t)
            del layer  # the next layer replaces it: memory stays at one layer
        writer.close()
        errors = [asdict(r) for r in reports]
        config_json = quantized_config_json(ckpt.config, fmt, record, recipe_dict, dtype)
        write_quantized_dir(tmp, config_json, fmt, ckpt.dir, errors)
    before = sum(torch.Size(s).numel() for s in ckpt.shapes.values()) * ckpt.default_dtype().itemsize
    return QuantizeSummary(source=str(ckpt.dir), output=str(out_dir), format=fmt.name, recipe=recipe_dict,
                           layers=ckpt.config.num_hidden_layers, bytes_before=before, bytes_after=writer.total_size,
                           bits_per_weight=record.bits_per_weight(), seconds=time.perf_counter() - start,
                           errors=errors)


def calibration_tensor(calibration, ckpt: Checkpoint, n_samples: int, seq_len: int, seed: int,
                       mode: str | None = None, text_field: str = "text") -> torch.Tensor:
    """Token ids (n, seq_len): a tensor is used as is (after calibrate's checks); a source is sampled."""
    from quantkit.calibrate import calibration_tokens
    from quantkit.calibrate.sampling import ready_windows
    from quantkit.calibrate.sources import check_token_tensor, is_token_source, load_tokens
    from quantkit.model.tokenizer import Tokenizer

    if isinstance(calibration, torch.Tensor):
        check_token_tensor(calibration, ckpt.config.vocab_size, "calibration tensor")
        return calibration.long()
    if is_token_source(calibration):  # a .pt/.safetensors of token ids: no tokenizer needed
        tokens, name = load_tokens(calibration)
        return ready_windows(tokens, name, ckpt.config.vocab_size, n_samples, seq_len)
    return calibration_tokens(calibration, Tokenizer(ckpt.dir), n_samples=n_samples, seq_len=seq_len, seed=seed,
                              mode=mode, text_field=text_field)
