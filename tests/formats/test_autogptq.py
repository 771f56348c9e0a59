"""GPTQ (v1 for symmetric schemes, v2 for asymmetric): round trips, an independent unpacker, config, bad input."""

import json
import logging
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import quantkit

from quantkit.backends import Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.export import save_quantized
from quantkit.formats import format_for, get_format
from quantkit.formats.autogptq import GPTQFormat, checkpoint_format
from quantkit.quant.linear import AffineLinear
from quantkit.quant.packing import pack
from quantkit.quant.record import QuantRecord
from tests.conftest import random_model, tiny_config
from tests.helpers import GPTQLike, assert_same_affine, make_affine, relative, unpack_columns

NAME = "model.layers.0.mlp.down_proj"
N, K = 48, 256  # N*3 bits is not a multiple of 32: 3-bit qzeros straddle int32 words
GRID = [(bits, gs, sym, act) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for sym in (True, False)
        for act in (False, True) if not (act and gs == -1)]  # per channel has one group: nothing to reorder


def export(module: nn.Module, name: str = NAME) -> dict[str, torch.Tensor]:
    return relative(name, GPTQFormat().export_module(name, module))


def gptq_config(bits, gs, sym, act=False):
    return GPTQFormat().quantization_config({NAME: GPTQLike(bits, gs, sym, desc_act=act)}, ["lm_head"])


# -- an independent reader of both layouts, written the way AutoGPTQ's (v1) and GPTQModel's (v2) torch
# dequantization read them --


def autogptq_dequantize(t: dict[str, torch.Tensor], bits: int, layout: str = "gptq") -> torch.Tensor:
    """(N, K) fp16 weight from qweight/qzeros/scales/g_idx, as AutoGPTQ's QuantLinear dequantizes (v1: z - 1
    stored) or GPTQModel's (v2: z stored)."""
    k, n = t["g_idx"].numel(), t["scales"].shape[1]
    q = unpack_columns(t["qweight"], bits, k)  # (K, N)
    zeros = unpack_columns(t["qzeros"].t(), bits, n).t()  # (G, N)
    if layout == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)  # AutoGPTQ adds 1 back, masked
    g = t["g_idx"].long()
    w = (q - zeros[g]).to(torch.float16) * t["scales"][g]  # (K, N)
    return w.t()


# -- round trip and the independent reader -------------------------------------------------------------

