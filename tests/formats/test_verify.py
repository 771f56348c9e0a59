"""`quantkit verify` and load: damaged files are found, every problem named with its file (and tensor)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.backends.bnb import BnbInt8Config, BnbNF4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.run.export import ExportOptions
from quantkit.formats.base import padding_problems
from quantkit.io.manifest import MANIFEST_FILE, write_manifest
from quantkit.quant.packing import pack
from quantkit.run.pipeline import quantize_checkpoint
from quantkit.formats.verify import verify_dir

MODULE = "model.layers.0.mlp.gate_proj"  # 128 out x 64 in in tiny_config
# (method config, format, the module's scale tensor, a tensor whose header shape the test transposes)
CASES = {"rtn-ct": (RTNConfig(4, 32), "compressed-tensors", "weight_scale", "weight_scale"),
         "rtn-gptq": (RTNConfig(4, 32), "gptq", "scales", "scales"),
         "nf4-bnb": (BnbNF4Config(), "bnb", "weight.nested_absmax", "weight"),
         "int8-bnb": (BnbInt8Config(), "bnb", "SCB", "weight")}


def quantized(tiny_model_dir, tmp_path, case, **export) -> object:
    config, fmt, _, _ = CASES[case]
    out = tmp_path / case
    quantize_checkpoint(tiny_model_dir, config, out, ExportOptions(format=fmt, **export), progress=False)
    return out


def header(path):
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return n, json.loads(path.read_bytes()[8:8 + n])


def flip_byte(path, tensor):
    n, head = header(path)
    data = bytearray(path.read_bytes())
    data[8 + n + head[tensor]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))


def transpose_header(path, tensor):
    """Store the tensor's shape reversed (the same bytes): only a check of shapes can tell."""
    n, head = header(path)
    head[tensor]["shape"] = head[tensor]["shape"][::-1]
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + path.read_bytes()[8 + n:])


