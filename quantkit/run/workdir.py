"""Resumable quantization: the work directory a streamed run checkpoints each finished decoder layer into.

A run to OUT works in `OUT.parent / .OUT.quantkit-work` (beside OUT, so on its filesystem):

  state.json                       the run's fingerprint and, per finished unit, its tensor names (in the
                                   order written), bytes, ExportRecord and report rows; rewritten atomically,
                                   last, after each unit
  non-layer/model.safetensors      the embedding, final norm and lm_head, as they are written
  layer-00000/model.safetensors    each finished decoder layer's tensors, as the format exported them
  activations-00003.safetensors    calibrated methods (gptq): the calibration activations after 3 layers

The output is always assembled from it (uninterrupted or resumed alike) through the format's sink, in
the original tensor order, so a resumed output is byte-identical to an uninterrupted one; then the
work directory is removed. A resumed run first compares its fingerprint with the stored one and
refuses, naming what changed: the source (config.json, each weight file's size, safetensors header and
first and last MiB of data, the tokenizer files), the recipe and export options, the calibration
tokens and settings (and the number of torchrun ranks), the quantkit and torch versions and torch's
thread count (float sums depend on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import quantkit.dist as dist
from quantkit.version import __version__
from quantkit.dtypes import dtype_name
from quantkit.errors import QuantkitError
from quantkit.run.export import ExportRecord, ExportWriter
from quantkit.io.files import atomic_dir, atomic_file, human_bytes, write_error, write_text
from quantkit.io.manifest import sha256_file
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.tokenizer import TOKENIZER_FILES
from quantkit.io.shards import SAFETENSORS_SINGLE, ShardWriter, parse_size
from quantkit.quant.record import LinearReport

log = logging.getLogger(__name__)

STATE = "state.json"
NON_LAYER = "non-layer"
ONE_FILE = 1 << 62  # a unit's ShardWriter never splits it
SAMPLE = 1 << 20  # bytes of a weight file's data hashed at each end


def work_dir_of(out: str | os.PathLike) -> Path:
    """Where a run to `out` keeps its finished layers: `.OUT.quantkit-work` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.quantkit-work"


def layer_unit(index: int) -> str:
    return f"layer-{index:05d}"


def activations_name(done: int) -> str:
    return f"activations-{done:05d}.safetensors"


# -- the fingerprint ------------------------------------------------------------------------------

def safetensors_sample_sha256(path: Path) -> str:
    """sha256 of a safetensors file's header (length prefix and JSON: names, dtypes, shapes, offsets) and of
    the first and last MiB of its data: a cheap check (milliseconds whatever the size) that catches another
    file of the same shapes (a different fine-tune) as well as a changed header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        header = f.read(struct.unpack("<Q", prefix)[0]) if len(prefix) == 8 else b""
        digest = hashlib.sha256(prefix + header + f.read(SAMPLE))
        size = os.fstat(f.fileno()).st_size
        f.seek(max(size - SAMPLE, f.tell()))
        digest.update(f.read())
    return digest.hexdigest()


def source_fingerprint(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json's sha256; per weight file its size, modification time (an edit in place anywhere in a 140 GB
    file, which the samples may miss) and safetensors_sample_sha256 (the whole file's sha256 for a .bin or an
    index); the tokenizer files' sha256."""
    files = sorted(set(ckpt.weight_map.values()) | {ckpt.weights_source.name})
    weights = {name: {"size": (ckpt.dir / name).stat().st_size, "mtime_ns": (ckpt.dir / name).stat().st_mtime_ns,
                      "sha256": safetensors_sample_sha256(ckpt.dir / name) if name.endswith(".safetensors")
                      else sha256_file(ckpt.dir / name)} for name in files}
    tokenizer = {name: sha256_file(ckpt.dir / name) for name in TOKENIZER_FILES if (ckpt.dir / name).is_file()}
    return {"config.json": sha256_file(ckpt.config_path), "weights": weights, "tokenizer": tokenizer}


