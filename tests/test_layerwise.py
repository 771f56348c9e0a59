"""Calibrated (GPTQ) quantization end to end: streamed and in-memory agree, both formats reload, errors."""

import pytest
import torch

import quantkit
from quantkit.backends.gptq import GPTQConfig
from quantkit.backends.rtn import RTNConfig
from quantkit.export import ExportOptions
from quantkit.layerwise import CalibrationOptions, quantize_calibrated
from quantkit.model.layout import SEQUENTIAL_GROUPS
from quantkit.errors import QuantkitError
from quantkit.model import save_model
from quantkit.pipeline import quantize_checkpoint
from quantkit.backends import Recipe
from tests.conftest import random_model, tiny_config

SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TOKENS = torch.randint(3, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = TOKENS[:2, :16]


@pytest.fixture
def model_dir(tmp_path, tokenizer_file):
    out = tmp_path / "src"
    save_model(random_model(tiny_config(**SHAPES)), out, tokenizer_dir=tokenizer_file.parent, dtype="fp16")
    return out


CASES = [GPTQConfig(4, 32), GPTQConfig(3, 64, symmetric=True), GPTQConfig(4, 32, desc_act=True),
         GPTQConfig(4, 32, desc_act=True, static_groups=True), GPTQConfig(8, -1), GPTQConfig(2, 64, mse=True),
         GPTQConfig(4, 64, true_sequential=False)]


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("config", CASES, ids=lambda c: c.describe())
def test_streamed_export_reloads_to_the_in_memory_model(model_dir, tmp_path, config, fmt):
    in_memory = quantkit.load(model_dir)
    reports = quantize_calibrated(in_memory, config, TOKENS, progress=False)
    if fmt == "compressed-tensors" and config.desc_act and not config.static_groups:
        with pytest.raises(QuantkitError, match="act-order"):
            quantize_checkpoint(model_dir, config, tmp_path / "q", ExportOptions(format=fmt), calibration=TOKENS,
                                progress=False)
        return
    summary = quantize_checkpoint(model_dir, config, tmp_path / "q", ExportOptions(format=fmt), calibration=TOKENS,
                                  progress=False)
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "q")(IDS), in_memory(IDS))
    assert [e["name"] for e in summary.errors] == [r.name for r in reports]
    assert len(reports) == 14 and all(0 < r.relative_error < 1 for r in reports)


def test_true_sequential_order_and_per_linear_errors(model_dir):
    model = quantkit.load(model_dir)
    reports = quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False)
    order = [name for group in SEQUENTIAL_GROUPS for name in group]
    assert [r.name for r in reports] == [f"model.layers.{i}.{n}" for i in range(2) for n in order]


def test_gptq_beats_rtn_on_the_model_output(model_dir):
    base = quantkit.load(model_dir, dtype="fp32")
    with torch.no_grad():
        ref = base(TOKENS)

    def error(model):
        with torch.no_grad():
            return (model(TOKENS) - ref).norm().item()

    gptq = quantkit.load(model_dir, dtype="fp32")
    quantize_calibrated(gptq, GPTQConfig(3, 32), TOKENS, progress=False)
    rtn = quantkit.quantize(quantkit.load(model_dir, dtype="fp32"), RTNConfig(3, 32))
    assert error(gptq) < error(rtn)


def test_mixed_recipe_gptq_and_rtn(model_dir, tmp_path):
    recipe = Recipe(GPTQConfig(4, 32), rules=[(r"down_proj$", RTNConfig(8, -1))], ignore=[r"layers\.1\.self_attn"])
    summary = quantize_checkpoint(model_dir, recipe, tmp_path / "q", ExportOptions(format="compressed-tensors"),
                                  calibration=TOKENS, progress=False)
    model = quantkit.load(tmp_path / "q")
    assert model.model.layers[0].mlp.down_proj.bits == 8
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert {e["method"] for e in summary.errors} == {"gptq", "rtn"}


# -- bad input -------------------------------------------------------------------------------------

def test_gptq_without_calibration(model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="method gptq needs calibration data: pass --calib"):
        quantize_checkpoint(model_dir, GPTQConfig(), tmp_path / "q", progress=False)
    with pytest.raises(QuantkitError, match="needs calibration data"):
        quantkit.quantize(quantkit.load(model_dir), GPTQConfig())


@pytest.mark.parametrize("tokens, message", [
    (torch.randint(0, 10, (4,)), "must be 2-D \\[n_samples, seq_len\\]"),
    (torch.rand(4, 8), "must be integers"),
    (torch.full((2, 8), 5000), "token id 5000 is outside the tokenizer's vocabulary \\[0, 4096\\)"),
])
def test_bad_calibration_tensor(model_dir, tmp_path, tokens, message):
    with pytest.raises(QuantkitError, match=message):
        quantize_checkpoint(model_dir, GPTQConfig(4, 32), tmp_path / "q", calibration=tokens, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("make, message", [
    (lambda: GPTQConfig(bits=5), "--bits 5 is not supported"),
    (lambda: GPTQConfig(damp_percent=0), "--damp 0 must be in"),
    (lambda: GPTQConfig(group_size=-1, static_groups=True), "--static-groups needs a --group-size"),
])
def test_bad_gptq_options(make, message):
    with pytest.raises(QuantkitError, match=message):
        make()


def test_token_file_needs_no_tokenizer(model_dir, tmp_path):
    (model_dir / "tokenizer.model").unlink()
    torch.save(TOKENS, tmp_path / "tokens.pt")
    summary = quantize_checkpoint(model_dir, GPTQConfig(4, 32), tmp_path / "q", progress=False,
                                  calibration=CalibrationOptions(str(tmp_path / "tokens.pt"), n_samples=8, seq_len=32))
    assert len(summary.errors) == 14


def test_gptq_calibrates_a_model_with_pretraining_tp(model_dir):
    """pretraining_tp slices bypass the linears' forward hooks: calibration must run at tp=1, not see zero Hessians."""
    model = quantkit.load(model_dir, dtype="fp32")
    model.set_pretraining_tp(2)
    reports = quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False)
    assert all(0 < r.relative_error < 1 and r.kind == "output" for r in reports)
    assert model.model.layers[0].self_attn.pretraining_tp == 2
    assert model.model.layers[0].self_attn.q_proj.dequantize().abs().sum() > 0
