"""`quantkit check`: each runtime that serves a format computes what quantkit computes.

transformers (compressed-tensors, bitsandbytes) runs from this venv; GPTQModel from the venv QUANTKIT_GPTQMODEL_PYTHON
names (`.ci/gptqmodel-venv.sh` builds it and `.ci/run` sets it): without it those tests skip here and fail in CI.
"""

import json
import os
import stat

import pytest

from quantkit.eval.check import CheckOptions, run_check
from quantkit.eval.data import eval_data
from quantkit.model import Tokenizer, save_model
from tests.conftest import DEMO_MODEL, peaked_model
from tests import helpers
from tests.helpers import assert_one_line_error

WINDOWS = ("--dataset", None, "--seq-len", 64, "--windows", 2)
GPTQ_LAYOUTS = {  # name -> quantize flags: the layouts GPTQModel must load with quantkit's logits
    "w4g32-asym": ("--method", "rtn", "--bits", 4, "--group-size", 32, "--asym", "--format", "gptq"),
    "w4g32-sym": ("--method", "rtn", "--bits", 4, "--group-size", 32, "--sym", "--format", "gptq"),
    "w8g32-asym": ("--method", "rtn", "--bits", 8, "--group-size", 32, "--asym", "--format", "gptq"),
    "w8-perchannel-sym": ("--method", "rtn", "--bits", 8, "--group-size", -1, "--sym", "--format", "gptq"),
    "w4-perchannel-sym": ("--method", "rtn", "--bits", 4, "--group-size", -1, "--sym", "--format", "gptq"),
    "w4-perchannel-asym": ("--method", "rtn", "--bits", 4, "--group-size", -1, "--asym", "--format", "gptq"),
    "gptq-w4g32-act-order": ("--method", "gptq", "--bits", 4, "--group-size", 32, "--act-order", "--calib", None,
                             "--n-samples", 8, "--seq-len", 64, "--format", "gptq"),
}


def run(*args, text=None):
    return helpers.run(*[text if a is None else a for a in args])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny peaked fp16 model (hidden 128: every kernel fits) and a local text."""
    root = tmp_path_factory.mktemp("check")
    base = root / "base"
    save_model(peaked_model(hidden_size=128, intermediate_size=256), base, tokenizer_dir=DEMO_MODEL, dtype="fp16")
    text = root / "text.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text()[:6000])
    return {"base": base, "text": text, "root": root}


def quantized(dirs, name: str, *flags) -> str:
    out = dirs["root"] / name
    if not out.exists():
        result = run("quantize", dirs["base"], *flags, "-o", out, text=dirs["text"])
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def gptqmodel_python():
    python = os.environ.get("QUANTKIT_GPTQMODEL_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("CI runs the GPTQModel tests: .ci/run sets QUANTKIT_GPTQMODEL_PYTHON (.ci/gptqmodel-venv.sh)")
        pytest.skip("QUANTKIT_GPTQMODEL_PYTHON is not set: build the venv with .ci/gptqmodel-venv.sh")
    return python


def check_report(dirs, out, *extra) -> dict:
    result = run("check", out, "--base", dirs["base"], *WINDOWS, "--json", *extra, text=dirs["text"])
    assert result.exit_code == 0, result.output
    return json_of(result)


def json_of(result) -> dict:
    """The JSON report in a CliRunner's output (progress bars and the error line around it)."""
    return json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])[0]


def rows(report: dict) -> dict[str, dict]:
    return {row["runtime"]: row for row in report["rows"]}


# LLM.int8 is discontinuous in its inputs (columns above the outlier threshold take another path), so the 1e-7
# differences of transformers' attention flip a few columns: 1.1e-4 nats on this peaked model, 2.9e-5 on the demo.
@pytest.mark.parametrize("name,flags,tolerance", [
    ("ct-int4", ("--method", "int4", "--group-size", 32), 1e-4),
    ("ct-rtn-sym", ("--method", "rtn", "--bits", 4, "--group-size", 32, "--sym"), 1e-4),
    ("bnb-nf4", ("--method", "bnb-nf4",), 1e-4),
    ("bnb-int8", ("--method", "bnb-int8",), 5e-4)])
