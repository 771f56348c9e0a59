"""Writing quantized models: pick the format, turn modules into its tensors, write the directory.

Both the in-memory path (`save_quantized(model, ...)`) and the streaming pipeline go through
`module_tensors`, so a layer is exported the same way whichever way it was quantized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quantkit
from quantkit.dtypes import dtype_name
from quantkit.backends import BACKENDS, QuantConfig
from quantkit.layerwise import linear_reports
from quantkit.errors import QuantkitError
from quantkit.formats import QuantFormat, get_format
from quantkit.model.checkpoint import atomic_output_dir, copy_tokenizer_files
from quantkit.model.config import LlamaConfig
from quantkit.model.shards import ShardWriter
from quantkit.model.layout import is_decoder_linear


ERRORS_FILE = "quantkit_errors.json"  # per quantized linear: name, method, relative_error, kind


def choose_format(configs: Iterable[QuantConfig], name: str | None = None) -> QuantFormat:
    """The format to write: the named one, or the first method's default; every method must fit it."""
    methods = list(dict.fromkeys(c.method for c in configs))
    if not methods:
        raise QuantkitError("nothing was quantized: the recipe leaves every module in full precision")
    name = name or BACKENDS.get(methods[0]).formats[0]
    fmt = get_format(name)
    for method in methods:
        if method not in fmt.methods:
            formats = ", ".join(BACKENDS.get(method).formats)
            raise QuantkitError(f"--format {name} cannot hold method {method}: use --format {formats}")
    return fmt


@dataclass
class ExportRecord:
    """What was written, for config.json and the summary."""

    configs: dict[str, QuantConfig] = field(default_factory=dict)  # quantized module -> config
    ignored: list[str] = field(default_factory=list)  # linears kept in full precision
    quantized_weights: int = 0  # parameters of the quantized linears
    quantized_bytes: int = 0  # bytes of their stored tensors

    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)


def module_tensors(module: nn.Module, fmt: QuantFormat, record: ExportRecord, prefix: str = "",
                   skip: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(full name, tensor) for everything in `module`: quantized linears in the format, the rest as is.

    The rest is read from each module's own parameters and persistent buffers, never through
    state_dict() of a quantized module (bitsandbytes rebuilds its CPU-repacked state there, lossily).
    """
    quantized = {name: m for name, m in module.named_modules() if hasattr(m, "quant_config")}
    for name, m in quantized.items():
        tensors = fmt.export_module(prefix + name, m)
        record.configs[prefix + name] = m.quant_config
        record.quantized_weights += m.out_features * m.in_features
        record.quantized_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        yield from tensors.items()
    skip = set(skip)
    for name, m in module.named_modules():
        if name in quantized or any(name.startswith(q + ".") for q in quantized):
            continue
        if type(m) is nn.Linear and is_decoder_linear(prefix + name):
            record.ignored.append(prefix + name)
        for tensor_name, t in _own_tensors(m):
            full = f"{name}.{tensor_name}" if name else tensor_name
            if full not in skip and t is not None:
                yield prefix + full, t.detach()


def _own_tensors(m: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from m._parameters.items()
    yield from ((k, v) for k, v in m._buffers.items() if k not in m._non_persistent_buffers_set)


def quantized_config_json(config: LlamaConfig, fmt: QuantFormat, record: ExportRecord, recipe: dict[str, Any],
                          dtype: torch.dtype) -> dict[str, Any]:
    """config.json: the model's, its format's quantization_config, and quantkit's own record."""
    d = config.to_hf_dict()
    d["dtype"] = dtype_name(dtype)
    ignored = record.ignored + ["lm_head"]
    d["quantization_config"] = fmt.quantization_config(record.configs, ignored)
    d["quantkit"] = {"version": quantkit.__version__, "format": fmt.name, "recipe": recipe}
    return d


def shard_metadata(fmt: QuantFormat, recipe: dict[str, Any] | None) -> dict[str, str]:
    """quantkit's record in every shard's safetensors metadata (string values only)."""
    return {"quantkit_version": quantkit.__version__, "quantkit_format": fmt.name,
            "quantkit_recipe": json.dumps(recipe)}


def write_quantized_dir(tmp: Path, config_json: dict[str, Any], fmt: QuantFormat, tokenizer_dir,
                        errors: list[dict] | None = None):
    """config.json, the format's extra files, the tokenizer, and the per-linear errors (read by `quantkit eval`)."""
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    if errors:
        (tmp / ERRORS_FILE).write_text(json.dumps(errors, indent=1) + "\n")
    for file_name, text in fmt.extra_files(config_json["quantization_config"]).items():
        (tmp / file_name).write_text(text)
    copy_tokenizer_files(tokenizer_dir, tmp)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, format: str | None = None,
                   tokenizer_dir: str | os.PathLike | None = None, max_shard_size: int | str = "5GB",
                   overwrite: bool = False) -> Path:
    """Save a model quantized in memory by `quantkit.quantize` in one of the export formats."""
    configs = [m.quant_config for m in model.modules() if hasattr(m, "quant_config")]
    fmt = choose_format(configs, format)
    recipe = getattr(model, "quant_recipe", None)
    dtype = model.model.embed_tokens.weight.dtype
    skip = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else getattr(model, "source_dir", None)
    record = ExportRecord()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, metadata=shard_metadata(fmt, recipe))
        for name, t in module_tensors(model, fmt, record, skip=skip):
            writer.add(name, t)
        writer.close()
        errors = [asdict(r) for r in linear_reports(model)]
        write_quantized_dir(tmp, quantized_config_json(model.config, fmt, record, recipe, dtype), fmt, tokenizer_dir,
                            errors)
    return Path(out_dir)