def fingerprint(ckpt: Checkpoint, recipe: dict, export: dict, calibration=None,
                tokens: torch.Tensor | None = None, calib_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (see the module docstring).

    export: {"format", "dtype", "max_shard_size"}; calibration: the CalibrationOptions (with `tokens`, the
    calibration token ids, and `calib_dtype`, what calibration computes in), or None for uncalibrated recipes.
    """
    calib = None
    if calibration is not None:
        data = tokens.contiguous().cpu()
        calib = {"tokens_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "shape": list(data.shape),
                 "dtype": dtype_name(calib_dtype), "device": str(calibration.device),
                 "batch_size": calibration.batch_size}
        if dist.world_size() > 1:  # data-parallel: float sums in another order (one process's fingerprint unchanged)
            calib["ranks"] = dist.world_size()
    export = {**export, "max_shard_size": parse_size(export["max_shard_size"])}
    return {"source": source_fingerprint(ckpt), "recipe": recipe, "export": export, "calibration": calib,
            "quantkit": __version__, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _source_change(old: dict, new: dict) -> str:
    if old.get("config.json") != new["config.json"]:
        return "the source's config.json changed"
    for kind in ("weights", "tokenizer"):
        before, now = old.get(kind, {}), new[kind]
        if set(before) != set(now):
            gone, added = sorted(set(before) - set(now)), sorted(set(now) - set(before))
            return f"the source's {kind} files changed ({', '.join(['-' + n for n in gone] + ['+' + n for n in added])})"
        changed = [name for name in now if before[name] != now[name]]
        if changed:
            touched = kind == "weights" and {k: v for k, v in before[changed[0]].items() if k != "mtime_ns"} == \
                {k: v for k, v in now[changed[0]].items() if k != "mtime_ns"}
            return f"the source's {changed[0]} changed" + (" (modified since the run began)" if touched else "")
    return "the source changed"


CALIBRATION_CHANGES = {"tokens_sha256": "the calibration tokens changed (--calib, --n-samples, --seq-len, --seed)",
                     "shape": "the calibration tokens changed (--calib, --n-samples, --seq-len, --seed)",
                     "dtype": "--calib-dtype", "device": "--device", "batch_size": "the calibration batch size",
                     "ranks": "the number of torchrun ranks (--nproc-per-node; none: one process)"}


def _calibration_change(old: dict | None, new: dict | None) -> str:
    if old is None or new is None:
        return "the recipe's calibration changed"
    key = next(k for k in {**old, **new} if old.get(k) != new.get(k))
    what = CALIBRATION_CHANGES[key]
    return what if what.startswith("the calibration tokens") else f"{what} changed ({old.get(key)} -> {new.get(key)})"


def what_changed(old: dict, new: dict) -> str | None:
    """One phrase naming the first difference between two fingerprints, or None when they are the same."""
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if key == "source":
            return _source_change(before or {}, value)
        if key == "recipe":
            return "the recipe changed (--method, its options, --recipe or --ignore)"
        if key == "export":
            k = next(k for k in value if (before or {}).get(k) != value[k])
            return f"--{k.replace('_', '-')} changed ({(before or {}).get(k)} -> {value[k]})"
        if key == "calibration":
            return _calibration_change(before, value)
        if key == "threads":
            return (f"torch now uses {value} threads where the previous run used {before} (float sums depend on the "
                    f"thread count, so the output would not be byte-identical to an uninterrupted run)")
        return f"{key} changed ({before} -> {value})"
    return None


# -- the work directory ---------------------------------------------------------------------------

def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "started": psutil.Process().create_time()}


def _is_running(owner: dict | None) -> bool:
    """Whether the process that wrote a state is still running (and is not this one)."""
    if not owner or owner.get("pid") == os.getpid():
        return False
    try:
        return psutil.Process(owner["pid"]).create_time() == owner.get("started")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class WorkDir:
    """The work directory of a run to `out` with `layers` decoder layers (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, layers: int):
        self.out, self.path, self.layers = Path(out), work_dir_of(out), layers
        self.state: dict[str, Any] | None = None

    # -- what is there ----------------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Decoder layers finished and recorded in state.json."""
        return len(self.state["layers"]) if self.state else 0

    def size(self) -> int:
        """Bytes of everything in the work directory."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() else 0

    def describe(self) -> str:
        return f"{self.done} of {self.layers} layers done ({human_bytes(self.size())})"

    def _read_state(self) -> dict | None:
        """state.json as written, or None where there is none or it is not quantkit's (a run killed early)."""
        try:
            state = json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("format") == "quantkit-work" else None

    def check(self, resume: bool, overwrite: bool):
        """Before any work: refuse a work directory left by a previous run unless --resume (continue it, checked by
        `begin`) or --force (discard it); one a running process uses is always refused."""
        if not self.path.exists():
            if resume:
                log.warning("%s: --resume: no previous run to continue (no %s): starting from the first layer",
                            self.out, self.path.name)
            return
        self.state = self._read_state()
        if _is_running(self.state and self.state.get("owner")):
            raise QuantkitError(f"{self.out}: another quantkit process (pid {self.state['owner']['pid']}) is writing "
                                f"it now ({self.path}): wait for it to finish, or stop it")
        if self.done == 0:
            log.warning("%s: removed %s, left by a run that was killed before it finished a layer", self.out,
                        self.path.name)
        elif resume:
            return
        elif not overwrite:
            raise QuantkitError(f"{self.out}: a previous run left {self.path.name} with {self.describe()}: pass "
                                f"--resume to continue it, or --force to start over")
        else:
            log.warning("%s: --force: discarding %s with %s", self.out, self.path.name, self.describe())
        self.remove()

    def begin(self, fingerprint: dict[str, Any]):
        """Continue the state `check` kept, if its fingerprint is this run's (refused otherwise), or start afresh."""
        if self.state is not None:
            changed = what_changed(self.state["fingerprint"], fingerprint)
            if changed is not None:
                fix = (f"set OMP_NUM_THREADS={self.state['fingerprint']['threads']}" if changed.startswith("torch now")
                       else "run it as before")
                since = "" if changed.startswith("torch now") else " since the previous run"
                raise QuantkitError(f"{self.out}: cannot --resume: {changed}{since}: {fix}, or pass "
                                    f"--force instead of --resume to start over")
            log.warning("%s: resuming after %s", self.out, self.describe())
            self._prune()
        else:
            try:
                self.path.mkdir(parents=True)
            except OSError as e:
                raise write_error(self.path, e) from None
            self.state = {"format": "quantkit-work", "version": 1, "output": str(self.out),
                          "fingerprint": fingerprint, "non_layer": None, "layers": []}
        self.state["owner"] = _owner()
        self._save_state()

    def _prune(self):
        """Remove what a killed run left unrecorded: a unit or activations written after the last state.json."""
        keep = {STATE, activations_name(self.done), NON_LAYER, *map(layer_unit, range(self.done))}
        for p in self.path.iterdir():
            if p.name not in keep:
                log.info("%s: removing %s (not recorded as finished)", self.path, p.name)
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _save_state(self):
        write_text(self.path / STATE, json.dumps(self.state, indent=1) + "\n")

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
        self.state = None

    # -- writing ----------------------------------------------------------------------------------

    @property
    def has_non_layer(self) -> bool:
        return bool(self.state and self.state["non_layer"])

    def write_unit(self, name: str, writer_of: Callable[[ShardWriter], ExportWriter],
                   write: Callable[[ExportWriter], None]) -> dict[str, Any]:
        """One unit's tensors into `name/model.safetensors` (atomically); returns its state entry."""
        with atomic_dir(self.path / name, overwrite=True) as tmp:
            writer = writer_of(ShardWriter(tmp, ONE_FILE))
            write(writer)
            writer.sink.close()
        return {"tensors": writer.sink.shards[0][1], "bytes": writer.sink.total_size,
                "record": writer.record.to_dict(), "reports": [asdict(r) for r in writer.reports]}

    def finish_non_layer(self, unit: dict[str, Any]):
        self.state["non_layer"] = unit
        self._save_state()

    def finish_layer(self, unit: dict[str, Any], save_activations: Callable[[Path], None] | None = None):
        """Record a finished layer; for calibrated runs first save the activations after it (unless it is the
        last), then state.json, then drop the previous activations."""
        done = self.done + 1
        if save_activations is not None and done < self.layers:
            with atomic_file(self.path / activations_name(done)) as tmp:
                save_activations(tmp)
        self.state["layers"].append(unit)
        self._save_state()
        (self.path / activations_name(done - 1)).unlink(missing_ok=True)

    def activations(self) -> Path:
        """The saved activations after the finished layers (calibrated runs)."""
        path = self.path / activations_name(self.done)
        if not path.is_file():
            raise QuantkitError(f"{self.path}: {path.name} is missing: the work directory is damaged: pass --force "
                                f"instead of --resume to start over")
        return path

    def units(self) -> list[tuple[str, dict[str, Any]]]:
        return [(NON_LAYER, self.state["non_layer"])] + [(layer_unit(i), u) for i, u in enumerate(self.state["layers"])]

    def assemble(self, writer: ExportWriter, progress: bool = True):
        """Send every unit's tensors, in the order first written, to the output's writer, with their records."""
        for name, unit in tqdm(self.units(), desc="assemble", unit="unit", disable=not progress):
            with safe_open(self.path / name / SAFETENSORS_SINGLE, "pt", device="cpu") as f:
                writer.write_tensors((t, f.get_tensor(t)) for t in unit["tensors"])
            writer.add_written(ExportRecord.from_dict(unit["record"]), [LinearReport(**r) for r in unit["reports"]])

    def stopped(self, keep: bool) -> str:
        """After an interruption or a failure: keep the work directory if a layer finished and `keep`, else remove
        it; returns what became of it, for the one-line message."""
        if self.done and keep:
            return (f"after {self.done} of {self.layers} layers: --resume continues (the work directory {self.path} "
                    f"holds {human_bytes(self.size())}; delete it to start over)")
        done = self.done
        self.remove()
        if done:
            return f"after {done} of {self.layers} layers; the work directory was removed (--no-keep-work)"
        return "before any layer was finished; nothing was kept"
