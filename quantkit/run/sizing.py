"""The size of a quantize run's output and work directory, and the free-space check before it writes anything.

One home for the sizes that `quantkit quantize` (quantkit.run.pipeline: refused up front when OUT's filesystem cannot
hold the run) and `quantkit plan` (quantkit.plan.planner) both use. Sizes come from the real code, not from formulas kept
beside it: each distinct (config, format) pair quantizes and exports four small linears, and the bytes of their
tensors fit size = a*N*K + b*N + c*K + d exactly (packing, scales, zero points, g_idx, per-row statistics), which is
then evaluated at every real shape. The unquantized tensors are their element counts times the output dtype; the
rest of the output (config.json, tokenizer files, errors and manifest) is its real or typical size. Nothing here is
timed or measured in a child process: that is the planner's (quantkit.plan.planner), which a quantize run never imports.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantkit.backends import BACKENDS, QuantConfig, Recipe, needs_calibration, replace_linear
from quantkit.errors import QuantkitError
from quantkit.formats import QuantFormat
from quantkit.io.files import human_bytes, mount_point, nearest_existing
from quantkit.io.shards import parse_size
from quantkit.run.calibrator import CalibrationOptions, calibration_dtype
from quantkit.formats.reader import open_checkpoint
from quantkit.model.tokenizer import TOKENIZER_FILES
from quantkit.model.config import PRESETS, LlamaConfig, preset
from quantkit.model.layout import checkpoint_shapes, layer_index, layer_shapes, linear_of
from quantkit.run.workdir import work_dir_of

PROBE_ROWS = (256, 512)  # output rows of the size probes; the input columns are multiples of the group
TOKENIZER_BYTES = 2_400_000  # Llama 2's tokenizer.model, tokenizer.json and configs (a preset has no files)
CONFIG_BYTES = 4_000  # a quantized config.json (model config, quantization_config, quantkit's recipe)
ERROR_ROW_BYTES = 150  # one linear's row in quantkit_errors.json
MANIFEST_ROW_BYTES = 120  # one file's entry in quantkit_manifest.json
HEADER_BYTES = 72  # a safetensors header entry, besides the tensor's name
TOKENS = 64  # tokens of the probes' observer statistics (and of the planner's timed passes)


@dataclass
class Source:
    """What a plan knows of the model: a checkpoint directory's config and shapes, or a preset's (no tensors)."""

    name: str
    config: LlamaConfig
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, as in the checkpoint
    stored_dtype: torch.dtype  # a preset: float16
    dir: Path | None = None

    @classmethod
    def of(cls, model: str | os.PathLike) -> "Source":
        if str(model) in PRESETS and not Path(model).exists():
            config = preset(str(model))
            return cls(str(model), config, checkpoint_shapes(config), torch.float16)
        ckpt = open_checkpoint(model)
        return cls.of_checkpoint(ckpt)

    @classmethod
    def of_checkpoint(cls, ckpt) -> "Source":
        if ckpt.quantization_config:
            raise QuantkitError(f"{ckpt.dir / 'config.json'}: the source is already quantized: start from the "
                                f"fp16/bf16 checkpoint")
        return cls(str(ckpt.dir), ckpt.config, dict(ckpt.shapes), ckpt.stored_dtype, ckpt.dir)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Every decoder linear's (N out, K in), by module name."""
        return {linear_of(name): shape for name, shape in self.shapes.items()
                if name.endswith(".weight") and linear_of(name) is not None}

    def layer_numel(self) -> int:
        return sum(math.prod(s) for s in layer_shapes(self.config).values())


# -- output size ----------------------------------------------------------------------------------

