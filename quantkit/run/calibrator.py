"""Calibrated quantization, one decoder layer at a time: the orchestration around the backends' observers.

The calibration tokens are embedded once; then for each decoder layer, in order, first

  layer transform  backends that rewrite the whole layer before any of it is quantized (activation-aware
             scaling: AWQ's four pairs, quantkit.model.layout.SCALING_PAIRS, folded with
             quantkit.quant.scaling.fold_scales) do so, seeing every group's inputs and the attention and
             MLP blocks to run on them (LayerContext);

and then inside it for each sequential group (true-sequential: q/k/v -> o -> gate/up -> down, as GPTQ's
llama.py), four phases:

  collect    each target linear's observer (its backend's: GPTQ's Hessian, activation magnitudes, ...;
             one for linears that read the same input where the statistic depends on it alone; statistics
             `merge`, so samples can be split and reduced) sees that linear's inputs: the group's stage of the layer's forward (quantkit/run/stages.py:
             each stage computed once and again only after a group it depends on is quantized), or with
             true_sequential off one full forward pass;
  transform  backends that rewrite a group before quantizing it (activation-aware scaling: rescale
             the preceding norm or linear and the group's linears) do so, with the statistics;
  quantize   every target linear of the group is swapped for its quantized module, the handler
             receiving its observer's statistics (later groups thus see the quantized earlier ones);
and once per layer:
  advance    the quantized layer's outputs (from the kept residual stream): the next layer's inputs.

So layer i is calibrated on the outputs of the already-quantized layers before it. Only one layer's
weights, the activations (n, T, hidden) and one group's statistics are in memory at a time.

Under torchrun (quantkit/dist.py) the phases are data-parallel, as llm-compressor's: each rank holds a contiguous
block of the calibration batches (`dist.block`: one process's batches, the same samples in each) and pushes them through
the layer, keeping what each observer is fed; the observers are then fed those inputs rank after rank
(`dist.chained`), in one process's order, so that their statistics (GPTQ's running-mean Hessian) are one process's bit
for bit: a statistic merged from partial sums differs in its last bits, and GPTQ's error feedback turns that into
different grid values (12% of the demo model's). Each target linear is solved on one owner rank (`dist.owners`, by
cost) and broadcast, so that every rank advances its own samples through the same quantized layer. Every phase is
`dist.collective`: an error on one rank (non-finite activations, a bad Hessian) ends every rank with its message.
Transforms that search on the samples themselves (AWQ) run in one process only (`data_parallel_problem`).

A layer computes in the calibration dtype (`calibration_dtype`: never one with a smaller range than
the checkpoint's), cast once per step; its quantized modules are built in the export dtype and the
rest of it is cast back before it is written, so the exported tensors do not depend on it. Every
pass's outputs are checked finite: an overflow is named (layer, where in it, dtype) where it happens.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

import quantkit.dist as dist
from quantkit.calibrate.sources import SEQ_LEN
from quantkit.backends import BACKENDS, QuantConfig, Recipe, check_finite, needs_calibration, replace_linear
from quantkit.dtypes import dtype_name, parse_dtype, short_name
from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.build import check_device
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import SEQUENTIAL_GROUPS, group_of, layer_prefix, module_names
from quantkit.model.llama import rotary_embedding
from quantkit.quant.record import LinearReport, linear_reports, record_of
from quantkit.quant.surgery import quantized_modules, set_module
from quantkit.run.stages import LayerStages, first_nonfinite
from quantkit.run.timing import PhaseTimes

log = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    """Where calibration data comes from and how a layer is calibrated (the CLI's --calib ... --device).

    `source`: a LongTensor (n, seq_len) of token ids, or anything quantkit.calibrate reads (wikitext2,
    c4, ptb, a text/jsonl/parquet/csv file, a saved dataset, a .pt/.safetensors token tensor, a list of
    strings), sampled into n_samples windows of seq_len tokens with `seed` (`mode`, `text_field`: see
    quantkit.calibrate). `batch_size` windows go through a layer at once, on `device`, computing in
    `dtype` (the CLI's --calib-dtype; None: auto, see `calibration_dtype`). `offload_activations`: the
    activations (n, seq_len, hidden) and the kept stages live in CPU memory and each batch moves to `device` when
    used (what a 70B layer on one 24 GB GPU needs); the same results.
    """

    source: Any = None
    n_samples: int = 128
    seq_len: int = SEQ_LEN
    seed: int = 0
    mode: str | None = None
    text_field: str = "text"
    batch_size: int = 8
    device: str = "cpu"
    dtype: str | torch.dtype | None = None
    offload_activations: bool = False

    def __post_init__(self):
        from quantkit.calibrate.sampling import check_sizes

        check_sizes(self.n_samples, self.seq_len, self.mode)  # refused before anything is read (plan, quantize)
        if self.batch_size < 1:
            raise QuantkitError(f"batch_size={self.batch_size}: calibration needs at least one window a batch")

    @classmethod
    def of(cls, calibration) -> "CalibrationOptions | None":
        """Options as given, or the defaults around a bare source (a tensor, a path, a dataset name)."""
        if calibration is None or isinstance(calibration, CalibrationOptions):
            return calibration
        return cls(source=calibration)

    def compute_dtype(self, ckpt: Checkpoint, export: torch.dtype | None = None) -> torch.dtype:
        """The dtype `ckpt`'s layers, written in `export` (default: its own), calibrate in: calibration_dtype."""
        return calibration_dtype(self.dtype, ckpt.stored_dtype, self.device, export)


def _exponent_range(dtype: torch.dtype) -> int:
    """log2 of the dtype's largest finite value, rounded up: float16 16, bfloat16 and float32 128."""
    return math.frexp(torch.finfo(dtype).max)[1]


def calibration_dtype(requested: str | torch.dtype | None, source: torch.dtype, device: str | torch.device = "cpu",
                      export: torch.dtype | None = None, whose: str = "the checkpoint's") -> torch.dtype:
    """The dtype layers are calibrated in: `requested`, or auto. `source`: the weights' stored dtype; `export`:
    the dtype the layers are read and written in (default: `source`).

    Never one with a smaller range than `source`'s, and only `export` itself or float32, which hold the
    layer's values exactly (another would round the norms and weights that are written). Auto: float32 on
    CPU (fp16 matmuls there are ~5x slower than fp32 and overflow at 65504; bf16 has fewer mantissa bits);
    on CUDA the source's own dtype where it is the export dtype (an fp16 checkpoint calibrates in fp16).
    """
    export = export or source
    dtype = parse_dtype(requested, "--calib-dtype")
    if dtype is None:
        return source if check_device(device).type == "cuda" and source == export else torch.float32
    if _exponent_range(dtype) < _exponent_range(source):
        raise QuantkitError(f"--calib-dtype {short_name(dtype)}: {dtype_name(dtype)}'s range "
                            f"({torch.finfo(dtype).max:g}) is smaller than {whose} {dtype_name(source)} "
                            f"({torch.finfo(source).max:g}), so calibration could overflow: use --calib-dtype "
                            f"{short_name(torch.float32)} or leave it out (auto)")
    if dtype not in (export, torch.float32):
        raise QuantkitError(f"--calib-dtype {short_name(dtype)}: {dtype_name(dtype)} cannot hold the "
                            f"{dtype_name(export)} layers' values exactly, so the written norms and weights would "
                            f"change: use --calib-dtype {short_name(torch.float32)} or {short_name(export)}, "
                            f"or leave it out (auto)")
    return dtype


def activations_device(device: str | torch.device, offload: bool) -> torch.device:
    """Where the calibration activations and the kept stages live: CPU memory with --offload-activations, else the
    calibration device."""
    return torch.device("cpu") if offload else check_device(device)


def down_inputs_fit(nbytes: int, activations: int, where: torch.device, allocated: int = 0) -> bool:
    """Whether down_proj's inputs (n, T, intermediate: 2.7x the activations; `nbytes`) are kept for the advance,
    saving gate/up's second pass (quantkit/run/stages.py): when they and the two stages kept besides them (2 x
    `activations` bytes) take at most half of the memory free on `where` (the activations' device), less what is
    still to be `allocated` there (a plan: the activations and the layer). Either way the results are the same bytes."""
    free = torch.cuda.mem_get_info(where)[0] if where.type == "cuda" else psutil.virtual_memory().available
    return nbytes + 2 * activations <= (free - allocated) // 2


def nonfinite_cause(dtype: torch.dtype) -> str:
    """Why activations computed in `dtype` are not finite, given finite weights (checked first), and the fix."""
    if torch.finfo(dtype).bits < 32:
        return (f"its activations exceed {dtype_name(dtype)}'s range ({torch.finfo(dtype).max:g}): rerun with "
                f"--calib-dtype {short_name(torch.float32)}")
    return (f"non-finite activations in {dtype_name(dtype)}: the checkpoint's weights are damaged "
            f"(check them with quantkit eval)")


def _cast_full_precision(module: nn.Module, dtype: torch.dtype):
    """Cast the floating tensors of `module` to `dtype`, except inside quantized modules (built in the export dtype)."""
    if record_of(module) is not None:
        return
    module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)  # its own tensors only
    for child in module.children():
        _cast_full_precision(child, dtype)


@torch.no_grad()
def _overflow_site(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str:
    """Where in the decoder layer the batch x's activations first stop being finite (the layer at tp=1)."""
    finite: dict[str, bool] = {}  # in forward order: self_attn, its residual add, mlp

    def note(where: str, t: torch.Tensor):
        finite.setdefault(where, bool(torch.isfinite(t).all()))

    hooks = [layer.self_attn.register_forward_hook(lambda mod, args, out: note("self_attn", out)),
             layer.post_attention_layernorm.register_forward_hook(
                 lambda mod, args, out: note("the residual add after self_attn", args[0])),
             layer.mlp.register_forward_hook(lambda mod, args, out: note("mlp", out))]
    try:
        layer(x, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return next((where for where, ok in finite.items() if not ok), "the residual add after mlp")


def data_parallel_problem(recipe: Recipe, n_samples: int, batch_size: int, ranks: int | None = None) -> str | None:
    """Why this recipe's quantization cannot be shared out over `ranks` torchrun ranks (default: this world's; None
    where it can, or for one process): an uncalibrated recipe (no samples to share), transforms that search on the
    samples (AWQ's scales), or fewer calibration batches than ranks."""
    ranks = ranks or dist.world_size()
    if ranks <= 1:
        return None
    if not needs_calibration(recipe):
        return (f"{', '.join(sorted({c.method for c in recipe.configs()}))}: uncalibrated methods have no calibration "
                f"samples to share out over {ranks} torchrun ranks: run it in one process")
    rewriting = next((c for c in recipe.configs() if BACKENDS.for_config(c).rewrites_layers(c)), None)
    if rewriting is not None:
        return (f"method {rewriting.method}: its activation-aware search (AWQ) runs in one process: run it without "
                f"torchrun ({ranks} ranks)")
    if -(-n_samples // batch_size) < ranks:
        return (f"--n-samples {n_samples} in batches of {batch_size}: fewer calibration batches than the {ranks} "
                f"torchrun ranks, which share them out: use a smaller --calib-batch-size or fewer ranks")
    return None


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
                              mode=o.mode, text_field=o.text_field, vocab_size=vocab)


@dataclass
class GroupContext:
    """What a backend's transform sees of a sequential group, after collect and before quantize."""

    layer: nn.Module  # the decoder layer, still full precision in this group
    prefix: str  # 'model.layers.3.'
    names: tuple[str, ...]  # the group's target linears, names inside the layer ('mlp.gate_proj', ...)
    configs: dict[str, QuantConfig]  # target -> its config
    observers: dict[str, Any]  # target -> its observer (calibrated targets only)
    run: Callable[[], torch.Tensor] = field(repr=False)  # the layer on the current calibration inputs


@dataclass
class LayerContext:
    """What a backend's layer transform sees, once per layer before any of it is quantized (activation-aware
    scaling: it may rescale a norm or linear and the linears after it, quantkit.quant.scaling.fold_scales, along
    quantkit.model.layout.SCALING_PAIRS; the true-sequential groups are then calibrated on the rescaled layer)."""

    layer: nn.Module  # the decoder layer, full precision, computing in the calibration dtype
    prefix: str  # 'model.layers.3.'
    configs: dict[str, QuantConfig]  # the layer's target linears this backend quantizes -> their configs
    inputs: Callable[[tuple[str, ...]], Iterator[torch.Tensor]] = field(repr=False)  # a group's input batches,
    #                                                    streamed on the layer's device (down_proj's are 2.7x hidden)
    attention: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)  # self_attn on q/k/v's input batch
    mlp: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)  # the MLP on gate/up's input batch
    changed: Callable[[], None] = field(repr=False)  # after rewriting the layer: `inputs` then computes anew
    rescaled: Callable[[tuple[str, ...], torch.Tensor], None] = field(repr=False)  # after folding s into a group's
    #                         inputs (an exact rescaling): what `inputs` keeps of them follows, divided by s
    tokens: int = 0  # calibration tokens in all the batches (n_samples x seq_len)


class LayerCalibrator:
    """Holds the calibration activations (n, T, hidden) and walks them through the layers as they are quantized."""

    staged = True  # False: one full forward pass per true-sequential group instead (the same results, slower;
    #                tests and bench/bench_stages.py compare the two)

    def __init__(self, config: LlamaConfig, tokens: torch.Tensor, embed_weight: torch.Tensor, recipe: Recipe,
                 batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True,
                 dtype: torch.dtype | None = None, offload: bool = False):
        """`dtype`: what the layers compute in (None: calibration_dtype's auto for the embedding's dtype);
        `offload`: the activations live in CPU memory, each batch computed on `device` (CalibrationOptions)."""
        problem = data_parallel_problem(recipe, tokens.shape[0], batch_size)
        if problem:
            raise QuantkitError(problem)
        self.recipe, self.batch_size, self.device = recipe, batch_size, check_device(device)
        self.progress = progress and dist.is_main()
        self.store = activations_device(self.device, offload)
        self.samples = tokens.shape[0]  # over every rank; this rank holds the samples of its block of batches
        mine = sample_block(self.samples, batch_size)
        tokens = tokens[mine.start:mine.stop]
        self.dtype = dtype or calibration_dtype(None, embed_weight.dtype, self.device)
        # Looked up in the weight's dtype, then cast: exact, and no copy of the whole table in self.dtype.
        self.hidden = F.embedding(tokens.to(self.store), embed_weight.to(self.store)).to(self.dtype)  # (n, T, hidden)
        if not torch.isfinite(self.hidden).all():
            raise QuantkitError(f"the calibration tokens' embeddings are not finite in {dtype_name(self.dtype)}: "
                                f"{nonfinite_cause(self.dtype)}")
        positions = torch.arange(tokens.shape[1], device=self.device)[None]
        self.cos, self.sin = rotary_embedding(config, positions, self.hidden.dtype)  # (1, 1, T, D)
        self.true_sequential = all(getattr(c, "true_sequential", True) for c in recipe.configs())
        self.times = PhaseTimes(self.device)  # forward, statistics, transform, quantize: added up over the layers

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, 1, length, D) of the first `length` positions (a window's prefix: causal attention's outputs
        there are the whole window's)."""
        return self.cos[:, :, :length], self.sin[:, :, :length]

    @torch.no_grad()
    def _run(self, layer: nn.Module, prefix: str) -> torch.Tensor:
        """The layer's outputs (n, T, hidden) on the current inputs; a QuantkitError naming it where not finite."""
        batches = self.hidden.split(self.batch_size)
        outputs = [layer(x.to(self.device), self.cos, self.sin) for x in batches]
        first = first_nonfinite([torch.isfinite(y).all() for y in outputs])
        if first is not None:
            self._non_finite(layer, prefix, batches[first])
        return torch.cat([y.to(self.store) for y in outputs])

    def _non_finite(self, layer: nn.Module, prefix: str, x: torch.Tensor):
        """Raise for a pass whose outputs are not finite on the batch x, whose inputs are (checked a pass before)."""
        for name, p in layer.named_parameters():  # a damaged weight is named as such, whatever the dtype
            check_finite(prefix + name.removesuffix(".weight"), p)
        site = _overflow_site(layer, x.to(self.device), self.cos, self.sin)
        raise QuantkitError(f"{prefix.rstrip('.')}: calibration activations are not finite after {site} "
                            f"(computing in {dtype_name(self.dtype)}): {nonfinite_cause(self.dtype)}")

    def step(self, layer: nn.Module, prefix: str) -> nn.Module:
        """Quantize one decoder layer in place on the current activations, then advance them through it.

        The layer computes in self.dtype during the step and comes back in its own dtype (the export dtype).
        """
        export_dtype = layer.input_layernorm.weight.dtype  # norms are never quantized
        layer.to(self.device)
        _cast_full_precision(layer, self.dtype)  # once per layer: nothing is converted per forward pass
        # Observers hook the linears, which pretraining_tp's slicing bypasses: calibrate at tp=1.
        tp = layer.self_attn.pretraining_tp
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = 1
        with self.times("transform"):
            self.layer_transform(layer, prefix)
        stages = self.stages_of(layer, prefix) if self.true_sequential and self.staged else None
        groups = SEQUENTIAL_GROUPS if self.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
        bar = tqdm(groups, desc=prefix.rstrip("."), leave=False, disable=not self.progress)
        samples = self.hidden.shape[0]
        for names in bar:
            label = "/".join(n.rpartition(".")[2].removesuffix("_proj") for n in names)
            bar.set_postfix_str(label)
            configs = self._targets(layer, prefix, names)
            owner = owners(layer, configs)
            start = time.perf_counter()
            observers = dist.collective(
                lambda: self.collect(layer, prefix, configs, stages and (lambda names=names: stages.inputs(names))))
            with self.times("statistics"):
                observers = chained(observers, self.device, set(owner.values()))
            if observers:
                bar.set_postfix_str(f"{label}: {samples / max(time.perf_counter() - start, 1e-9):,.0f} samples/s")
            with self.times("transform"):
                if self.transform(layer, prefix, configs, observers) and stages:
                    stages.changed()
            with self.times("quantize"):
                self.quantize(layer, prefix, configs, observers, dtype=export_dtype, owner=owner)
            if stages:
                stages.changed(names)
        with self.times("forward"):
            self.hidden = dist.collective(lambda: stages.output() if stages else self._run(layer, prefix))
        layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = tp
        _cast_full_precision(layer, export_dtype)  # exact: the norms and ignored linears come back bit for bit
        return layer

    def stages_of(self, layer: nn.Module, prefix: str) -> LayerStages:
        """The layer's stages on the current inputs (quantkit/run/stages.py)."""
        def on_nonfinite(i: int):
            self._non_finite(layer, prefix, self.hidden.split(self.batch_size)[i])
        return LayerStages(layer, self.hidden, self.batch_size, self.cos, self.sin, on_nonfinite, self.device,
                           keep_down=self._down_inputs_fit(layer))

    def _down_inputs_fit(self, layer: nn.Module) -> bool:
        n, t, _ = self.hidden.shape
        down = n * t * layer.mlp.down_proj.in_features * self.hidden.element_size()
        return down_inputs_fit(down, self.hidden.numel() * self.hidden.element_size(), self.store)

    def layer_transform(self, layer: nn.Module, prefix: str):
        """Each backend with a layer transform rewrites the layer once, before any group is collected."""
        configs = self._targets(layer, prefix, sum(SEQUENTIAL_GROUPS, ()))
        backends = {b.name: b for b in map(BACKENDS.for_config, configs.values()) if b.layer_transform is not None}
        for backend in backends.values():
            stages = self.stages_of(layer, prefix)
            mine = {n: c for n, c in configs.items() if BACKENDS.for_config(c) is backend}
            backend.layer_transform(LayerContext(
                layer, prefix, mine, inputs=stages.inputs,
                attention=lambda a: layer.self_attn(a, *self.rotary(a.shape[1]), None, None), mlp=layer.mlp,
                changed=stages.changed, rescaled=stages.rescaled, tokens=self.hidden.shape[0] * self.hidden.shape[1]))

    def _targets(self, layer: nn.Module, prefix: str, names: tuple[str, ...]) -> dict[str, QuantConfig]:
        """The group's full-precision linears that the recipe quantizes, with their configs."""
        configs = {n: self.recipe.config_for(prefix + n) for n in names if type(layer.get_submodule(n)) is nn.Linear}
        return {n: c for n, c in configs.items() if c is not None}

    def collect(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig],
                inputs: Callable[[], Iterable[torch.Tensor]] | None = None) -> dict[str, Any]:
        """Feed each calibrated target's observer its inputs: the group's shared input batches from `inputs`
        (the staged forward), or else one forward pass of the layer with hooks; nothing runs if none needs it.

        Linears that read the same input (a true-sequential group's: q/k/v, gate/up) share one observer where its
        statistic depends on the inputs alone (`shared_by_inputs`: GPTQ's Hessian is computed once for q/k/v).
        Under torchrun each observer comes back as a Recorded, holding the batches it was fed (see `chained`)."""
        observers = self._observers(layer, configs)
        if dist.active():
            recorded = {id(o): Recorded(o, self.store) for o in dict.fromkeys(observers.values())}
            observers = {n: recorded[id(o)] for n, o in observers.items()}
        unique = list(dict.fromkeys(observers.values()))
        if unique and inputs is not None:
            batches = iter(inputs())
            while True:
                with self.times("forward"):
                    x = next(batches, None)
                if x is None:
                    return observers
                with self.times("statistics"):
                    for observer in unique:
                        observer.add(x)
        first = {id(o): n for n, o in reversed(observers.items())}  # one hook per observer, on its first linear
        hooks = [layer.get_submodule(n).register_forward_hook(lambda mod, args, out, o=observers[n]: o.add(args[0]))
                 for n in first.values()]
        try:
            if hooks:
                with self.times("forward"):  # the observers' statistics included
                    self._run(layer, prefix)
        finally:
            for hook in hooks:
                hook.remove()
        return observers

    @staticmethod
    def _observers(layer: nn.Module, configs: dict[str, QuantConfig]) -> dict[str, Any]:
        """Target -> its observer (calibrated targets only); targets in one of SEQUENTIAL_GROUPS (one input) with the
        same observer factory get the same observer where it is `shared_by_inputs`."""
        observers, shared = {}, {}
        for n, config in configs.items():
            make = BACKENDS.for_config(config).observer
            if make is None:
                continue
            key = (make, group_of(n))
            if key in shared:
                observers[n] = shared[key]
                continue
            observers[n] = make(layer.get_submodule(n), config)
            if getattr(observers[n], "shared_by_inputs", False):
                shared[key] = observers[n]
        return observers

    def transform(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig],
                  observers: dict[str, Any]) -> bool:
        """Each backend with a transform rewrites the group once, before any of it is quantized; whether any did."""
        backends = {b.name: b for b in map(BACKENDS.for_config, configs.values())}  # each backend once
        transforms = [b.transform for b in backends.values() if b.transform is not None]
        for transform in transforms:
            transform(GroupContext(layer, prefix, tuple(configs), configs, observers,
                                   run=lambda: self._run(layer, prefix)))
        return bool(transforms)

    def quantize(self, layer: nn.Module, prefix: str, configs: dict[str, QuantConfig], observers: dict[str, Any],
                 dtype: torch.dtype | None = None, owner: dict[str, int] | None = None):
        """Swap each target for its quantized module, built in `dtype` (the export dtype; None: the layer's).

        Under torchrun each target is solved on its `owner` rank (default: `owners`) and sent to the others; a rank
        holds the observers of the targets it owns."""
        names = list(configs)
        owner = owner or owners(layer, configs)

        def solve():
            for n in (n for n in names if owner[n] == dist.rank()):
                stats = observers[n].handler_kwargs() if n in observers else {}
                self._check_statistics(prefix + n, stats)
                replace_linear(layer, n, prefix + n, configs[n], dtype=dtype, **stats)
        dist.collective(solve)
        observers.clear()  # the statistics (GPTQ: one K x K Hessian each) are freed before the next group
        if dist.active():
            for n in names:
                mine = owner[n] == dist.rank()
                module = dist.broadcast_object(layer.get_submodule(n).cpu() if mine else None, src=owner[n])
                set_module(layer, n, module.to(self.device))

    def _check_statistics(self, name: str, stats: dict[str, Any]):
        """An observer's tensors (GPTQ's Hessian, ...) must be finite: a non-finite one is an overflow, named."""
        for key, value in stats.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise QuantkitError(f"{name}: its calibration statistic ({key}) is not finite (computing in "
                                    f"{dtype_name(self.dtype)}): {nonfinite_cause(self.dtype)}")

    def activations_saver(self) -> Callable[[Path], None] | None:
        """What writes the current activations (n, T, hidden: every rank's, in sample order) to a safetensors file,
        exactly (their dtype, on CPU): on rank 0, which gathers them; None on the other ranks (every rank calls it)."""
        hidden = dist.gather_blocks(self.hidden.cpu(), self._block_sizes())
        return None if hidden is None else lambda path: save_file({"hidden": hidden.contiguous()}, path)

    def _block_sizes(self) -> list[int]:
        """The number of samples each rank holds, in rank order."""
        return [len(sample_block(self.samples, self.batch_size, r)) for r in range(dist.world_size())]

    def load_activations(self, path: Path | None):
        """Continue from activations written by activations_saver's writer (a resumed run; under torchrun rank 0
        reads them, `path` None on the others, and sends each rank its block); they must match these in shape and
        dtype (the run's fingerprint makes sure they come from the same tokens and calibration dtype)."""
        shape, dtype = (self.samples, *self.hidden.shape[1:]), self.hidden.dtype
        self.hidden = None  # the embedded tokens are replaced: free them first

        def read() -> torch.Tensor | None:
            hidden = None if path is None else load_file(path)["hidden"]
            if hidden is not None and (tuple(hidden.shape) != shape or hidden.dtype != dtype):
                raise QuantkitError(f"{path}: activations {list(hidden.shape)} in {dtype_name(hidden.dtype)}, not "
                                    f"{list(shape)} in {dtype_name(dtype)}: the work directory is damaged: pass "
                                    f"--force to start over")
            return hidden
        like = torch.empty(0, *shape[1:], dtype=dtype)
        hidden = dist.scatter_blocks(dist.collective(read), self._block_sizes(), like)
        self.hidden = hidden.to(self.store)


