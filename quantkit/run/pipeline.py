"""Streaming quantization of a checkpoint: one decoder layer in memory at a time.

read layer i (memory-mapped, only its tensors) -> quantize its linears -> checkpoint its exported
tensors in the run's work directory (quantkit.run.workdir) -> free it; at the end the output is assembled
from the work directory into an atomic directory. Peak memory is about one layer, whatever the number
of layers: this is what lets 70B (80 layers of ~1.7 GB in fp16) be quantized on a 32 GB machine. Peak
disk is about twice the output (the work directory and the assembled output), plus for calibrated
methods the activations file twice. A run that stops after a layer finished (Ctrl-C, SIGTERM, a crash,
a full disk; SIGKILL too) keeps the work directory, and `resume=True` continues it.

Under torchrun (`torchrun --nproc-per-node N -m quantkit quantize ...`, quantkit/dist.py) calibrated recipes run
data-parallel: every rank reads each layer and calibrates it on its block of the samples (quantkit/run/calibrator.py),
and rank 0 alone writes the work directory (the activations gathered from every rank), the output and the progress;
every step that can fail on one rank is collective, so all ranks stop together, and `resume=True` continues (rank 0
sends each rank its block of the saved activations; the fingerprint holds the number of ranks).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

import quantkit.dist as dist
from quantkit.backends import QuantConfig, Recipe, needs_calibration, quantize, runnable_recipe
from quantkit.dtypes import dtype_name, parse_dtype
from quantkit.errors import QuantkitError
from quantkit.run.export import ExportOptions, ExportWriter, check_target, planned_format, quantized_writer
from quantkit.io.files import DiskFull, Terminated, terminate_as_exception
from quantkit.run.calibrator import CalibrationOptions, LayerCalibrator, calibration_tensor, data_parallel_problem
from quantkit.formats.reader import open_checkpoint
from quantkit.model.layout import layer_prefix
from quantkit.run.sizing import check_free_space, output_needed
from quantkit.run.timing import PhaseTimes
from quantkit.run.workdir import NON_LAYER, WorkDir, fingerprint, layer_unit, work_dir_of

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
    bits_per_weight: float | None  # quant.record.bits_per_weight: the decoder linears' stored bits per weight
    seconds: float
    errors: list = field(default_factory=list)  # per quantized linear: name, method, relative_error, kind, dead_inputs
    seconds_per_layer: float | None = None  # the layers quantized in this run (not those a --resume found done)
    phases: dict = field(default_factory=dict)  # seconds by phase over the run: read, forward, statistics,
    #                                             transform, quantize, write (the layers), assemble (the output)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_checkpoint(src: str | os.PathLike, config: QuantConfig | Recipe, out_dir: str | os.PathLike,
                        export: ExportOptions | None = None, calibration=None, ignore: tuple[str, ...] = (),
                        progress: bool = True, resume: bool = False, keep_work: bool = True) -> QuantizeSummary:
    """Quantize the checkpoint at `src` layer by layer into `out_dir` in an export format.

    export: ExportOptions (format, dtype of what stays unquantized, shard size, overwrite).
    calibration: for calibrated methods (gptq), CalibrationOptions, or just its source (a LongTensor
    (n, seq_len) of token ids, a dataset name or a file), sampled with the default options.
    Each finished layer is kept in a work directory beside out_dir (quantkit.run.workdir). resume: continue a
    previous run to out_dir after its last finished layer (refused, naming what changed, if the source,
    recipe, options, calibration or environment differ; with no previous run, start normally); without it
    a previous run's work directory is refused unless export.overwrite, which discards it. keep_work: keep
    the work directory when the run stops (KeyboardInterrupt, Terminated, a full disk, an unexpected error; not a
    QuantkitError, whose fix changes the fingerprint) after a
    layer finished; the exception's message says so.
    Raises QuantkitError for a bad source, recipe or format before any layer is read. Under torchrun every rank
    calls it (calibrated recipes only) and rank 0 alone writes and returns the summary: None on the others.
    """
    start = time.perf_counter()
    export, calibration = export or ExportOptions(), CalibrationOptions.of(calibration)
    ckpt = open_checkpoint(src)
    if ckpt.quantization_config:
        raise QuantkitError(f"{ckpt.dir / 'config.json'}: the source is already quantized "
                            f"({ckpt.quantization_config.get('quant_method')}): start from the fp16/bf16 checkpoint")
    if resume and not export.overwrite and Path(out_dir).exists() and not work_dir_of(out_dir).exists():
        raise QuantkitError(f"{out_dir}: already complete, and no interrupted run is left beside it: nothing to "
                            f"--resume (pass --force without --resume to quantize it again)")
    recipe = runnable_recipe(config, ignore, calibrated=calibration is not None)  # checked before any work
    _check_world(recipe, calibration)
    fmt, _ = planned_format(recipe, ckpt.config, export.format)  # patterns, format and layout: before any work
    check_target(fmt, out_dir, export.overwrite, ckpt.config, ckpt.dir, keep=[ckpt.dir])  # the output, too
    dtype = parse_dtype(export.dtype, "--dtype") or ckpt.output_dtype()  # never a silent cast of the source
    recipe_dict = recipe.to_dict()
    work = WorkDir(out_dir, ckpt.config.num_hidden_layers)
    main = dist.is_main()  # under torchrun rank 0 alone reads and writes the work directory and the output

    def prepare():
        work.check(resume, export.overwrite)  # a previous run's layers: refused, kept or discarded, before any work
        check_free_space(out_dir, ckpt, recipe, fmt, dtype, calibration)  # output + work dir must fit: refused now
    dist.collective(prepare if main else lambda: None)
    calibrator = tokens = calib_dtype = None
    if needs_calibration(recipe):
        calib_dtype = calibration.compute_dtype(ckpt, dtype)  # refused here if it could overflow or round the layers
        tokens = dist.broadcast_from_main(dist.collective(  # sampled once: the same tokens on every rank
            lambda: calibration_tensor(calibration, ckpt) if main else None))
        calibrator = dist.collective(lambda: LayerCalibrator(
            ckpt.config, tokens, ckpt.tensor("model.embed_tokens.weight", dtype), recipe, calibration.batch_size,
            calibration.device, progress, calib_dtype, offload=calibration.offload_activations))
    export_fields = {"format": fmt.name, "dtype": dtype_name(dtype), "max_shard_size": export.max_shard_size}
    run_print = fingerprint(ckpt, recipe_dict, export_fields, calibration if calibrator else None, tokens, calib_dtype)
    dist.collective(lambda: work.begin(run_print) if main else None)
    work.state = dist.broadcast_from_main(work.state)  # every rank continues after rank 0's finished layers
    if not main:
        _checkpoint_layers(ckpt, recipe, fmt, dtype, work, calibrator, progress=False)
        return None
    try:
        with terminate_as_exception():  # SIGTERM anywhere in the run: Terminated, so that the cleanup below runs
            resumed_at = work.done
            times = _checkpoint_layers(ckpt, recipe, fmt, dtype, work, calibrator, progress)
            layers_run = work.done - resumed_at  # before work.remove() forgets them
            with times("assemble"), quantized_writer(out_dir, fmt, export, ckpt.config, recipe_dict, dtype,
                                                     ckpt.dir) as writer:
                work.assemble(writer, progress)
    except BaseException as e:
        raise _stopped(e, work, keep_work,
                       lambda: output_needed(ckpt, recipe, fmt, dtype, export.max_shard_size)) from None
    work.remove()
    before = sum(torch.Size(s).numel() for s in ckpt.shapes.values()) * ckpt.output_dtype().itemsize
    return QuantizeSummary(source=str(ckpt.dir), output=str(out_dir), format=fmt.name, recipe=recipe_dict,
                           layers=ckpt.config.num_hidden_layers, bytes_before=before,
                           bytes_after=writer.sink.total_size, bits_per_weight=writer.record.bits_per_weight(),
                           seconds=time.perf_counter() - start, errors=[asdict(r) for r in writer.reports],
                           seconds_per_layer=_per_layer(times, layers_run), phases=times.rounded())


def _check_world(recipe: Recipe, calibration: CalibrationOptions | None):
    """Under torchrun: refuse, before any work, what cannot be shared out over the ranks (data_parallel_problem)."""
    source = getattr(calibration, "source", None)
    n = source.shape[0] if isinstance(source, torch.Tensor) else getattr(calibration, "n_samples", 0)
    problem = data_parallel_problem(recipe, n, getattr(calibration, "batch_size", 1))
    if problem:
        raise QuantkitError(problem)


def _per_layer(times: PhaseTimes, layers: int) -> float | None:
    layer_phases = sum(s for phase, s in times.seconds.items() if phase != "assemble")
    return round(layer_phases / layers, 3) if layers else None


def _checkpoint_layers(ckpt, recipe: Recipe, fmt, dtype: torch.dtype, work: WorkDir,
                       calibrator: LayerCalibrator | None, progress: bool) -> PhaseTimes:
    """The non-layer tensors and each decoder layer the work directory does not hold yet: read, quantize, keep.
    Returns the seconds by phase (the calibrator's included)."""
    n, main = ckpt.config.num_hidden_layers, dist.is_main()
    times = calibrator.times if calibrator is not None else PhaseTimes()
    writer_of = lambda sink: ExportWriter(fmt, sink, ckpt.config)  # noqa: E731
    if not work.has_non_layer:
        write = partial(_write_non_layer, ckpt, dtype, work, writer_of)
        dist.collective(write if main else lambda: None)  # the ranks other than 0 write nothing
    if calibrator is not None and 0 < work.done < n:
        calibrator.load_activations(work.activations() if main else None)
    for index in tqdm(range(work.done, n), desc="quantize", unit="layer", initial=work.done, total=n,
                      disable=not progress or not main):
        prefix = layer_prefix(index)
        with times("read"):
            layer = ckpt.layer_module(index, dtype)
        if calibrator:
            layer = calibrator.step(layer, prefix).cpu()
        else:
            with times("quantize"):
                layer = quantize(layer, recipe, prefix=prefix)
        with times("write"):
            save = calibrator.activations_saver() if calibrator and index + 1 < n else None  # gathered on rank 0
            write = partial(_write_layer, work, writer_of, layer, index, save)
            dist.collective(write if main else lambda: None)  # a full disk on rank 0 stops every rank
            del save, write
        del layer  # the next layer replaces it: memory stays at one layer
    return times


def _write_non_layer(ckpt, dtype: torch.dtype, work: WorkDir, writer_of):
    unit = work.write_unit(NON_LAYER, writer_of,
                           lambda writer: writer.write_tensors(ckpt.read(ckpt.non_layer_names(), dtype)))
    work.finish_non_layer(unit)


def _write_layer(work: WorkDir, writer_of, layer, index: int, save):
    """Keep the finished layer `index` in the work directory (and, `save`, the activations after it)."""
    unit = work.write_unit(layer_unit(index), writer_of, lambda writer: writer.write(layer, prefix=layer_prefix(index)))
    work.finish_layer(unit, save)


def _stopped(e: BaseException, work: WorkDir, keep_work: bool, needed) -> BaseException:
    """The exception to raise for a run stopped by `e`, once the work directory is kept or removed (`needed`:
    sizing.output_needed, for a full disk). Kept (with keep_work) after an interruption, a full disk or an
    unexpected error (on any torchrun rank); removed after a QuantkitError, whose fix always changes what the
    fingerprint covers."""
    if isinstance(e, DiskFull):  # the temporary is gone; say how much the whole output needs
        on_disk, total = work.size() + e.written, needed()
        fix = f"free space or choose another output (-o); stopped {work.stopped(keep_work)}"
        return DiskFull(work.out, on_disk, total, fix=fix)
    if isinstance(e, QuantkitError) and not isinstance(e, dist.RankFailed):
        work.stopped(keep=False)  # bad input: its fix (another source, recipe or option) could not resume
        return e
    kept = work.stopped(keep_work)
    if isinstance(e, Terminated):
        return Terminated(f"{work.out}: terminated by SIGTERM {kept}")
    if isinstance(e, KeyboardInterrupt):
        return KeyboardInterrupt(f"{work.out}: interrupted (Ctrl-C) {kept}")
    log.error("%s: the run failed %s", work.out, kept)
    return e  # another rank's unexpected error (dist.RankFailed) is one line
