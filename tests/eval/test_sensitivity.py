"""Sensitivity: one decoder layer (or one linear type) quantized at a time, its KL against the base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quantkit
import quantkit.backends
from quantkit.eval import evaluate, text_data
from quantkit.eval.sensitivity import sensitivity
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from tests.conftest import DEMO_MODEL, peaked_model

TEXT = (DEMO_MODEL / "test.txt").read_text(encoding="utf-8")[:1200]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
CONFIG = RTNConfig(bits=3, group_size=32)


def quantized_names(model):
    return {name for name, m in model.named_modules() if hasattr(m, "quant_record")}


def full_precision_names(model):
    return {name for name, m in model.named_modules() if type(m) is nn.Linear and ".layers." in name}


@pytest.fixture(scope="module")
def data(tokenizer_file):
    return text_data(quantkit.load_tokenizer(tokenizer_file), TEXT, seq_len=32)


@pytest.fixture(scope="module")
def base():
    return peaked_model()


@pytest.fixture(scope="module")
def full_kl(base, data):
    """KL of the fully quantized model: every variant quantizes a part of it, so each should cost less."""
    model = quantkit.quantize(copy.deepcopy(base), CONFIG)
    return evaluate(model, data, base=base, progress=False).fidelity["kl"]["mean"]


@pytest.fixture
def spy(monkeypatch):
    """Records, for every variant sensitivity() quantizes, which linears ended up quantized and which not."""
    seen = []
    quantize = quantkit.backends.quantize

    def recording(model, config, ignore=(), prefix=""):
        out = quantize(model, config, ignore=ignore, prefix=prefix)
        seen.append((quantized_names(out), full_precision_names(out)))
        return out

    monkeypatch.setattr(quantkit.backends, "quantize", recording)  # sensitivity imports it at call time
    return seen


def test_one_row_per_layer(base, data, full_kl, spy):
    result = sensitivity(base, data, CONFIG, unit="layer", progress=False)
    assert result["unit"] == "layer" and result["method"] == "rtn w3 g32"
    assert [r["name"] for r in result["rows"]] == ["layer 0", "layer 1"]
    for row in result["rows"]:
        assert set(row) == {"name", "kl_mean", "kl_stderr", "ppl"}
        assert 0 < row["kl_mean"] < full_kl and row["kl_stderr"] > 0 and row["ppl"] > 1
    # each variant quantized exactly its own layer's 7 linears and left the other layer in full precision
    assert len(spy) == 2
    for layer, (quantized, kept) in enumerate(spy):
        assert quantized == {f"model.layers.{layer}.{name}" for name in LINEARS}
        assert kept == {f"model.layers.{1 - layer}.{name}" for name in LINEARS}


def test_one_row_per_linear_type(base, data, full_kl, spy):
    result = sensitivity(base, data, CONFIG, unit="linear", batch_size=2, progress=False)
    assert [r["name"] for r in result["rows"]] == LINEARS
    assert all(0 < r["kl_mean"] < full_kl for r in result["rows"])
    for name, (quantized, kept) in zip(LINEARS, spy):
        assert quantized == {f"model.layers.{i}.{name}" for i in range(2)}
        assert len(kept) == 2 * 6


def test_base_model_is_left_unquantized(base, data):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    sensitivity(base, data, CONFIG, unit="layer", progress=False)
    assert quantized_names(base) == set() and len(full_precision_names(base)) == 14
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_rows_match_evaluating_the_variant_directly(base, data):
    """Row 'layer 1' is the KL of the model with only layer 1 quantized (uint16 base encoding: ~1e-6 relative)."""
    row = sensitivity(base, data, CONFIG, unit="layer", progress=False)["rows"][1]
    variant = quantkit.quantize(copy.deepcopy(base), CONFIG, ignore=(r"^model\.layers\.0\.",))
    direct = evaluate(variant, data, base=base, progress=False)
    assert row["kl_mean"] == pytest.approx(direct.fidelity["kl"]["mean"], rel=1e-4)
    assert row["ppl"] == pytest.approx(direct.perplexity.ppl, rel=1e-9)


@pytest.mark.parametrize("unit", ["block", "layers", ""])
def test_a_bogus_unit(base, data, unit):
    with pytest.raises(QuantkitError, match="choose one of layer, linear"):
        sensitivity(base, data, CONFIG, unit=unit, progress=False)
