"""Writing quantized models: pick the format, turn modules into its tensors, write the directory.

The in-memory path (`save_quantized(model, ...)`) and the streaming pipeline share one write path,
`quantized_writer`: the format's atomic container (a directory; one file for GGUF), its sink for the tensors (its container: sharded
safetensors by default), `module_tensors` for each module or layer, and the format's `finish` for
config.json and the rest. So a layer is exported the same way whichever way it was quantized, and a
format with another container (one file) plugs in without touching the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.version import __version__
from quantkit.backends import BACKENDS, QuantConfig, Recipe
from quantkit.backends.registry import distinct_configs
from quantkit.dtypes import dtype_name, parse_dtype
from quantkit.errors import QuantkitError
from quantkit.formats import QuantFormat, format_names, get_format
from quantkit.io.manifest import write_manifest
from quantkit.io.shards import SHARD_SIZE
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import is_decoder_linear, module_names
from quantkit.model.llama import slicing_problem
from quantkit.quant.record import LinearReport, bits_per_weight, linear_reports, record_of
from quantkit.quant.surgery import decoder_linears, quantized_modules

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """How a quantized model is written (the CLI's --format, --dtype, --max-shard-size, --force)."""

    format: str | None = None  # a registered format's name; None: the first method's preferred format
    dtype: str | torch.dtype | None = None  # of what stays unquantized; None: the checkpoint's (or model's)
    max_shard_size: int | str = SHARD_SIZE
    overwrite: bool = False


def formats_holding(config: QuantConfig) -> list[str]:
    """Registered formats that do not refuse `config`, the backend's preferred ones first."""
    preferred = list(BACKENDS.for_config(config).formats)
    names = preferred + [n for n in format_names() if n not in preferred]
    return [n for n in names if get_format(n).refuses_config(config) is None]


def choose_format(configs: Iterable[QuantConfig], name: str | None = None) -> QuantFormat:
    """The format to write: the named one, or the first method's preferred one; it must hold every config."""
    configs = distinct_configs(configs)
    if not configs:
        raise QuantkitError("nothing was quantized: no module is quantized (the recipe leaves every one in full "
                            "precision, or the model was never quantized)")
    if name is None:
        holding = formats_holding(configs[0])
        if not holding:
            raise QuantkitError(f"no registered format holds {configs[0].describe()}")
        name = holding[0]
    fmt = get_format(name)
    reason = fmt.refuses_configs(configs)
    if reason is not None:
        raise QuantkitError(f"--format {name}: {reason}{_way_out(configs, reason)}")
    return fmt


def planned_format(recipe: Recipe, config: LlamaConfig, name: str | None = None
                   ) -> tuple[QuantFormat, dict[str, QuantConfig | None]]:
    """The format (`name`, or the first method's preferred one) and each decoder linear's config, judged before
    any tensor is read: every recipe pattern applies to some module (Recipe.assign), the format holds the
    configs (choose_format) and their layout over the layers (check_layout). Raises QuantkitError."""
    linears, others = module_names(config)
    assignment = recipe.assign(linears, others)
    fmt = choose_format((c for c in assignment.values() if c is not None), name)
    check_layout(fmt, assignment)
    return fmt, assignment


def check_target(fmt: QuantFormat, out: str | os.PathLike | None, overwrite: bool, config: LlamaConfig,
                 tokenizer_dir: str | os.PathLike | None, keep=()):
    """Refuse, before any work, a model the format cannot hold (its refuses_model: architecture, tokenizer) and an
    output its container cannot be written to (its check_output; not judged where `out` is None)."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    reason = fmt.refuses_model(config, tokenizer_dir)
    if reason is not None:
        raise QuantkitError(f"--format {fmt.name}: {reason}")
    if out is not None:
        fmt.check_output(Path(out), overwrite, keep)


def check_layout(fmt: QuantFormat, assignment: dict[str, QuantConfig | None]):
    """Refuse an assignment (decoder linear -> config, None for full precision) the format cannot hold; log what
    it would cost in the runtimes that serve the format (layout_warnings)."""
    configs = {name: c for name, c in assignment.items() if c is not None}
    ignored = [name for name, c in assignment.items() if c is None]
    reason = fmt.refuses_layout(configs, ignored)
    if reason is not None:
        raise QuantkitError(f"--format {fmt.name}: {reason}")
    for warning in fmt.layout_warnings(configs, ignored):
        log.warning("--format %s: %s", fmt.name, warning)


def _way_out(configs: list[QuantConfig], reason: str) -> str:
    """The formats that hold every config, or why none does; nothing where the reason already names one."""
    if "--format" in reason:
        return ""
    holding = [n for n in format_names() if get_format(n).refuses_configs(configs) is None]
    if holding:
        return f": use --format {', '.join(holding)}"
    if len(configs) > 1:
        each = "; ".join(f"{c.method}: {', '.join(formats_holding(c)) or 'none'}" for c in configs)
        return f": no format holds these methods together ({each}): split the recipe"
    return ""


@dataclass
class ExportRecord:
    """What was written, for config.json and the summary."""

    configs: dict[str, QuantConfig] = field(default_factory=dict)  # quantized module -> config
    ignored: list[str] = field(default_factory=list)  # linears kept in full precision
    linear_weights: int = 0  # weights of the decoder linears written, quantized or in full precision
    linear_bytes: int = 0  # bytes of their stored tensors (quant.record.bits_per_weight)
    tp_problem: str | None = None  # why the written modules cannot run the source's pretraining_tp (the first one)

    def bits_per_weight(self) -> float | None:
        return bits_per_weight(self.linear_bytes, self.linear_weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (configs as their to_dict()): what a resumable run keeps per finished layer."""
        return {"configs": {name: c.to_dict() for name, c in self.configs.items()}, "ignored": list(self.ignored),
                "linear_weights": self.linear_weights, "linear_bytes": self.linear_bytes,
                "tp_problem": self.tp_problem}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportRecord":
        return cls({name: QuantConfig.from_dict(c) for name, c in d["configs"].items()}, list(d["ignored"]),
                   d["linear_weights"], d["linear_bytes"], d["tp_problem"])

    def merge(self, other: "ExportRecord"):
        """Add what `other` recorded for modules written after these (the first tp_problem stays)."""
        self.configs.update(other.configs)
        self.ignored += other.ignored
        self.linear_weights += other.linear_weights
        self.linear_bytes += other.linear_bytes
        self.tp_problem = self.tp_problem if self.tp_problem is not None else other.tp_problem


def recorded_config(name: str, module: nn.Module) -> QuantConfig:
    """The config a quantized module was made with; an error for one loaded with a scheme no method has."""
    config = record_of(module).config
    if config is None:
        raise QuantkitError(f"{name}: loaded from a file whose scheme no quantkit method has: it cannot be re-exported")
    return config


def module_tensors(module: nn.Module, fmt: QuantFormat, record: ExportRecord, prefix: str = "",
                   skip: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(full name, tensor) for everything in `module`: quantized linears in the format, the rest as is.

    The rest is read from each module's own parameters and persistent buffers, never through
    state_dict() of a quantized module (bitsandbytes rebuilds its CPU-repacked state there, lossily).
    """
    quantized = dict(quantized_modules(module))
    for name, m in quantized.items():
        config = recorded_config(prefix + name, m)
        tensors = fmt.export_module(prefix + name, m)
        record.configs[prefix + name] = config
        record.linear_weights += m.out_features * m.in_features
        record.linear_bytes += _nbytes(tensors.values())
        yield from tensors.items()
    skip = set(skip)
    for name, m in module.named_modules():
        if name in quantized or any(name.startswith(q + ".") for q in quantized):
            continue
        if type(m) is nn.Linear and is_decoder_linear(prefix + name):
            record.ignored.append(prefix + name)
            record.linear_weights += m.weight.numel()
            record.linear_bytes += _nbytes(t for _, t in _own_tensors(m) if t is not None)
        for tensor_name, t in _own_tensors(m):
            full = f"{name}.{tensor_name}" if name else tensor_name
            if full not in skip and t is not None:
                yield prefix + full, t.detach()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
    d["quantkit"] = {"version": __version__, "format": fmt.name, "recipe": recipe}
    if record.tp_problem is not None:  # what quantkit (and transformers 4.x) can run; the source's value is kept
        d["pretraining_tp"] = 1
        d["quantkit"]["source_pretraining_tp"] = config.pretraining_tp
    return d


def shard_metadata(fmt: QuantFormat, recipe: dict[str, Any] | None) -> dict[str, str]:
    """quantkit's record in every shard's safetensors metadata (string values only)."""
    return {"quantkit_version": __version__, "quantkit_format": fmt.name,
            "quantkit_recipe": json.dumps(recipe)}


class ExportWriter:
    """Takes modules (a whole model or one decoder layer at a time) and sends their tensors to the format's sink."""

    def __init__(self, fmt: QuantFormat, sink, config: LlamaConfig | None = None):
        self.fmt, self.sink = fmt, sink
        self.record = ExportRecord()
        self.tp = config.pretraining_tp if config is not None else 1  # divides every dimension (checked on load)
        self.reports: list[LinearReport] = []  # per quantized linear, from its QuantRecord

    def write(self, module: nn.Module, prefix: str = "", skip: Iterable[str] = ()):
        for name, t in module_tensors(module, self.fmt, self.record, prefix=prefix, skip=skip):
            self.sink.add(name, t)
        self.reports += linear_reports(quantized_modules(module, prefix))
        if self.tp > 1 and self.record.tp_problem is None:
            self.record.tp_problem = next(filter(None, (slicing_problem(name, m, self.tp)
                                                        for name, m in quantized_modules(module, prefix))), None)

    def write_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]):
        """Tensors as they are (the embedding, final norm and lm_head of a streamed checkpoint)."""
        for name, t in tensors:
            self.sink.add(name, t)

    def add_written(self, record: ExportRecord, reports: Iterable[LinearReport]):
        """Take the record and reports of modules another writer exported, whose tensors come here through
        write_tensors (a layer checkpointed in a resumable run's work directory)."""
        self.record.merge(record)
        self.reports += list(reports)


