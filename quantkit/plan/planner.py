"""Planning a quantize run before it starts: its peak memory, disk and time (`quantkit plan`).

Sizes (of the output and the work directory) come from quantkit.run.sizing, which quantize's free-space check uses
too; a quantize run never imports this module (its child-process memory probe, psutil and the timed passes).

Memory is a sum of named terms per phase of the pipeline (read a layer, quantize it, calibrate it,
advance the activations), the peak being the largest phase; the baseline is the RSS of a fresh process
that imported quantkit and quantized one small linear with the same configs. Time is measured on this
machine on real-shape linears (rows capped, so that a 70B plan stays short) and scaled by the weights,
tokens and layers of the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.backends import BACKENDS, QuantConfig, Recipe, needs_calibration, runnable_recipe
from quantkit.dtypes import parse_dtype
from quantkit.errors import QuantkitError
from quantkit.run.export import ExportOptions, check_target, planned_format
from quantkit.formats import QuantFormat
from quantkit.backends.gptq.solver import inverse_hessian_cholesky
from quantkit.io.files import check_output_dir, human_bytes, nearest_existing
from quantkit.run.calibrator import (CalibrationOptions, activations_device, calibration_dtype, data_parallel_problem,
                                     down_inputs_fit, sample_block)
from quantkit.run.stages import PASSES
from quantkit.model.build import check_device
from quantkit.model.layout import SEQUENTIAL_GROUPS, layer_index
from quantkit.quant.record import bits_per_weight
from quantkit.run.sizing import (PROBE_ROWS, TOKENS, OutputSize, Source, activation_bytes, column_unit, disk_plan,
                             free_space, output_size, probe_linear, quantize_probe)

log = logging.getLogger(__name__)

ROWS_BUDGET = 1 << 22  # weights of one timed linear: real K, rows capped (70B's gate_proj: 128 of 28672 rows)
SOLVE_ROWS, SOLVE_COLS = 1024, 2048  # the timed GPTQ solve's largest shape; larger ones are extrapolated
BANDWIDTH_PROBE = 64 << 20  # bytes written (and fsynced) to measure the disk's write bandwidth


# -- memory ---------------------------------------------------------------------------------------

BASELINE_CODE = "import sys; from quantkit.plan.planner import print_baseline; print_baseline(*sys.argv[1:])"


def print_baseline(recipe_json: str, format_name: str, device: str, n: str, k: str):
    """Print what a fresh quantize process holds before its first layer (bytes: quantkit imported, the CLI and the
    pipeline, each config's backend and the format tried on a small linear, on `device`), then the most extra
    memory (bytes per weight) any config's quantize + export of an (n, k) linear takes, rows capped."""
    import psutil

    import quantkit.cli  # noqa: F401  (what `quantkit quantize` imports)
    import quantkit.run.pipeline  # noqa: F401
    from quantkit.formats import get_format

    recipe, fmt, n, k = Recipe.from_dict(json.loads(recipe_json)), get_format(format_name), int(n), int(k)
    for config in recipe.configs():
        linear = probe_linear(PROBE_ROWS[0], column_unit(config), False, torch.float16, device)
        fmt.export_module("probe", quantize_probe(config, linear).cpu())
    k = min(k, 1024)  # the K x K terms (GPTQ's Hessian) are counted apart: measure what scales with N x K
    baseline, per_weight, rows = psutil.Process().memory_info().rss, 0.0, _rows(n, k)
    for config in recipe.configs():
        linear, before = probe_linear(rows, k, False, torch.float16, device), psutil.Process().memory_info().rss
        _reset_peak_rss()  # else a transient peak of the imports would be counted as the probe's
        fmt.export_module("probe", quantize_probe(config, linear).cpu())
        per_weight = max(per_weight, max(_peak_rss() - before, 0) / (rows * k))
    print(baseline, per_weight)


def _reset_peak_rss():
    """Reset this process's peak RSS (Linux >= 4.0: 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # not Linux: the peak then includes the imports' (an overestimate, logged)
        log.debug("cannot reset the peak RSS (%s): the working memory estimate may be high", e)


def _peak_rss() -> int:
    """This process's peak RSS in bytes since the last _reset_peak_rss (VmHWM), else since it started."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError as e:
        log.debug("cannot read /proc/self/status (%s): using ru_maxrss", e)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_baseline(recipe: Recipe, fmt: QuantFormat, device: torch.device, largest: tuple[int, int]):
    """(baseline RSS in bytes, bytes per weight of quantizing + exporting a linear, seconds the process took to start
    and try each config: a quantize's start-up), measured in a new process."""
    command = [sys.executable, "-c", BASELINE_CODE, json.dumps(recipe.to_dict()), fmt.name, str(device),
               *map(str, largest)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantkitError(f"measuring quantkit's baseline memory in a new process failed ({last}): rerun with -v")
    baseline, per_weight = done.stdout.strip().splitlines()[-1].split()
    return int(baseline), float(per_weight), seconds


@dataclass
class Memory:
    """Peak RAM and GPU memory (bytes): the largest phase, and each phase's named terms."""

    ram: int
    gpu: int
    ram_phases: dict[str, dict[str, int]]
    gpu_phases: dict[str, dict[str, int]]


def _peak(phases: dict[str, dict[str, int]]) -> int:
    return max((sum(terms.values()) for terms in phases.values()), default=0)


def largest_linear(source: Source) -> tuple[int, int]:
    return max(source.linears().values(), key=math.prod)


def _shape_terms(source: Source, output: OutputSize, dtype: torch.dtype, work_per_weight: float) -> dict[str, int]:
    """Sizes the phases share (bytes)."""
    c, (n, k) = source.config, largest_linear(source)
    non_layer = [math.prod(s) for name, s in source.shapes.items() if layer_index(name) is None]
    return {"layer_stored": source.layer_numel() * source.stored_dtype.itemsize,
            "layer": source.layer_numel() * dtype.itemsize,
            "quantized_layer": max(output.quantized_per_layer.values(), default=0),
            "non_layer_stored": sum(non_layer) * source.stored_dtype.itemsize,
            "largest_tensor": max(non_layer) * dtype.itemsize,
            "embedding": c.vocab_size * c.hidden_size * dtype.itemsize,
            "linear_work": round(work_per_weight * n * k)}  # quantize + export of the largest linear, measured


def _gptq_terms(source: Source, calibration: CalibrationOptions, calib_dtype: torch.dtype) -> dict[str, int]:
    """The calibrator's terms (bytes): the activations, a forward batch's intermediates, the largest group's
    Hessians plus the solver's working copies (one K x K, the inverse's workspace, and 4 N x K in fp32)."""
    c, linears = source.config, source.linears()
    shapes = {name.split(".", 3)[-1]: shape for name, shape in linears.items() if layer_index(name) == 0}
    def solver(n: str) -> int:
        return 4 * (shapes[n][1] ** 2 + 4 * math.prod(shapes[n]))

    group = max((sum(4 * shapes[n][1] ** 2 for n in names if n in shapes)
                 + max((solver(n) for n in names if n in shapes), default=0) for names in SEQUENTIAL_GROUPS), default=0)
    batch = min(calibration.batch_size, calibration.n_samples) * calibration.seq_len
    return {"activations": activation_bytes(c, calibration, calib_dtype),
            "down_inputs": activation_bytes(c, calibration, calib_dtype) * c.intermediate_size // c.hidden_size,
            "forward_batch": batch * (5 * c.hidden_size + 3 * c.intermediate_size) * calib_dtype.itemsize,
            "hessians_and_solver": group,
            "layer_calib": source.layer_numel() * calib_dtype.itemsize}


def memory_plan(source: Source, output: OutputSize, dtype: torch.dtype, baseline: tuple[int, float],
                calibration: CalibrationOptions | None = None, calib_dtype: torch.dtype | None = None,
                nproc: int = 1) -> Memory:
    """Peak memory of the pipeline by phase; `baseline`: measure_baseline's; `calibration` None: an uncalibrated
    method (CPU only). `nproc` > 1: of one torchrun rank, the most any needs (data_parallel_terms)."""
    t = _shape_terms(source, output, dtype, baseline[1])
    baseline = baseline[0]
    writing = {"non-layer tensors": {"baseline": baseline, "mapped": t["non_layer_stored"],
                                     "tensor and its bytes": 2 * t["largest_tensor"]},
               "read a layer": {"baseline": baseline, "mapped": t["layer_stored"], "layer": t["layer"]}}
    if calibration is None:
        quantize = {"baseline": baseline, "layer": t["layer"], "quantized": t["quantized_layer"],
                    "linear_work": t["linear_work"]}
        return Memory(_peak({**writing, "quantize": quantize}), 0, {**writing, "quantize": quantize}, {})
    g = _gptq_terms(source, calibration, calib_dtype)
    if nproc > 1:
        g = data_parallel_terms(g, calibration, nproc)
        writing = {name: {**terms, "activations gathered (rank 0)": g["all_activations"]}
                   for name, terms in writing.items()}
    act, layer = g["activations"], g["layer_calib"]
    where = activations_device(calibration.device, calibration.offload_activations)
    fits = down_inputs_fit(g["down_inputs"], act, where, allocated=act + layer)  # as the run will judge it
    down = g["down_inputs"] if fits else 0  # down_proj's inputs, kept for the advance where they fit
    ranks = {"recorded inputs": act if fits else g["down_inputs"],  # a group's, kept for the statistics: down_proj's
             #                                                         are the kept ones where they fit, else 2.7x
             "hessians sent and received": 2 * g["hessians_and_solver"]} if nproc > 1 else {}
    gpu = {"collect": {"layer": layer, "activations x3": 3 * act, "activations down_proj's inputs": down,
                       "forward": g["forward_batch"], "hessians": g["hessians_and_solver"], **ranks},
           "quantize": {"layer": layer, "activations x2": 2 * act, "activations down_proj's inputs": down,
                        "hessians_and_solver": g["hessians_and_solver"], "quantized": t["quantized_layer"]},
           "advance": {"layer": layer, "activations x3": 3 * act, "activations down_proj's inputs": down,
                       "forward": g["forward_batch"]}}
    embed = {"embedding": t["embedding"] * 2, "activations": act + act * dtype.itemsize // calib_dtype.itemsize}
    if check_device(calibration.device).type == "cuda":
        ram = {name: {**terms, "activations (saved)": act} for name, terms in writing.items()}
        ram["embed"] = {"baseline": baseline, **embed}
        if calibration.offload_activations:  # the activations and kept stages in RAM, a batch of each on the GPU
            batch = act * min(calibration.batch_size, calibration.n_samples) // calibration.n_samples
            for name, terms in gpu.items():
                kept = {k: v for k, v in terms.items() if k.startswith("activations")}
                ram[name] = {"baseline": baseline, **kept}
                gpu[name] = {**{k: v for k, v in terms.items() if k not in kept}, "activation batches x3": 3 * batch}
        return Memory(_peak(ram), _peak(gpu), ram, gpu)
    ram = {name: {"baseline": baseline, **terms} for name, terms in gpu.items()}
    ram.update({name: {**terms, "activations": act} for name, terms in writing.items()})
    ram["embed"] = {"baseline": baseline, **embed}
    return Memory(_peak(ram), 0, ram, {})


def data_parallel_terms(g: dict[str, int], calibration: CalibrationOptions, nproc: int) -> dict[str, int]:
    """The calibrator's terms on one of `nproc` torchrun ranks (quantkit/run/calibrator.py): the activations (and
    down_proj's inputs) of the largest block of batches a rank holds; `all_activations`: what rank 0 gathers to save
    after each layer (an upper bound: the largest block and rank 0's gathering). memory_plan adds the group's inputs
    a rank records for the rank-by-rank statistics and the observers it receives and sends."""
    n = calibration.n_samples
    share = max(len(sample_block(n, calibration.batch_size, r, nproc)) for r in range(nproc)) / n
    scaled = {k: round(v * share) for k, v in g.items() if k in ("activations", "down_inputs")}
    return {**g, **scaled, "all_activations": g["activations"]}


# -- time -----------------------------------------------------------------------------------------

def _timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes (after the device finished what came before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rows(n: int, k: int) -> int:
    """Output rows of a timed linear with k inputs: all of them, or a multiple of 64 within ROWS_BUDGET weights."""
    return n if n * k <= ROWS_BUDGET else max(64, ROWS_BUDGET // k // 64 * 64)


def time_quantize(source: Source, recipe: Recipe, fmt: QuantFormat, dtype: torch.dtype) -> tuple[float, list[str]]:
    """Seconds to quantize and export every linear (uncalibrated methods): each distinct (config, shape) timed on
    up to ROWS_BUDGET weights of its real input width, scaled by its rows and its count."""
    measured, seconds, notes = {}, 0.0, []
    for module, (n, k) in source.linears().items():
        config = recipe.config_for(module)
        if config is None:
            continue
        rows = _rows(n, k)
        key = (config, rows, k)
        if key not in measured:
            linear = probe_linear(rows, k, False, dtype)
            measured[key] = _timed(lambda: fmt.export_module("probe", quantize_probe(config, linear)),
                                   torch.device("cpu"))
            notes.append(f"{config.method} quantize+export of a {rows} x {k} linear: {measured[key] * 1e3:.0f} ms")
        seconds += measured[key] * n / rows
    return seconds, notes


def _solve_cols(config: QuantConfig, k: int) -> int:
    g = getattr(config, "group_size", -1)
    return k if k <= SOLVE_COLS else (SOLVE_COLS // g * g if isinstance(g, int) and 0 < g <= SOLVE_COLS else SOLVE_COLS)


def _time_solve(config: QuantConfig, ns: int, ks: int, dtype: torch.dtype, device: torch.device):
    """(seconds of GPTQ's whole solve, seconds of its Cholesky factorization) of an (ns, ks) linear, and a note."""
    linear = probe_linear(ns, ks, False, dtype, device)
    total = _timed(lambda: quantize_probe(config, linear), device)
    x = torch.randn(2 * ks, ks, device=device)
    H = x.T @ x / (2 * ks)
    cholesky = _timed(lambda: inverse_hessian_cholesky(H, 0.01), device)
    note = f"gptq solve of a {ns} x {ks} linear: {total * 1e3:.0f} ms (Cholesky {cholesky * 1e3:.0f} ms)"
    return total, cholesky, note


def _solve_seconds(measured, n: int, k: int, ns: int, ks: int) -> float:
    """The solve of (n, k) from one timed at (ns, ks): the Cholesky factorization scales as k^3, the column loop
    (lazy-batch updates) as n k^2."""
    total, cholesky, _ = measured
    return cholesky * (k / ks) ** 3 + max(total - cholesky, 0.0) * (n / ns) * (k / ks) ** 2


def _time_passes(n: int, k: int, calib_dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(seconds of one token through an (n, k) linear, seconds of one token into its (k, k) Hessian)."""
    rows, kh = _rows(n, k), min(k, 4096)
    x = torch.randn(TOKENS, k, dtype=calib_dtype, device=device)
    w = torch.randn(rows, k, dtype=calib_dtype, device=device)
    x @ w.T  # warm-up
    forward = _timed(lambda: x @ w.T, device) * n / rows / TOKENS
    H, xh = torch.zeros(kh, kh, device=device), torch.randn(4 * TOKENS, kh, device=device)
    hessian = _timed(lambda: H.addmm_(xh.T, xh), device) * (k / kh) ** 2 / (4 * TOKENS)
    return forward, hessian


def time_calibrated(source: Source, recipe: Recipe, calibration: CalibrationOptions, calib_dtype: torch.dtype,
                    dtype: torch.dtype) -> tuple[dict[str, float], list[str]]:
    """Seconds of the calibrated pipeline's forward passes, Hessians and solves, measured per distinct shape."""
    device, c = check_device(calibration.device), source.config
    tokens = calibration.n_samples * calibration.seq_len
    staged = all(getattr(x, "true_sequential", True) for x in recipe.configs())  # else one full pass + the advance
    attention = calibration.seq_len * c.num_attention_heads * c.head_dim / max(source.layer_numel(), 1)
    parts, cache, notes = {"forward": 0.0, "hessians": 0.0, "solve": 0.0}, {}, []
    for module, (n, k) in source.linears().items():
        config = recipe.config_for(module)
        if (n, k) not in cache:
            cache[(n, k)] = _time_passes(n, k, calib_dtype, device)
        forward, hessian = cache[(n, k)]
        passes = PASSES.get(module.split(".", 3)[-1], 1) if staged else 2
        parts["forward"] += forward * tokens * passes * (1 + attention)
        if config is None or BACKENDS.for_config(config).observer is None:
            continue
        parts["hessians"] += hessian * tokens
        key = (config, min(n, SOLVE_ROWS), _solve_cols(config, k))
        if key not in cache:
            cache[key] = _time_solve(config, *key[1:], dtype, device)
            notes.append(cache[key][2])
        parts["solve"] += _solve_seconds(cache[key], n, k, *key[1:])
    notes.append(f"forward and Hessian passes timed on {TOKENS} tokens per linear shape, x {tokens} tokens, "
                 f"{'the staged forward (q/k/v, o and down once, gate/up twice)' if staged else '2 passes'} per "
                 f"layer, attention at seq_len {calibration.seq_len} added in proportion")
    return parts, notes


def write_bandwidth(directory: Path) -> float:
    """Bytes per second of writing (and fsyncing) BANDWIDTH_PROBE bytes in `directory`."""
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".quantkit-plan-") as f:
        start = time.perf_counter()
        for _ in range(BANDWIDTH_PROBE >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return BANDWIDTH_PROBE / (time.perf_counter() - start)


# -- the plan -------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a quantize run will take (bytes, seconds), and what was measured and extrapolated to say so."""

    model: str
    format: str
    recipe: dict
    device: str
    layers: int
    peak_ram: int
    peak_gpu: int
    output_bytes: int
    work_bytes: int
    disk_needed: int
    bits_per_weight: float | None  # quant.record.bits_per_weight
    seconds: float
    seconds_parts: dict[str, float]
    ram_phases: dict[str, dict[str, int]]
    gpu_phases: dict[str, dict[str, int]]
    out: str | None = None
    free_bytes: int | None = None
    measured: list[str] = field(default_factory=list)
    ranks: int = 1  # torchrun ranks: peak_ram and peak_gpu are then per rank (the most any needs), seconds one process's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _seconds(source: Source, recipe: Recipe, fmt: QuantFormat, dtype: torch.dtype, calibration, calib_dtype,
             output: OutputSize, activations: int, where: Path) -> tuple[dict[str, float], list[str]]:
    if calibration is None:
        quantize, notes = time_quantize(source, recipe, fmt, dtype)
        parts = {"quantize": quantize}
    else:
        parts, notes = time_calibrated(source, recipe, calibration, calib_dtype, dtype)
    bandwidth = write_bandwidth(where)
    source_bytes = sum(math.prod(s) for s in source.shapes.values()) * source.stored_dtype.itemsize
    written = 2 * output.tensors + activations * source.config.num_hidden_layers  # work dir, then the output
    parts["read and write"] = (source_bytes + written) / bandwidth
    notes.append(f"disk: {bandwidth / 1e6:.0f} MB/s writing {BANDWIDTH_PROBE >> 20} MB in {where} (reading the source "
                 f"assumed as fast): {human_bytes(source_bytes)} read, {human_bytes(written)} written")
    return parts, notes


def make_plan(model: str | os.PathLike, config: QuantConfig | Recipe, export: ExportOptions | None = None,
              calibration: CalibrationOptions | None = None, ignore: tuple[str, ...] = (),
              out_dir: str | os.PathLike | None = None, measure: bool = True, nproc: int = 1) -> Plan:
    """Estimate a quantize run of `model` (a directory, hub id or preset name) before it starts.

    A calibrated method is planned with `calibration`'s n_samples, seq_len, device and dtype (its source is
    not read; None: the defaults). measure=False skips the timing and the baseline measurement (0 for both).
    nproc > 1: a data-parallel run of that many torchrun ranks (memory per rank: the most any needs; the time of
    one process); QuantkitError where it could not be shared out (quantkit.run.calibrator.data_parallel_problem).
    """
    export, source = export or ExportOptions(), Source.of(model)
    if out_dir is not None:  # as quantize would judge it: not under a file, not the source (an existing OUT is fine)
        check_output_dir(out_dir, overwrite=True, keep=[source.dir])
    recipe = runnable_recipe(config, ignore, calibrated=True)
    fmt, _ = planned_format(recipe, source.config, export.format)  # as quantize judges it, before its work
    if source.dir is not None:  # a preset has no tokenizer to judge
        check_target(fmt, out_dir, True, source.config, source.dir, keep=[source.dir])
    dtype = parse_dtype(export.dtype, "--dtype") or source.stored_dtype
    calib_dtype, device = None, torch.device("cpu")
    if needs_calibration(recipe):
        from quantkit.calibrate.sources import check_source

        calibration = CalibrationOptions.of(calibration) or CalibrationOptions()
        check_source(calibration.source)  # readable, as quantize needs it (not read: a plan runs no calibration)
        device = check_device(calibration.device)
        calib_dtype = calibration_dtype(calibration.dtype, source.stored_dtype, device, dtype)
    else:
        calibration = None
    if nproc < 1:
        raise QuantkitError(f"--nproc {nproc}: a run has at least one process")
    problem = data_parallel_problem(recipe, getattr(calibration, "n_samples", 0), getattr(calibration, "batch_size", 1),
                                    nproc)
    if problem:
        raise QuantkitError(f"--nproc {nproc}: {problem}")
    output = output_size(source, recipe, fmt, dtype)
    activations = activation_bytes(source.config, calibration, calib_dtype) if calibration else 0
    disk = disk_plan(output, activations, out_dir)
    baseline = measure_baseline(recipe, fmt, device, largest_linear(source)) if measure else (0, 0.0, 0.0)
    memory = memory_plan(source, output, dtype, baseline, calibration, calib_dtype, nproc)
    where = nearest_existing(Path(out_dir).absolute().parent) if out_dir is not None else Path(tempfile.gettempdir())
    parts, notes = (_seconds(source, recipe, fmt, dtype, calibration, calib_dtype, output, activations, where)
                    if measure else ({}, []))
    if measure:
        parts = {"start": baseline[2], **parts}  # imports and first use of the backends, as timed above
    notes.insert(0, f"baseline RSS {human_bytes(baseline[0])} (a new process with quantkit imported), quantize + export "
                    f"of a linear {baseline[1]:.0f} bytes per weight")
    return Plan(model=source.name, format=fmt.name, recipe=recipe.to_dict(), device=str(device),
                layers=source.config.num_hidden_layers, peak_ram=memory.ram, peak_gpu=memory.gpu,
                output_bytes=disk.output, work_bytes=disk.work, disk_needed=disk.needed,
                bits_per_weight=bits_per_weight(output.linear_bytes, output.linear_weights),
                seconds=sum(parts.values()), seconds_parts=parts, ram_phases=memory.ram_phases,
                gpu_phases=memory.gpu_phases, out=None if out_dir is None else str(out_dir),
                free_bytes=None if out_dir is None else free_space(out_dir)[0], measured=notes, ranks=nproc)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_table(plan: Plan) -> str:
    """The plan as a short human table, then what was measured."""
    ram_phase = max(plan.ram_phases, key=lambda p: sum(plan.ram_phases[p].values()))
    per = f" per rank ({plan.ranks} torchrun ranks)" if plan.ranks > 1 else ""
    rows = [("model", f"{plan.model} ({plan.layers} layers), {plan.format}, {plan.bits_per_weight:.2f} bits per "
                      f"weight (decoder linears, scales included)"),
            ("peak RAM" + per, f"{human_bytes(plan.peak_ram)} (while: {ram_phase})"),
            ("peak GPU" + per, human_bytes(plan.peak_gpu) if plan.gpu_phases else "none (runs on the CPU)"),
            ("output", human_bytes(plan.output_bytes)),
            ("work directory", f"{human_bytes(plan.work_bytes)} (removed at the end)"),
            ("disk needed", human_bytes(plan.disk_needed))]
    if plan.free_bytes is not None:
        fits = "fits" if plan.free_bytes >= plan.disk_needed else "DOES NOT FIT"
        rows.append(("free disk", f"{human_bytes(plan.free_bytes)} where {plan.out} goes: {fits}"))
    parts = ", ".join(f"{name} {_duration(s)}" for name, s in plan.seconds_parts.items())
    one = " in one process" if plan.ranks > 1 else ""
    rows.append(("time", f"about {_duration(plan.seconds)}{one} ({parts})" if plan.seconds_parts else "not measured"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines + ["measured here (then scaled to the run):"] + [f"  {note}" for note in plan.measured])