def probe_linear(n: int, k: int, bias: bool, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Linear:
    linear = nn.Linear(k, n, bias=bias, dtype=dtype, device=device).requires_grad_(False)
    nn.init.normal_(linear.weight, std=0.02)
    return linear


def quantize_probe(config: QuantConfig, linear: nn.Linear, name: str = "probe") -> nn.Module:
    """`linear` quantized through its backend exactly as the pipeline does (observer statistics from random inputs)."""
    backend = BACKENDS.for_config(config)
    stats = {}
    if backend.observer is not None:
        observer = backend.observer(linear, config)
        observer.add(torch.randn(TOKENS, linear.in_features, device=linear.weight.device))
        stats = observer.handler_kwargs()
    holder = nn.ModuleDict({"linear": linear})
    return replace_linear(holder, "linear", name, config, **stats)


def _exported_bytes(fmt: QuantFormat, config: QuantConfig, n: int, k: int, bias: bool, dtype: torch.dtype):
    """(bytes, header bytes) of one quantized (n, k) linear as `fmt` writes it."""
    tensors = fmt.export_module("probe", quantize_probe(config, probe_linear(n, k, bias, dtype)))
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return data, sum(len(name) - len("probe") + HEADER_BYTES for name in tensors)


def column_unit(config: QuantConfig) -> int:
    """Input columns every probe is a multiple of: the group and block sizes, and 256 for bit packing."""
    unit = 256
    for key in ("group_size", "blocksize"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            unit = math.lcm(unit, value)
    return unit


@dataclass
class LinearSize:
    """Bytes of one quantized linear as a function of its shape: a*N*K + b*N + c*K + d, fitted on four probes."""

    a: float
    b: float
    c: float
    d: float
    header: int  # safetensors header bytes of its tensors, besides the module name (counted per linear)
    tensors: int

    @classmethod
    def fit(cls, fmt: QuantFormat, config: QuantConfig, bias: bool, dtype: torch.dtype) -> "LinearSize":
        (n1, n2), k1 = PROBE_ROWS, column_unit(config)
        k2 = 2 * k1
        s11, header = _exported_bytes(fmt, config, n1, k1, bias, dtype)
        s21, s12, s22 = (_exported_bytes(fmt, config, n, k, bias, dtype)[0] for n, k in ((n2, k1), (n1, k2), (n2, k2)))
        a = (s22 - s21 - s12 + s11) / ((n2 - n1) * (k2 - k1))
        b = (s21 - s11) / (n2 - n1) - a * k1
        c = (s12 - s11) / (k2 - k1) - a * n1
        tensors = len(fmt.export_module("probe", quantize_probe(config, probe_linear(n1, k1, bias, dtype))))
        return cls(a, b, c, s11 - a * n1 * k1 - b * n1 - c * k1, header, tensors)

    def bytes(self, n: int, k: int) -> int:
        return round(self.a * n * k + self.b * n + self.c * k + self.d)


@dataclass
class OutputSize:
    """Bytes of the output directory, in parts."""

    quantized: int = 0  # the quantized linears' tensors
    dense: int = 0  # everything else, in the output dtype (embedding, norms, lm_head, ignored linears)
    headers: int = 0  # safetensors headers
    files: int = 0  # config.json, tokenizer files, quantkit_errors.json, the manifest
    linear_weights: int = 0  # the decoder linears' weights, quantized or not
    linear_bytes: int = 0  # their bytes (quant.record.bits_per_weight)
    quantized_per_layer: dict[int, int] = field(default_factory=dict)  # layer -> its quantized bytes

    @property
    def tensors(self) -> int:
        return self.quantized + self.dense + self.headers

    @property
    def total(self) -> int:
        return self.tensors + self.files


def _tokenizer_bytes(source: Source) -> int:
    if source.dir is None:
        return TOKENIZER_BYTES
    return sum((source.dir / f).stat().st_size for f in TOKENIZER_FILES if (source.dir / f).is_file())


def output_size(source: Source, recipe: Recipe, fmt: QuantFormat, dtype: torch.dtype) -> OutputSize:
    """The output's bytes: each quantized linear from its config's fitted size, the rest in `dtype`."""
    fits: dict[tuple[str, bool], LinearSize] = {}
    size, quantized_names = OutputSize(), set()
    for module, (n, k) in source.linears().items():
        config = recipe.config_for(module)
        if config is None:
            continue
        bias = f"{module}.bias" in source.shapes
        key = (config, bias)
        if key not in fits:
            fits[key] = LinearSize.fit(fmt, config, bias, dtype)
        fit, nbytes = fits[key], fits[key].bytes(n, k)
        size.quantized += nbytes
        size.headers += fit.tensors * len(module) + fit.header
        size.quantized_per_layer[layer_index(module)] = size.quantized_per_layer.get(layer_index(module), 0) + nbytes
        quantized_names |= {f"{module}.weight", f"{module}.bias"}
    dense = [(name, shape) for name, shape in source.shapes.items() if name not in quantized_names]
    size.dense = sum(math.prod(shape) for _, shape in dense) * dtype.itemsize
    size.linear_weights = sum(n * k for n, k in source.linears().values())
    size.linear_bytes = size.quantized + sum(math.prod(shape) for name, shape in dense
                                             if linear_of(name) is not None) * dtype.itemsize
    size.headers += sum(len(name) + HEADER_BYTES for name, _ in dense)
    files = CONFIG_BYTES + _tokenizer_bytes(source) + ERROR_ROW_BYTES * len(quantized_names) // 2
    size.files = files + MANIFEST_ROW_BYTES * (len(TOKENIZER_FILES) + 4 + size.tensors // (5 << 30))
    return size


# -- disk -----------------------------------------------------------------------------------------

@dataclass
class DiskPlan:
    """Bytes on OUT's filesystem at the peak of a run: the output, and the work directory beside it."""

    output: int
    work: int  # the finished layers and non-layer tensors, plus the calibration activations written twice
    activations: int  # one copy of the calibration activations (0 for uncalibrated methods)
    already_done: int = 0  # bytes a resumed run finds in the work directory already

    @property
    def needed(self) -> int:
        return max(self.output + self.work - self.already_done, 0)


def activation_bytes(config: LlamaConfig, calibration: CalibrationOptions, calib_dtype: torch.dtype) -> int:
    """The calibration activations (n_samples, seq_len, hidden) in the calibration dtype."""
    return calibration.n_samples * calibration.seq_len * config.hidden_size * calib_dtype.itemsize


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_plan(output: OutputSize, activations: int, out_dir: str | os.PathLike | None = None) -> DiskPlan:
    already = _dir_bytes(work_dir_of(out_dir)) if out_dir is not None else 0
    return DiskPlan(output.total, output.tensors + 2 * activations, activations, already)


def free_space(out_dir: str | os.PathLike) -> tuple[int, Path]:
    """(free bytes, mount point) of the filesystem OUT would be written to (its nearest existing parent)."""
    where = nearest_existing(Path(out_dir).absolute().parent)
    return shutil.disk_usage(where).free, mount_point(where)


def output_needed(ckpt, recipe: Recipe, fmt: QuantFormat, dtype: torch.dtype, max_shard_size: int | str) -> int:
    """Bytes the output of checkpoint `ckpt` takes at its peak (a full disk's message): its size (output_size)
    plus one shard, which ShardWriter holds twice (spool and shard file) while it closes it."""
    total = output_size(Source.of_checkpoint(ckpt), recipe, fmt, dtype).total
    return total + min(parse_size(max_shard_size), total)


def check_free_space(out_dir: str | os.PathLike, ckpt, recipe: Recipe, fmt: QuantFormat, dtype: torch.dtype,
                     calibration: CalibrationOptions | None = None) -> DiskPlan:
    """Refuse (one line) a run of checkpoint `ckpt` whose output and work directory cannot fit in the free space
    of OUT's filesystem; the sizes only, nothing is timed. A resumed run's finished layers count as written."""
    source, activations = Source.of_checkpoint(ckpt), 0
    if calibration is not None and needs_calibration(recipe):
        calib = calibration_dtype(calibration.dtype, source.stored_dtype, calibration.device, dtype)
        activations = activation_bytes(source.config, calibration, calib)
    disk = disk_plan(output_size(source, recipe, fmt, dtype), activations, out_dir)
    free, mount = free_space(out_dir)
    if disk.needed > free:
        raise QuantkitError(f"{out_dir}: needs about {human_bytes(disk.needed)} (output {human_bytes(disk.output)} + work directory "
                            f"{human_bytes(max(disk.work - disk.already_done, 0))}), {human_bytes(free)} free on {mount}: free "
                            f"space or choose another output")
    return disk
