"""`quantkit plan` against real quantize runs (output size, peak RSS), presets without weights, and quantize's
refusal before it starts when the disk cannot hold the output and the work directory. Timing is compared with
reality in bench/bench_plan.py only (no timed assertions here)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

import quantkit
from quantkit.backends import QuantConfig
from quantkit.run.calibrator import CalibrationOptions
from quantkit.plan.planner import make_plan
from tests.conftest import DEMO_MODEL
from tests.helpers import assert_one_line_error, run

METHODS = {"int4": {"method": "int4", "group_size": 32}, "rtn": {"method": "rtn", "bits": 3, "group_size": 32},
           "bnb-nf4": {"method": "bnb-nf4"}, "gptq": {"method": "gptq", "bits": 4, "group_size": 32}}
FORMATS = [("int4", None), ("int4", "gptq"), ("rtn", None), ("bnb-nf4", None), ("gptq", None),
           ("gptq", "compressed-tensors")]


def calibration_for(method: str, n: int = 4, seq_len: int = 32):
    if method != "gptq":
        return None
    return CalibrationOptions(torch.randint(0, 4096, (n, seq_len), generator=torch.Generator().manual_seed(0)),
                              n_samples=n, seq_len=seq_len)


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("method, fmt", FORMATS)
def test_output_size_is_what_quantize_writes(tiny_model_dir, tmp_path, method, fmt):
    config = QuantConfig.from_dict(METHODS[method])
    export = quantkit.ExportOptions(format=fmt)
    plan = make_plan(tiny_model_dir, config, export, calibration_for(method), measure=False)
    quantkit.quantize_checkpoint(tiny_model_dir, config, tmp_path / "q", export, calibration_for(method),
                                 progress=False)
    real = dir_bytes(tmp_path / "q")
    assert abs(plan.output_bytes - real) <= 0.02 * real, (plan.output_bytes, real)
    assert plan.format == (fmt or {"bnb-nf4": "bnb", "gptq": "gptq"}.get(method, "compressed-tensors"))


def test_ignored_linears_count_in_full_precision(tiny_model_dir, tmp_path):
    config = QuantConfig.from_dict(METHODS["int4"])
    plain = make_plan(tiny_model_dir, config, measure=False)
    ignoring = make_plan(tiny_model_dir, config, ignore=(r"mlp\.down_proj$",), measure=False)
    quantkit.quantize_checkpoint(tiny_model_dir, config, tmp_path / "q", ignore=(r"mlp\.down_proj$",), progress=False)
    assert ignoring.output_bytes > plain.output_bytes
    assert abs(ignoring.output_bytes - dir_bytes(tmp_path / "q")) <= 0.02 * dir_bytes(tmp_path / "q")


def peak_rss_of(command: list[str]) -> int:
    """Peak RSS (bytes) of a command run in its own helper process (so other children's maxima don't mix)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    return int(done.stdout.strip()) * 1024  # KiB on Linux


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_CHILDREN") or sys.platform != "linux",
                    reason="ru_maxrss in KiB is Linux's")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["int4", "gptq"])
def test_peak_ram_is_within_30_percent_of_a_real_run(tmp_path, method):
    flags = {"int4": ["--method", "int4", "--group-size", "64"],
             "gptq": ["--method", "gptq", "--group-size", "64", "--calib", str(DEMO_MODEL / "train.txt"),
                      "--n-samples", "8", "--seq-len", "128"]}[method]
    measured = peak_rss_of([sys.executable, "-m", "quantkit.cli", "quantize", str(DEMO_MODEL), *flags,
                            "-o", str(tmp_path / "q")])
    result = run("plan", DEMO_MODEL, *flags, "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)["peak_ram"]
    assert abs(planned - measured) <= 0.3 * measured, (planned, measured)


Preset = namedtuple("Preset", "name layers linear_weights")
PRESETS = [Preset("llama2-7b", 32, 6_476_005_376), Preset("llama2-13b", 40, 12_687_769_600),
           Preset("llama2-70b", 80, 68_451_041_280)]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["int4", "gptq"])
def test_presets_plan_without_weights(preset, method):
    config = QuantConfig.from_dict({"method": method, "group_size": 128})
    plan = make_plan(preset.name, config, calibration=CalibrationOptions(n_samples=128, seq_len=2048), measure=False)
    # 4 bits + an fp16 scale and a 4-bit zero point per 128 weights; gptq's g_idx adds 32 bits per input column
    bits = 4 + (16 + 4) / 128
    assert bits < plan.bits_per_weight < bits + 0.01
    assert plan.layers == preset.layers
    quantized = preset.linear_weights * plan.bits_per_weight / 8
    assert quantized < plan.output_bytes < quantized + 2 * 32000 * 8192 * 2 + 1e7  # + embedding, lm_head, norms, files
    activations = 128 * 2048 * {"llama2-7b": 4096, "llama2-13b": 5120, "llama2-70b": 8192}[preset.name] * 4
    extra = plan.work_bytes - (plan.output_bytes - 5e6)
    assert (extra > 2 * activations - 5e6) if method == "gptq" else (extra < 5e6)
    assert plan.peak_ram > (3 * activations if method == "gptq" else 0)