def test_check_transformers_formats_end_to_end(dirs, name, flags, tolerance):
    report = check_report(dirs, quantized(dirs, name, *flags), "--tolerance", tolerance)
    by = rows(report)
    hf = by["transformers"]
    assert hf["status"] == "ok" and hf["passed"] is True and hf["dtype"] == "float32"
    assert hf["vs_quantkit"]["added_kl"] <= tolerance and hf["vs_quantkit"]["top1"] > 0.97
    assert hf["applied"]["linears"] == 14 and hf["applied"]["lm_head"] == "Linear"
    if name.startswith("bnb"):  # bitsandbytes' modules in transformers; compressed-tensors dequantizes asymmetric ones
        assert hf["applied"]["quantized"] == 14
    assert by["quantkit"]["vs_base"]["kl_mean"] > 0 and "vs_quantkit" not in by["quantkit"]
    assert ("quantkit int4 kernel" in by) == name.startswith("ct-")  # 4-bit AffineLinears only


def test_check_gptq_without_gptqmodel_says_how_to_install(dirs, monkeypatch):
    monkeypatch.delenv("QUANTKIT_GPTQMODEL_PYTHON", raising=False)
    report = check_report(dirs, quantized(dirs, "w4g32-asym", *GPTQ_LAYOUTS["w4g32-asym"]))
    for runtime in ("gptqmodel", "transformers + gptqmodel"):
        row = rows(report)[runtime]
        assert row["status"] == "not installed" and row["passed"] is None
        assert "QUANTKIT_GPTQMODEL_PYTHON is not set" in row["message"]


def test_gptqmodel_installed_beside_quantkit_is_found(monkeypatch):
    import importlib.util
    import sys

    from quantkit.eval.check import runtime_python

    monkeypatch.delenv("QUANTKIT_GPTQMODEL_PYTHON", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "gptqmodel" else find_spec(name))
    assert runtime_python("gptq") == sys.executable and runtime_python("bnb") == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("layout", GPTQ_LAYOUTS)
def test_gptq_layouts_load_in_gptqmodel_with_quantkits_logits(dirs, layout, gptqmodel_python):
    out = quantized(dirs, layout, *GPTQ_LAYOUTS[layout])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == ("gptq" if config["sym"] else "gptq_v2")
    result = run("check", out, "--base", dirs["base"], *WINDOWS, "--json", text=dirs["text"])
    by = rows(json_of(result))
    for runtime in ("gptqmodel", "transformers + gptqmodel"):
        row = by[runtime]
        assert row["status"] == "ok", row.get("message")
        if layout == "w4-perchannel-asym":
            # GPTQModel 7.7 serves 4-bit per-channel on CPU with TorchFusedLinear, whose transform_cpu packs zero
            # points of 0: every asymmetric file comes out wrong there (its own too). check says so, and fails.
            assert row["applied"]["kernels"] == {"TorchFusedLinear": 14}
            assert row["passed"] is False and row["vs_quantkit"]["added_kl"] > 0.1 and result.exit_code == 1
            continue
        assert row["passed"] is True and row["vs_quantkit"]["added_kl"] <= 1e-4, row["vs_quantkit"]
        assert row["applied"]["quantized"] == 14
        assert row["applied"]["act_order_modules"] == (14 if "act-order" in layout else 0)


@pytest.mark.parametrize("fmt,flags", [("compressed-tensors", ("--method", "int4")),
                                       ("bnb", ("--method", "bnb-nf4")),
                                       ("gptq", ("--method", "rtn", "--bits", 4, "--format", "gptq"))])