@pytest.mark.parametrize("bits,gs,sym,act", GRID)
def test_round_trip_is_exact(bits, gs, sym, act):
    w = make_affine(N, K, bits, gs, sym, act_order=act)
    module = AffineLinear(w, dtype=torch.float16)  # gptq stores fp16 scales: exact for an fp16 model
    tensors = export(module)
    g = 1 if gs == -1 else K // gs
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {
        "qweight": ((-(-K * bits // 32), N), torch.int32), "qzeros": ((g, -(-N * bits // 32)), torch.int32),
        "scales": ((g, N), torch.float16), "g_idx": ((K,), torch.int32)}
    loaded = GPTQFormat().load_module(NAME, tensors, gptq_config(bits, gs, sym, act), torch.float16)
    assert_same_affine(loaded.affine_weight(), module.affine_weight())
    x = torch.randn(3, K, dtype=torch.float16)
    assert torch.equal(loaded(x), module(x))


@pytest.mark.parametrize("bits,gs,sym,act", GRID)
def test_autogptq_reader_recovers_our_weights(bits, gs, sym, act):
    # Exact: both sides are the fp16 product of the same integer (q - z) and the same fp16 scale.
    module = AffineLinear(make_affine(N, K, bits, gs, sym, act_order=act), dtype=torch.float16)
    assert torch.equal(autogptq_dequantize(export(module), bits, checkpoint_format(sym)), module.dequantize())


def test_g_idx_is_written_without_act_order():
    tensors = export(AffineLinear(make_affine(N, K, 4, 64, True), dtype=torch.float16))
    assert torch.equal(tensors["g_idx"], (torch.arange(K) // 64).to(torch.int32))
    per_channel = export(AffineLinear(make_affine(N, K, 4, -1, True), dtype=torch.float16))
    assert torch.equal(per_channel["g_idx"], torch.zeros(K, dtype=torch.int32))


def test_symmetric_is_v1_asymmetric_is_v2_and_zero_point_zero_is_exact(caplog):
    # Symmetric 4-bit z = 8 is stored as 7 in every nibble (AutoGPTQ's 0x77777777), in the v1 layout every runtime reads.
    sym = export(AffineLinear(make_affine(N, K, 4, 32, True), dtype=torch.float16))
    assert bool((sym["qzeros"] == 0x77777777).all())
    assert gptq_config(4, 32, True)["checkpoint_format"] == "gptq"
    # Asymmetric: v2 stores z itself, so z = 0 (which v1 cannot hold) is stored as 0 and read back exactly.
    w = make_affine(N, K, 4, 32, False)
    w.zero[0, 0], w.zero[1, 0] = 0, 15
    module = AffineLinear(w, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        tensors = export(module)
        loaded = GPTQFormat().load_module(NAME, tensors, gptq_config(4, 32, False), torch.float16)
    assert caplog.text == ""
    assert int(tensors["qzeros"][0, 0]) & 0xFF == 0xF0  # field 0 holds z = 0, field 1 z = 15
    assert gptq_config(4, 32, False)["checkpoint_format"] == "gptq_v2"
    assert_same_affine(loaded.affine_weight(), module.affine_weight())
    assert torch.equal(autogptq_dequantize(tensors, 4, "gptq_v2"), module.dequantize())


def v1_qzeros(zero: torch.Tensor, bits: int, whole_word: bool) -> torch.Tensor:
    """Zero points (G, N) stored in v1: per field, masked (AutoGPTQ, older quantkit), or by subtracting one constant
    from each packed word (GPTQModel's convert_gptq_v2_to_v1_format), in int32 arithmetic that wraps."""
    if not whole_word:
        return pack(((zero - 1) & (2**bits - 1)).to(torch.uint8), bits, dim=1)
    words = pack(zero.to(torch.uint8), bits, dim=1).to(torch.int64)
    words = (words - sum(1 << (bits * i) for i in range(32 // bits))) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_files_from_gptqmodel_and_from_autogptq(bits, caplog):
    # GPTQModel >= 0.9 writes asymmetric v1 by whole-word subtraction: a z = 0 borrows from the next field, and its
    # loader adds the constant back. quantkit reads such files (meta.quantizer names gptqmodel) the same way.
    w = make_affine(N, K, bits, 32, False)
    w.zero[0, :] = 0  # every group of row 0: fields that borrow
    module = AffineLinear(w, dtype=torch.float16)
    tensors, w = export(module), module.affine_weight()
    qc = {**gptq_config(bits, 32, False), "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:7.7.0"]}}
    gptqmodel_file = {**tensors, "qzeros": v1_qzeros(w.zero.t(), bits, whole_word=True)}
    assert_same_affine(GPTQFormat().load_module(NAME, gptqmodel_file, qc, torch.float16).affine_weight(), w)
    # AutoGPTQ's convention (per field, masked) for any other v1 file; a stored 2^b - 1 reads as z = 0, with a warning
    other = {**qc, "meta": {"quantizer": ["optimum:1.0"]}}
    autogptq_file = {**tensors, "qzeros": v1_qzeros(w.zero.t(), bits, whole_word=False)}
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        assert_same_affine(GPTQFormat().load_module(NAME, autogptq_file, other, torch.float16).affine_weight(), w)
    assert f"{NAME}.qzeros: {K // 32} group(s) of this GPTQ v1 file store {2**bits - 1}, read as zero point 0" in caplog.text


def test_fp32_model_scales_round_to_fp16_and_bias_is_kept():
    w = make_affine(N, K, 4, 32, False)
    module = AffineLinear(w, torch.randn(N), dtype=torch.float32)
    tensors = export(module)
    assert tensors["bias"].dtype == torch.float16
    loaded = GPTQFormat().load_module(NAME, tensors, gptq_config(4, 32, False), torch.float32)
    assert torch.equal(loaded.weight_scale, module.weight_scale.half().float())
    assert torch.equal(loaded.bias, module.bias.half().float())
    assert torch.equal(loaded.weight_packed, module.weight_packed)


# -- quantization_config ----------------------------------------------------------------------------------

def test_config_json_and_quantize_config_file():
    fmt = GPTQFormat()
    qc = fmt.quantization_config({NAME: Int4Config(128)}, ["lm_head"])
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False,
                  "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                  "checkpoint_format": "gptq_v2", "meta": {"quantizer": [f"quantkit:{quantkit.__version__}"]}}
    assert json.loads(fmt.extra_files(qc)["quantize_config.json"]) == qc
    parsed = transformers.GPTQConfig.from_dict(qc)  # transformers' own validation of the fields
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.format) == (4, 128, False, "gptq_v2")


def test_config_reads_gptq_options():
    config = GPTQLike(3, -1, True, desc_act=True, damp_percent=0.05, true_sequential=False)
    qc = GPTQFormat().quantization_config({NAME: config}, ["lm_head"])
    assert qc == {"quant_method": "gptq", "bits": 3, "group_size": -1, "sym": True, "desc_act": True,
                  "damp_percent": 0.05, "true_sequential": False, "static_groups": False, "checkpoint_format": "gptq",
                  "meta": {"quantizer": [f"quantkit:{quantkit.__version__}"]}}


LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]


def test_mixed_configs_are_refused_clearly():
    recipe = Recipe(default=Int4Config(32), rules=[("down_proj", RTNConfig(8, -1))])
    with pytest.raises(QuantkitError, match=r"gptq: one file holds one quantization scheme, but the recipe uses 2: "
                                            r".*bits=8.*mlp\.down_proj.*--format compressed-tensors"):
        GPTQFormat().quantization_config({n: recipe.config_for(n) for n in LINEARS}, ["lm_head"])


def test_same_ignores_in_every_layer_become_modules_in_block_to_quantize():
    configs = {n: Int4Config(32) for n in LINEARS if not n.endswith("down_proj")}
    ignored = ["lm_head"] + [n for n in LINEARS if n.endswith("down_proj")]
    qc = GPTQFormat().quantization_config(configs, ignored)
    assert qc["modules_in_block_to_quantize"] == [["mlp.up_proj", "self_attn.q_proj"]]
    assert "modules_in_block_to_quantize" not in GPTQFormat().quantization_config(
        {n: Int4Config(32) for n in LINEARS}, ["lm_head"])


def test_ignores_that_differ_between_layers_are_refused():
    configs = {n: Int4Config(32) for n in LINEARS if n != "model.layers.1.mlp.down_proj"}
    with pytest.raises(QuantkitError, match="differ between decoder layers.*--format compressed-tensors"):
        GPTQFormat().quantization_config(configs, ["lm_head", "model.layers.1.mlp.down_proj"])


# -- registry and bad input -----------------------------------------------------------------------------------

def test_registry_finds_the_format():
    qc = gptq_config(4, 128, True)
    assert isinstance(get_format("gptq"), GPTQFormat) and isinstance(format_for(qc), GPTQFormat)
    assert not GPTQFormat.matches({**qc, "checkpoint_format": "marlin"})
    assert GPTQFormat().quantized_modules({f"{NAME}.qweight", f"{NAME}.scales", "lm_head.weight"}) == {NAME}


def test_wrong_shape_names_the_tensor():
    tensors = export(AffineLinear(make_affine(N, K, 4, 32, True), dtype=torch.float16))
    qc = gptq_config(4, 32, True)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.qzeros: is int32 [4, 6], expected int32 [8, 6]")):
        GPTQFormat().load_module(NAME, {**tensors, "qzeros": tensors["qzeros"][:4]}, qc, torch.float16)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.scales: is float32")):
        GPTQFormat().load_module(NAME, {**tensors, "scales": tensors["scales"].float()[:, :10]}, qc, torch.float16)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.g_idx: group indices outside [0, 8)")):
        GPTQFormat().load_module(NAME, {**tensors, "g_idx": tensors["g_idx"] + 1}, qc, torch.float16)
    with pytest.raises(QuantkitError, match="bits=5 group_size=32 are not a gptq scheme"):
        GPTQFormat().load_module(NAME, tensors, {**qc, "bits": 5}, torch.float16)


def test_refuses_what_it_cannot_hold():
    with pytest.raises(QuantkitError, match="not an integer-affine quantized linear"):
        GPTQFormat().export_module(NAME, nn.Linear(K, N))
    module = AffineLinear(make_affine(N, K, 4, 32, True, act_order=True), dtype=torch.float16)
    module.quant_record = QuantRecord(RTNConfig(4, 32, True))  # says no act-order, so loaders would ignore g_idx
    with pytest.raises(QuantkitError, match="act-order g_idx but its config says desc_act=False"):
        GPTQFormat().export_module(NAME, module)


# -- a whole model through the exporter -----------------------------------------------------------------------

def test_save_quantized_writes_gptq_that_reloads_bit_exactly(tmp_path):
    model = quantize(random_model(tiny_config(hidden_size=128, intermediate_size=256)).half(), Int4Config(32))
    path = save_quantized(model, tmp_path / "out", format="gptq")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert json.loads((path / "quantize_config.json").read_text()) == qc
    tensors = load_file(path / "model.safetensors")
    fmt = format_for(qc)
    quantized = fmt.quantized_modules(set(tensors))
    assert quantized == {n for n, m in model.named_modules() if isinstance(m, AffineLinear)}
    for name in quantized:
        own = {k.removeprefix(name + "."): t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        loaded = fmt.load_module(name, own, qc, torch.float16)
        assert_same_affine(loaded.affine_weight(), model.get_submodule(name).affine_weight())
        assert torch.equal(autogptq_dequantize(own, 4, qc["checkpoint_format"]), model.get_submodule(name).dequantize())