def test_plan_command_prints_a_table_and_json(tiny_model_dir, tmp_path):
    table = run("plan", tiny_model_dir, "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", tmp_path / "q")
    assert table.exit_code == 0, table.output
    for row in ("peak RAM", "peak GPU", "output", "work directory", "free disk", "time", "measured here"):
        assert row in table.output
    as_json = run("plan", tiny_model_dir, "--method", "rtn", "--bits", 4, "--group-size", 32, "--json")
    plan = json.loads(as_json.output)
    assert plan["seconds"] > 0 and plan["peak_ram"] > plan["output_bytes"] and plan["free_bytes"] is None
    assert set(plan["seconds_parts"]) == {"start", "quantize", "read and write"}
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("nproc", [2, 3])
def test_nproc_plans_the_memory_of_one_rank(nproc):
    """Under torchrun a rank holds its block of the calibration batches (the largest counts), records its group's
    inputs, receives and sends the Hessians; rank 0 gathers all the activations to save them."""
    config = QuantConfig.from_dict({"method": "gptq", "group_size": 128})
    calibration = CalibrationOptions(n_samples=128, seq_len=2048)
    one = make_plan("llama2-7b", config, calibration=calibration, measure=False)
    many = make_plan("llama2-7b", config, calibration=calibration, measure=False, nproc=nproc)
    activations = 128 * 2048 * 4096 * 4
    share = activations * (-(-16 // nproc) * 8) // 128  # whole batches of 8: the largest block
    assert many.ranks == nproc and one.ranks == 1
    assert many.ram_phases["collect"]["activations x3"] == 3 * share
    collect = many.ram_phases["collect"]
    kept_down = collect["activations down_proj's inputs"]  # where they fit in the memory free here
    assert collect["recorded inputs"] == (share if kept_down else share * 11008 // 4096)
    assert collect["hessians sent and received"] == 2 * collect["hessians"]
    assert many.ram_phases["read a layer"]["activations gathered (rank 0)"] == activations
    assert "recorded inputs" not in one.ram_phases["collect"]
    assert (many.output_bytes, many.work_bytes) == (one.output_bytes, one.work_bytes)


def test_plan_nproc_in_the_table(tiny_model_dir):
    result = run("plan", tiny_model_dir, "--method", "gptq", "--group-size", 32, "--calib", DEMO_MODEL / "test.txt",
                 "--n-samples", 16, "--nproc", 2)
    assert result.exit_code == 0, result.output
    assert "peak RAM per rank (2 torchrun ranks)" in result.output and "in one process" in result.output


@pytest.mark.parametrize("args, message", [
    (("llama2-7b", "--method", "int4", "--nproc", 2), "--nproc 2: int4: uncalibrated methods have no calibration"),
    (("llama2-7b", "--method", "awq", "--nproc", 2), "--nproc 2: method awq: its activation-aware search"),
    (("llama2-7b", "--method", "gptq", "--n-samples", 8, "--nproc", 2), "fewer calibration batches than the 2"),
    (("llama2-7b", "--method", "gptq", "--nproc", 0), "--nproc"),
    (("llama2-7b", "--method", "int4", "--calib", "x.txt"), "--calib applies to calibrated methods"),
    (("llama2-7b",), "give exactly one of --method and --recipe"),
    (("no-such-model", "--method", "int4"), "no-such-model: no such model directory"),
])
def test_plan_refuses_bad_input_in_one_line(args, message):
    result = run("plan", *args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("method", ["int4", "gptq"])
def test_quantize_refuses_before_it_starts_when_the_disk_is_too_small(tiny_model_dir, tmp_path, monkeypatch, method):
    needed = make_plan(tiny_model_dir, QuantConfig.from_dict(METHODS[method]), calibration=calibration_for(method),
                       out_dir=tmp_path / "q", measure=False).disk_needed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - needed // 2, needed // 2))
    calib = ("--calib", tmp_path / "not-read-yet.txt") if method == "gptq" else ()  # refused before calibration
    result = run("quantize", tiny_model_dir, *("--method", method, "--group-size", 32), *calib, "-o", tmp_path / "q")
    assert_one_line_error(result, f"{tmp_path / 'q'}: needs about ", "(output ", " + work directory ", " free on /",
                          "free space or choose another output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, no work directory, no temporary


def test_quantize_runs_when_the_disk_just_fits(tiny_model_dir, tmp_path, monkeypatch):
    config = QuantConfig.from_dict(METHODS["int4"])
    needed = make_plan(tiny_model_dir, config, out_dir=tmp_path / "q", measure=False).disk_needed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - needed, needed))
    quantkit.quantize_checkpoint(tiny_model_dir, config, tmp_path / "q", progress=False)
    assert (tmp_path / "q" / "config.json").is_file()


@pytest.mark.parametrize("offload", [False, True])
def test_offloaded_activations_move_from_the_gpu_to_ram(monkeypatch, offload):
    """70B GPTQ on CUDA: 128 x 2048 fp16 activations are 4.3 GB a copy, three kept; offloaded they are in RAM and
    the GPU holds a batch of each."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # planning only: nothing runs on the device
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 << 30, 24 << 30))  # a free 24 GB GPU
    config = QuantConfig.from_dict({"method": "gptq", "group_size": 128})

    def plan(offload):
        calibration = CalibrationOptions(n_samples=128, seq_len=2048, device="cuda", offload_activations=offload)
        return make_plan("llama2-70b", config, calibration=calibration, measure=False)
    kept, offloaded = plan(False), plan(True)
    activations = 128 * 2048 * 8192 * 2
    assert kept.peak_gpu - offloaded.peak_gpu > 2.5 * activations
    assert offloaded.peak_ram > kept.peak_ram and offloaded.peak_gpu < 24e9 < kept.peak_gpu
    assert offloaded.gpu_phases["collect"]["activation batches x3"] == 3 * activations * 8 // 128