def test_check_the_demo_model_in_each_format(fmt, flags, tmp_path, monkeypatch):
    # The bundled demo model (a trained one), as a user runs it: GPTQ's runtimes only where GPTQModel is set up.
    out = tmp_path / "out"
    assert run("quantize", DEMO_MODEL, *flags, "-o", out).exit_code == 0
    result = run("check", out, "--base", DEMO_MODEL, "--dataset", DEMO_MODEL / "test.txt", "--seq-len", 128,
                 "--windows", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json_of(result)
    assert report["format"] == fmt
    ran = [row for row in report["rows"] if row["runtime"] not in ("quantkit", "quantkit int4 kernel")
           and not row.get("floor")]
    assert ran and all(row["passed"] in (True, None) for row in ran)
    if fmt != "gptq" or os.environ.get("QUANTKIT_GPTQMODEL_PYTHON"):
        assert all(row["status"] == "ok" and row["passed"] for row in ran)


GPTQMODEL_QUANTIZE = """
import sys, torch
from gptqmodel import GPTQModel, QuantizeConfig
torch.manual_seed(0)
data = [{"input_ids": torch.randint(3, 4096, (64,)).tolist(), "attention_mask": [1] * 64} for _ in range(8)]
config = QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=False, act_group_aware=False, device="cpu")
model = GPTQModel.load(sys.argv[1], config, dtype=torch.float32)
model.quantize(data, batch_size=1, calibration_sort=None)
model.save(sys.argv[2])
"""


@pytest.mark.slow
def test_check_a_directory_gptqmodel_wrote(dirs, gptqmodel_python, tmp_path):
    # GPTQModel's own asymmetric file (v1 layout, meta.quantizer gptqmodel:7.7.0): quantkit reads it with
    # GPTQModel's whole-word zero-point convention, and both agree.
    import shutil
    import subprocess

    out = tmp_path / "gptqmodel-out"
    script = tmp_path / "quantize.py"
    script.write_text(GPTQMODEL_QUANTIZE)
    done = subprocess.run([gptqmodel_python, "-I", script, dirs["base"], out], capture_output=True, text=True,
                          env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.copy(DEMO_MODEL / "tokenizer.model", out)  # GPTQModel writes tokenizer.json only
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == "gptq" and config["meta"]["quantizer"] == ["gptqmodel:7.7.0"]
    by = rows(check_report(dirs, out))
    assert by["gptqmodel"]["passed"] is True and by["transformers + gptqmodel"]["passed"] is True
    assert by["quantkit"]["vs_base"]["kl_mean"] < 0.1  # quantkit's reading of the file is GPTQModel's


# -- bad input: one line each, exit 1 ---------------------------------------------------------------------------

def test_check_refuses_a_dense_directory(dirs):
    assert_one_line_error(run("check", dirs["base"], "--base", dirs["base"], *WINDOWS, text=dirs["text"]),
                          dirs["base"], "not a quantized directory")


def test_check_refuses_a_base_with_another_vocabulary(dirs):
    other = dirs["root"] / "other-vocab"
    if not other.exists():
        save_model(peaked_model(hidden_size=128, intermediate_size=256, vocab_size=4160), other,
                   tokenizer_dir=DEMO_MODEL)
    out = quantized(dirs, "ct-int4", "--method", "int4", "--group-size", 32)
    assert_one_line_error(run("check", out, "--base", other, *WINDOWS, text=dirs["text"]),
                          "has a vocabulary of 4096", "4160")


def test_a_runtime_that_crashes_is_one_line(dirs, tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\necho 'RuntimeError: boom' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("QUANTKIT_GPTQMODEL_PYTHON", str(fake))
    out = quantized(dirs, "w4g32-asym", *GPTQ_LAYOUTS["w4g32-asym"])
    result = run("check", out, "--base", dirs["base"], *WINDOWS, text=dirs["text"])
    assert result.exit_code == 1 and "Traceback" not in result.output.replace("echo", "")
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert error == [f"Error: {out}: gptqmodel, transformers + gptqmodel did not load it or added more than 0.0001 "
                     f"nats of mean KL against quantkit's model (see above)"]
    assert "gptqmodel: gptqmodel crashed (exit status 1): RuntimeError: boom" in result.output
    monkeypatch.setenv("QUANTKIT_GPTQMODEL_PYTHON", str(tmp_path / "nope"))
    assert_one_line_error(run("check", out, "--base", dirs["base"], *WINDOWS, text=dirs["text"]),
                          "QUANTKIT_GPTQMODEL_PYTHON=", "no such interpreter")


def test_run_check_library_call(dirs):
    out = quantized(dirs, "ct-int4", "--method", "int4", "--group-size", 32)
    data = eval_data(Tokenizer(DEMO_MODEL / "tokenizer.model"), dirs["text"], seq_len=64)
    report = run_check(out, dirs["base"], data, CheckOptions(windows=1, progress=False))
    assert report["windows"] == 1 and report["seq_len"] == 64 and report["format"] == "compressed-tensors"
    assert [row["runtime"] for row in report["rows"]] == [
        "quantkit", "quantkit int4 kernel", "quantkit bfloat16 (noise floor)", "transformers"]