def owners(layer: nn.Module, configs: dict[str, QuantConfig]) -> dict[str, int]:
    """The rank each target linear of a group is solved on under torchrun: dist.owners by the cost of GPTQ's column
    loop, N K^2 (0 everywhere in one process)."""
    weights = [layer.get_submodule(n).weight for n in configs]
    return dict(zip(configs, dist.owners([float(w.numel() * w.shape[-1]) for w in weights])))


def sample_block(n: int, batch_size: int, rank: int | None = None, ranks: int | None = None) -> range:
    """The calibration samples a torchrun rank holds (default: this one, of this world's ranks): those of its block
    of one process's batches of `batch_size` (dist.block), so every rank computes exactly one process's batches."""
    batches = dist.block(-(-n // batch_size), rank, ranks)
    return range(min(batches.start * batch_size, n), min(batches.stop * batch_size, n))


class Recorded:
    """Stands in for an observer on a torchrun rank during collect: keeps the batches (..., K) it is fed, where the
    activations live, for `chained` to feed the observer in one process's order."""

    def __init__(self, observer: Any, store: torch.device):
        self.observer, self.store, self.batches = observer, store, []

    def add(self, x: torch.Tensor):
        self.batches.append(x.to(self.store))


def chained(observers: dict[str, Any], device: torch.device, to: set[int]) -> dict[str, Any]:
    """Under torchrun: collect's Recorded stand-ins replaced by their observers fed every rank's batches on `device`,
    rank after rank (dist.chained: rank 0's observers, then rank 1 adds its batches to them, ...): one process's
    statistics bit for bit, on the ranks `to` (those that solve the group's linears; {} on the others). Linears that
    share an observer share it still. As is in one process."""
    if not dist.active():
        return observers
    recorded = list(dict.fromkeys(observers.values()))

    def feed(state: list[Any]) -> list[Any]:
        for observer, mine in zip(state, recorded):
            relocate(observer, device)
            for x in mine.batches:
                observer.add(x.to(device))
        return state
    total = dist.chained([r.observer for r in recorded], feed, to)
    if total is None:
        return {}
    by_recorded = dict(zip(map(id, recorded), [relocate(o, device) for o in total]))
    return {n: by_recorded[id(r)] for n, r in observers.items()}


def relocate(observer: Any, device: torch.device) -> Any:
    """The observer with its tensor attributes on `device` (one that was sent from another rank arrives on the
    sender's device); returns it."""
    for key, value in vars(observer).items():
        if isinstance(value, torch.Tensor):
            setattr(observer, key, value.to(device))
    return observer


def quantize_calibrated(model: nn.Module, config, tokens: torch.Tensor, ignore: tuple[str, ...] = (),
                        batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True,
                        dtype: str | torch.dtype | None = None, offload: bool = False) -> list[LinearReport]:
    """GPTQ (or any recipe with calibrated methods) of an in-memory model, in place; returns per-linear errors.

    `dtype`: what calibration computes in (None: auto; never a smaller range than the model's, see
    calibration_dtype); the model keeps its own dtype. `offload`: the activations live in CPU memory
    (CalibrationOptions.offload_activations).
    """
    from quantkit.backends import runnable_recipe

    recipe = runnable_recipe(config, ignore, calibrated=True)
    recipe.assign(*module_names(model.config))  # every pattern applies to some module: refused before any work
    weight = model.model.embed_tokens.weight
    compute = calibration_dtype(dtype, weight.dtype, device, whose="the model's")  # the model is source and export
    calibrator = dist.collective(lambda: LayerCalibrator(model.config, tokens, weight, recipe, batch_size, device,
                                                         progress, compute, offload))
    reports = []
    for index, layer in enumerate(tqdm(model.model.layers, desc="quantize", unit="layer", disable=not progress)):
        calibrator.step(layer, layer_prefix(index)).to(weight.device)
        reports += linear_reports(quantized_modules(layer, layer_prefix(index)))
    model.quant_recipe = recipe.to_dict()
    return reports