def set_value(path, tensor, value, index=0):
    """Rewrite one element of a tensor, keeping the file's metadata."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[tensor].view(-1)[index] = value
    save_file(tensors, path, metadata=metadata)


def change_config(d):
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    assert (d / "config.json").read_text() != text


def problems_of(d) -> list[str]:
    report = verify_dir(d)
    assert all("\n" not in p for p in report.problems)
    return report.problems


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_output_verifies_and_loads(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    report = verify_dir(d)
    written = {p.name for p in d.iterdir()} - {MANIFEST_FILE}  # config, weights, errors, tokenizer files
    assert report.ok and report.manifest and report.files == len(written) >= 6
    assert report.tensors == len(header(d / "model.safetensors")[1]) - 1  # all but __metadata__
    result = CliRunner().invoke(main, ["verify", str(d)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{d}: {report.files} files, {report.tensors} tensors verified"


@pytest.mark.parametrize("case", CASES)
def test_a_flipped_byte_in_tensor_data_is_found_and_refused(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    flip_byte(d / "model.safetensors", f"{MODULE}.{CASES[case][2]}")
    assert problems_of(d) == [f"{d / 'model.safetensors'}: sha256 differs from {MANIFEST_FILE}: the file is "
                              f"damaged or was changed after quantkit wrote it: copy or quantize it again (changed on "
                              f"purpose? then delete {MANIFEST_FILE})"]
    with pytest.raises(QuantkitError, match=f"^{d / 'model.safetensors'}: sha256 differs"):
        quantkit.load(d)


@pytest.mark.parametrize("case", ["rtn-ct", "nf4-bnb"])
def test_a_truncated_shard_is_found_and_refused(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case, max_shard_size="300KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    found = problems_of(d)
    assert found[0].startswith(f"{shard}: ") and "truncated" in found[0]
    assert "could not be checked" in found[-1]
    with pytest.raises(QuantkitError, match=f"^{shard}: .* bytes, but {MANIFEST_FILE} says"):
        quantkit.load(d)


@pytest.mark.parametrize("case", CASES)
def test_a_changed_config_json_is_found_and_refused(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    change_config(d)
    assert problems_of(d) == [f"{d / 'config.json'}: sha256 differs from {MANIFEST_FILE}: the file is "
                              f"damaged or was changed after quantkit wrote it: copy or quantize it again (changed on "
                              f"purpose? then delete {MANIFEST_FILE})"]
    with pytest.raises(QuantkitError, match=f"^{d / 'config.json'}: sha256 differs"):
        quantkit.load(d)


@pytest.mark.parametrize("case", CASES)
def test_a_nan_scale_is_found_by_the_qparams_check_alone(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    tensor = f"{MODULE}.{CASES[case][2]}"
    set_value(d / "model.safetensors", tensor, float("nan"))
    write_manifest(d)  # the manifest agrees: only the check of the values can tell
    (problem,) = problems_of(d)
    assert problem.startswith(f"{d / 'model.safetensors'}: {tensor}: 1 of ") and "NaN or infinite" in problem
    with pytest.raises(QuantkitError, match=f"^{d / 'model.safetensors'}: {tensor}: 1 of .* NaN or infinite"):
        quantkit.load(d)


@pytest.mark.parametrize("case", ["rtn-ct", "rtn-gptq"])
def test_a_negative_scale_is_found(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    set_value(d / "model.safetensors", f"{MODULE}.{CASES[case][2]}", -1.0)
    write_manifest(d)
    (problem,) = problems_of(d)
    assert "are negative" in problem and f"{MODULE}.{CASES[case][2]}" in problem


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_shape_in_a_header_is_found(tiny_model_dir, tmp_path, case):
    d = quantized(tiny_model_dir, tmp_path, case)
    tensor = f"{MODULE}.{CASES[case][3]}"
    transpose_header(d / "model.safetensors", tensor)
    assert any("sha256 differs" in p for p in problems_of(d))  # the manifest sees it...
    write_manifest(d)
    (problem,) = problems_of(d)  # ...and so does the shape check, with the manifest agreeing
    assert problem.startswith(f"{d / 'model.safetensors'}: {MODULE}")
    assert "config.json implies" in problem or "does not match its quantization_config" in problem
    if case != "nf4-bnb":  # bitsandbytes reads a packed 4-bit weight flat: either shape loads the same
        with pytest.raises(QuantkitError, match=f"^{d / 'model.safetensors'}: "):
            quantkit.load(d)


def test_a_g_idx_that_is_not_a_group_map_is_found_and_refused(tiny_model_dir, tmp_path):
    d = quantized(tiny_model_dir, tmp_path, "rtn-gptq")
    set_value(d / "model.safetensors", f"{MODULE}.g_idx", 1, index=0)  # group 1 now has 33 columns, group 0 31
    write_manifest(d)
    (problem,) = problems_of(d)
    assert f"{MODULE}.g_idx: not a group map: group 0 has 31 columns, expected 32" in problem
    with pytest.raises(QuantkitError, match="not a group map"):
        quantkit.load(d)


def test_a_symmetric_gptq_zero_point_off_center_is_found(tiny_model_dir, tmp_path):
    out = tmp_path / "sym"
    quantize_checkpoint(tiny_model_dir, RTNConfig(4, 32, True), out, ExportOptions(format="gptq"), progress=False)
    set_value(out / "model.safetensors", f"{MODULE}.qzeros", 0)
    write_manifest(out)
    (problem,) = problems_of(out)
    assert f"{MODULE}.qzeros: the scheme is symmetric but 8 zero point(s) are not 2^(bits-1) = 8" in problem


def test_padding_bits_past_the_last_packed_value_are_found():
    packed = pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4, dim=1)  # 12 of 32 bits used
    assert padding_problems("m", "weight_packed", packed, 4, 3, dim=1) == []
    assert padding_problems("m", "weight_packed", packed | (1 << 20), 4, 3, dim=1) == [
        "m.weight_packed: nonzero bits past the last packed value: the tensor is corrupt; re-export the model"]


def test_every_problem_is_reported_and_the_cli_exits_1(tiny_model_dir, tmp_path):
    d = quantized(tiny_model_dir, tmp_path, "rtn-ct")
    set_value(d / "model.safetensors", f"{MODULE}.weight_scale", float("inf"))
    set_value(d / "model.safetensors", "model.layers.1.self_attn.q_proj.weight_scale", float("nan"))
    write_manifest(d)
    change_config(d)
    (d / "notes.txt").write_text("added")
    found = problems_of(d)
    assert len(found) == 4
    assert [p.split(": ")[0] for p in found] == [str(d / "config.json"), str(d / "notes.txt")] + \
        [str(d / "model.safetensors")] * 2
    result = CliRunner().invoke(main, ["verify", str(d)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[:4] == found and lines[-1].startswith(f"Error: {d}: 4 problem(s) found")
    result = CliRunner().invoke(main, ["verify", str(d), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["problems"] == found and report["files"] == len(list(d.iterdir())) - 2


def test_without_a_manifest_tensors_are_still_checked_with_a_warning(tiny_model_dir, tmp_path):
    d = quantized(tiny_model_dir, tmp_path, "rtn-gptq")
    (d / MANIFEST_FILE).unlink()
    result = CliRunner().invoke(main, ["verify", str(d)])
    assert result.exit_code == 0
    assert f"{d}: no {MANIFEST_FILE} (file checksums not checked), 63 tensors verified" in result.stdout
    assert "Warning:" in result.stderr and "another tool" in result.stderr
    set_value(d / "model.safetensors", f"{MODULE}.scales", float("nan"))
    result = CliRunner().invoke(main, ["verify", str(d), "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["manifest"] is False


def test_dense_directories_verify_too(tiny_model_dir):
    assert verify_dir(tiny_model_dir).ok
    transpose_header(tiny_model_dir / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    write_manifest(tiny_model_dir)
    problem = problems_of(tiny_model_dir)[0]
    assert problem.startswith(f"{tiny_model_dir / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight "
                              f"has shape [64, 128]")
    with pytest.raises(QuantkitError, match="has shape"):
        quantkit.load(tiny_model_dir)


def test_verify_of_a_missing_directory_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error:" in result.output