@contextlib.contextmanager
def quantized_writer(out_dir: str | os.PathLike, fmt: QuantFormat, options: ExportOptions, config: LlamaConfig,
                     recipe: dict[str, Any] | None, dtype: torch.dtype, tokenizer_dir) -> Iterator[ExportWriter]:
    """The one write path: an ExportWriter into the format's atomic container (a directory, or one file), finished
    by the format when the block ends."""
    with fmt.container(Path(out_dir), options.overwrite, keep=[tokenizer_dir]) as tmp:
        sink = fmt.open_sink(tmp, options.max_shard_size, shard_metadata(fmt, recipe), config)
        writer = ExportWriter(fmt, sink, config)
        yield writer
        writer.sink.close()
        if writer.record.tp_problem is not None:
            log.warning("%s: config.json records pretraining_tp=1, not the source's %d: %s (pretraining_tp only "
                        "changes the float summation order; transformers 5 ignores it)", out_dir,
                        config.pretraining_tp, writer.record.tp_problem)
        config_json = quantized_config_json(config, fmt, writer.record, recipe, dtype)
        fmt.finish(tmp, config_json, tokenizer_dir, [asdict(r) for r in writer.reports])
        if tmp.is_dir():
            write_manifest(tmp)  # last: it covers every file the format wrote


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, options: ExportOptions | None = None,
                   tokenizer_dir: str | os.PathLike | None = None, **option_fields) -> Path:
    """Save a model quantized in memory by `quantkit.quantize` (or loaded by `quantkit.load`) in an export format.

    `options` (or its fields as keywords: format=, max_shard_size=, overwrite=) say how; see ExportOptions.
    """
    if options is not None and option_fields:
        raise QuantkitError(f"save_quantized: give options or {', '.join(option_fields)}, not both")
    options = options or ExportOptions(**option_fields)
    configs = {name: recorded_config(name, m) for name, m in quantized_modules(model)}
    fmt = choose_format(configs.values(), options.format)
    check_layout(fmt, {**{name: None for name, _ in decoder_linears(model)}, **configs})
    dtype = model.model.embed_tokens.weight.dtype
    if options.dtype is not None and parse_dtype(options.dtype, "dtype") != dtype:
        raise QuantkitError(f"save_quantized writes the model's tensors as they are ({dtype_name(dtype)}), not "
                            f"{options.dtype}: convert the model's unquantized tensors first")
    skip = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else getattr(model, "source_dir", None)
    recipe = getattr(model, "quant_recipe", None)
    check_target(fmt, out_dir, options.overwrite, model.config, tokenizer_dir, keep=[tokenizer_dir])
    with quantized_writer(out_dir, fmt, options, model.config, recipe, dtype, tokenizer_dir) as writer:
        writer.write(model, skip=skip)
    return Path(out_dir)
