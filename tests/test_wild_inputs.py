"""Checkpoints as they come, found by trying them as a user: mixed stored dtypes, casts that overflow, generate on
a model whose logits overflow, activations quantkit does not compute, warnings said once per command."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.backends import QuantConfig
from quantkit.errors import QuantkitError
from quantkit.model import Checkpoint, save_model
from tests.conftest import random_model, tiny_config
from tests.helpers import one_line_error, run




def rewrite(model_dir, edit_tensors=None, edit_config=None):
    """Rewrite model.safetensors and config.json in place (and drop the manifest, as a hand edit does)."""
    path = model_dir / "model.safetensors"
    if edit_tensors is not None:
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((model_dir / "config.json").read_text())
        edit_config(config)
        (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "quantkit_manifest.json").unlink(missing_ok=True)


@pytest.fixture
def fp16_dir(tmp_path, tokenizer_file):
    out = tmp_path / "fp16"
    save_model(random_model(tiny_config()), out, tokenizer_dir=tokenizer_file.parent, dtype="fp16")
    return out


def every_other_bf16(tensors):
    for i, name in enumerate(sorted(tensors)):
        if i % 2:
            tensors[name] = tensors[name].to(torch.bfloat16)


@pytest.mark.parametrize("stated", [None, "float16"])
def test_mixed_stored_dtypes_compute_and_write_in_float32_with_one_warning(fp16_dir, tmp_path, caplog, stated):
    def config(c):
        c.pop("dtype", None)
        if stated:
            c["torch_dtype"] = stated
    rewrite(fp16_dir, every_other_bf16, config)
    ckpt = Checkpoint(fp16_dir)
    assert ckpt.stored_dtype == torch.float32 and ckpt.output_dtype() == torch.float32
    assert caplog.text.count("mix of dtypes") == 1 and "bfloat16" in caplog.text and "float16" in caplog.text
    out = tmp_path / "q"
    quantkit.quantize_checkpoint(fp16_dir, QuantConfig.from_dict({"method": "int4", "group_size": 32}), out,
                                 progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert f.get_slice(name).get_dtype() == "F32"


def test_a_cast_that_overflows_is_refused_naming_the_tensor(tmp_path, tokenizer_file):
    src = tmp_path / "bf16"
    save_model(random_model(tiny_config()), src, tokenizer_dir=tokenizer_file.parent, dtype="bf16")

    def big(tensors):
        tensors["lm_head.weight"][5, 3] = 1e6  # fine in bf16, inf in fp16
    rewrite(src, big)
    one_line_error(run("quantize", src, "--method", "int4", "--group-size", "32", "-o", tmp_path / "q", "--dtype",
                       "fp16"), "lm_head.weight", "--dtype bf16")
    assert not (tmp_path / "q").exists()
    assert run("quantize", src, "--method", "int4", "--group-size", "32", "-o", tmp_path / "q2").exit_code == 0


@pytest.fixture
def overflowing_dir(tmp_path, tokenizer_file):
    """fp32 weights whose fp16 forward overflows (a huge post-attention norm); fine in fp32."""
    model = random_model(tiny_config())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(3000)
    out = tmp_path / "ovf"
    save_model(model, out, tokenizer_dir=tokenizer_file.parent)
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]]))).all()
    return out


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--seed", "1"]], ids=["greedy", "sampled"])
def test_generate_with_overflowing_logits_is_one_line(overflowing_dir, sampling):
    line = one_line_error(run("generate", overflowing_dir, "The list", "--dtype", "fp16", "--max-new-tokens", "4",
                              *sampling), overflowing_dir, "non-finite logits", "--dtype bf16")
    assert "token 0" in line
    assert run("generate", overflowing_dir, "The list", "--max-new-tokens", "4", *sampling).exit_code == 0


def test_a_non_finite_fp32_metric_does_not_suggest_fp32(tmp_path, tokenizer_file):
    model = random_model(tiny_config())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    src = tmp_path / "nan"
    save_model(model, src, tokenizer_dir=tokenizer_file.parent)
    text = tmp_path / "t.txt"
    text.write_text("The list type is a mutable sequence. " * 20)
    line = one_line_error(run("eval", src, "--dataset", text, "--seq-len", "32", "--no-speed"), "non-finite")
    assert "--dtype fp32" not in line and "damaged" in line


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_act", "gelu", 'hidden_act is "gelu"'),
    ("hidden_act", None, "hidden_act is null"),
    ("rms_norm_eps", 1e300, "float32 holds"),
    ("rms_norm_eps", 1.5, "small positive number"),
    ("rope_theta", 1e39, "float32 holds"),
])
def test_config_values_the_model_cannot_compute_are_refused(fp16_dir, key, value, needle):
    rewrite(fp16_dir, edit_config=lambda c: c.update({key: value}))
    with pytest.raises(QuantkitError, match="config.json: ") as e:
        Checkpoint(fp16_dir)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_command_says_each_warning_once(fp16_dir, tmp_path):
    def config(c):
        c.pop("dtype", None)
        c["torch_dtype"] = "bfloat16"  # the weights are fp16: one warning, though eval opens the directory 5 times
    rewrite(fp16_dir, edit_config=config)
    text = tmp_path / "t.txt"
    text.write_text("The list type is a mutable sequence. " * 20)
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "eval", str(fp16_dir), "--dataset", str(text),
                           "--seq-len", "32", "--no-speed"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the weights are stored as float16") == 1, proc.stderr


@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_an_output_under_a_file_is_one_line(fp16_dir, tmp_path, command):
    (tmp_path / "afile").write_text("x")
    one_line_error(run(command, fp16_dir, "--method", "int4", "--group-size", "32", "-o", tmp_path / "afile" / "x"),
                   "is a file, not a directory")


@pytest.mark.parametrize("flags, needle", [(["--n-samples", "0"], "n_samples=0"), (["--seq-len", "-5"], "seq_len=-5")])
def test_plan_refuses_calibration_that_cannot_exist(fp16_dir, flags, needle):
    one_line_error(run("plan", fp16_dir, "--method", "gptq", "--group-size", "32", *flags), needle)


def test_plan_refuses_the_source_as_output(fp16_dir):
    one_line_error(run("plan", fp16_dir, "--method", "int4", "--group-size", "32", "-o", fp16_dir),
                   "is (or holds) the source")
