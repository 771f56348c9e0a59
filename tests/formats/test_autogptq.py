"""GPTQ (AutoGPTQ v1): round trips, an independent AutoGPTQ-style unpacker, config, bad input."""

import json
import logging
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from quantkit.backends import Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.export import save_quantized
from quantkit.formats import format_for, get_format
from quantkit.formats.autogptq import GPTQFormat
from quantkit.modules import AffineLinear
from quantkit.record import QuantRecord
from tests.conftest import random_model, tiny_config
from tests.formats.test_compressed_tensors import GPTQLike, assert_same_affine, make_affine, relative

NAME = "model.layers.0.mlp.down_proj"
N, K = 48, 256  # N*3 bits is not a multiple of 32: 3-bit qzeros straddle int32 words
GRID = [(bits, gs, sym, act) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for sym in (True, False)
        for act in (False, True) if not (act and gs == -1)]  # per channel has one group: nothing to reorder


def export(module: nn.Module, name: str = NAME) -> dict[str, torch.Tensor]:
    return relative(name, GPTQFormat().export_module(name, module))


def gptq_config(bits, gs, sym, act=False):
    return GPTQFormat().quantization_config({NAME: GPTQLike(bits, gs, sym, desc_act=act)}, ["lm_head"])


# -- an independent reader of the v1 layout, written the way AutoGPTQ's torch dequantization reads it --

def unpack_columns(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 (W, C) packed down each column -> (count, C): value i takes bits [i*b, i*b + b) of the column's
    stream, word w holding stream bits [32w, 32w + 32), least significant first."""
    u = words.to(torch.int64) & 0xFFFFFFFF  # the words as unsigned 32-bit
    out = torch.zeros(count, words.shape[1], dtype=torch.int64)
    for i in range(count):
        word, shift = divmod(i * bits, 32)
        value = u[word] >> shift
        if shift + bits > 32:  # straddles into the next word (3 bits)
            value = value | (u[word + 1] << (32 - shift))
        out[i] = value & (2**bits - 1)
    return out


def autogptq_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """(N, K) fp16 weight from qweight/qzeros/scales/g_idx, as AutoGPTQ's QuantLinear dequantizes."""
    k, n = t["g_idx"].numel(), t["scales"].shape[1]
    q = unpack_columns(t["qweight"], bits, k)  # (K, N)
    zeros = unpack_columns(t["qzeros"].t(), bits, n).t()  # (G, N), stored z - 1
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
    assert torch.equal(autogptq_dequantize(export(module), bits), module.dequantize())


def test_g_idx_is_written_without_act_order():
    tensors = export(AffineLinear(make_affine(N, K, 4, 64, True), dtype=torch.float16))
    assert torch.equal(tensors["g_idx"], (torch.arange(K) // 64).to(torch.int32))
    per_channel = export(AffineLinear(make_affine(N, K, 4, -1, True), dtype=torch.float16))
    assert torch.equal(per_channel["g_idx"], torch.zeros(K, dtype=torch.int32))


def test_v1_zero_convention_and_zero_point_zero(caplog):
    # Symmetric 4-bit z = 8 is stored as 7 in every nibble (AutoGPTQ's 0x77777777).
    sym = export(AffineLinear(make_affine(N, K, 4, 32, True), dtype=torch.float16))
    assert bool((sym["qzeros"] == 0x77777777).all())
    # z = 0 is stored as (0 - 1) & 15 = 15 and read back as (15 + 1) & 15 = 0; kernels without the mask differ.
    w = make_affine(N, K, 4, 32, False)
    w.zero[0, 0] = 0
    module = AffineLinear(w, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        tensors = export(module)
    assert "1 group(s) have zero point 0" in caplog.text
    assert int(tensors["qzeros"][0, 0]) & 0xF == 15
    assert_same_affine(GPTQFormat().load_module(NAME, tensors, gptq_config(4, 32, False), torch.float16)
                       .affine_weight(), module.affine_weight())
    assert torch.equal(autogptq_dequantize(tensors, 4), module.dequantize())


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
                  "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq"}
    assert json.loads(fmt.extra_files(qc)["quantize_config.json"]) == qc
    parsed = transformers.GPTQConfig.from_dict(qc)  # transformers' own validation of the fields
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.format) == (4, 128, False, "gptq")


def test_config_reads_gptq_options():
    config = GPTQLike(3, -1, True, desc_act=True, damp_percent=0.05, true_sequential=False)
    qc = GPTQFormat().quantization_config({NAME: config}, ["lm_head"])
    assert qc == {"quant_method": "gptq", "bits": 3, "group_size": -1, "sym": True, "desc_act": True,
                  "damp_percent": 0.05, "true_sequential": False, "static_groups": False, "checkpoint_format": "gptq"}


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
        assert torch.equal(autogptq_dequantize(own, 4), model.get_submodule(name).dequantize())
