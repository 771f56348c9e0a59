"""The bnb format: transformers' bitsandbytes state_dict layout, exact round trips, transformers loads it on CPU."""

import importlib.util
import json

import pytest
import torch

from bitsandbytes.utils import unpack_tensor_to_dict
from torch import nn

import quantkit
from quantkit.backends import quantize
from quantkit.backends.bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.export import save_quantized
from quantkit.formats import get_format
from quantkit.formats.bnb import BnbFormat
from quantkit.model import save_model
from tests.conftest import random_model, tiny_config
from tests.helpers import BNB_CONFIGS, LINEAR_SHAPES, quantize_linear, toy_linear

FOUR_BIT = [c for c in BNB_CONFIGS if c.method != "bnb-int8"]
ONE_OF_EACH = [BnbNF4Config(), BnbFP4Config(), BnbInt8Config()]


def export(module: nn.Module, name: str = "layer") -> dict[str, torch.Tensor]:
    """Module-relative tensors, as a loader hands them to load_module."""
    return {k.removeprefix(name + "."): v for k, v in BnbFormat().export_module(name, module).items()}


def reload(module: nn.Module, config, dtype=torch.float32) -> nn.Module:
    fmt = BnbFormat()
    return fmt.load_module("layer", export(module), fmt.quantization_config({"layer": config}, []), dtype)


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


# -- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", FOUR_BIT, ids=lambda c: c.describe())
def test_4bit_layout(config):
    tensors = export(quantize_linear(toy_linear(128, 256), config))
    blob = f"weight.quant_state.bitsandbytes__{config.quant_type}"
    nested = {"weight.nested_absmax", "weight.nested_quant_map"} if config.double_quant else set()
    assert set(tensors) == {"weight", "weight.absmax", "weight.quant_map", blob, "bias"} | nested
    assert tensors["weight"].dtype == torch.uint8 and tensors["weight"].shape == (128 * 256 // 2, 1)
    blocks = 128 * 256 // config.blocksize
    assert tensors["weight.absmax"].shape == (blocks,)
    assert tensors["weight.absmax"].dtype == (torch.uint8 if config.double_quant else torch.float32)
    assert tensors["weight.quant_map"].shape == (16,) and tensors[blob].dtype == torch.uint8
    state = unpack_tensor_to_dict(tensors[blob])
    assert (state["quant_type"], state["blocksize"]) == (config.quant_type, config.blocksize)
    assert state["shape"] == [128, 256] and state["dtype"] == "float32"
    assert ("nested_blocksize" in state) == config.double_quant


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_layout(threshold):
    tensors = export(quantize_linear(toy_linear(128, 256), BnbInt8Config(threshold)))
    assert set(tensors) == {"weight", "SCB", "weight_format", "bias"}
    assert tensors["weight"].dtype == torch.int8 and tensors["weight"].shape == (128, 256)
    assert tensors["SCB"].dtype == torch.float32 and tensors["SCB"].shape == (128,)
    assert tensors["weight_format"].dtype == torch.uint8 and tensors["weight_format"].shape == () \
        and int(tensors["weight_format"]) == 0


def test_names_are_what_transformers_deserializes():
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    for config, quantizer in ((BnbNF4Config(), Bnb4BitHfQuantizer), (BnbFP4Config(), Bnb4BitHfQuantizer),
                              (BnbInt8Config(), Bnb8BitHfQuantizer)):
        names = set(export(quantize_linear(toy_linear(128, 256, bias=False), config)))
        assert names <= set(quantizer.serialized_names["weight"])


def test_export_rejects_other_modules():
    with pytest.raises(QuantkitError, match="layer: Linear is not a bitsandbytes module: the bnb format holds"):
        BnbFormat().export_module("layer", nn.Linear(4, 4))


# -- exact round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("config", BNB_CONFIGS, ids=lambda c: c.describe())
def test_export_load_gives_identical_outputs(config, shape):
    module = quantize_linear(toy_linear(*shape), config)
    loaded = reload(module, config)
    x = torch.randn(3, 5, shape[1])
    assert torch.equal(run(loaded, x), run(module, x))
    fmt = BnbFormat()
    assert fmt.config_of("layer", loaded, fmt.quantization_config({"layer": config}, [])) == config
    assert not loaded.training


@pytest.mark.parametrize("config", FOUR_BIT, ids=lambda c: c.describe())
def test_export_is_unchanged_by_running_on_cpu(config):
    """bitsandbytes repacks a Linear4bit on AVX512-BF16 CPUs (absmax to bf16) and its state_dict() undoes that
    lossily; the export must still be the tensors quantization produced."""
    module = quantize_linear(toy_linear(128, 256), config)
    before = {k: v.clone() for k, v in export(module).items()}
    x = torch.randn(4, 256)
    y = run(module, x)
    module.state_dict()  # bitsandbytes' lossy inverse of the repack, where it happened
    after = export(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(reload(module, config), x), y)


def test_bias_is_loaded_in_the_given_dtype():
    module = quantize_linear(toy_linear(128, 256), BnbNF4Config())
    assert reload(module, BnbNF4Config(), dtype=torch.float16).bias.dtype == torch.float16


# -- config.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ONE_OF_EACH + [BnbNF4Config(double_quant=False, compute_dtype="bf16"),
                                                  BnbInt8Config(threshold=0.0)], ids=lambda c: c.describe())
def test_quantization_config_is_transformers_bitsandbytes_config(config):
    from transformers import BitsAndBytesConfig

    ignored = ["model.layers.0.mlp.down_proj", "lm_head"]
    qc = BnbFormat().quantization_config({"model.layers.0.self_attn.q_proj": config}, ignored)
    assert json.loads(json.dumps(qc)) == qc
    assert qc == BitsAndBytesConfig.from_dict(qc).to_dict()  # every key transformers writes, its values
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ignored
    assert qc["llm_int8_has_fp16_weight"] is False and qc["bnb_4bit_quant_storage"] == "uint8"
    if config.method == "bnb-int8":
        assert (qc["load_in_8bit"], qc["load_in_4bit"], qc["llm_int8_threshold"]) == (True, False, config.threshold)
    else:
        compute = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[config.compute_dtype]
        assert (qc["load_in_4bit"], qc["load_in_8bit"], qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"],
                qc["bnb_4bit_compute_dtype"]) == (True, False, config.quant_type, config.double_quant, compute)


def test_lm_head_is_always_skipped():
    qc = BnbFormat().quantization_config({"a": BnbNF4Config()}, ["model.layers.1.mlp.up_proj"])
    assert qc["llm_int8_skip_modules"] == ["model.layers.1.mlp.up_proj", "lm_head"]


@pytest.mark.parametrize("configs, message", [
    ({"a": BnbNF4Config(), "b": BnbNF4Config(blocksize=128)}, "transformers takes one bitsandbytes config per "
                                                              "model, got 2"),
    ({"a": BnbInt8Config(), "b": BnbFP4Config()}, r"got 2 \(bnb-int8\(threshold=6.0\); bnb-fp4\("),
    ({"a": RTNConfig()}, "bnb format: cannot hold method rtn"),
    ({}, "nothing was quantized"),
])
def test_quantization_config_needs_one_bnb_config(configs, message):
    with pytest.raises(QuantkitError, match=message):
        BnbFormat().quantization_config(configs, ["lm_head"])


def test_registered_and_recognised():
    assert isinstance(get_format("bnb"), BnbFormat)
    assert BnbFormat.matches({"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert not BnbFormat.matches({"quant_method": "gptq"})


def test_quantized_modules_from_tensor_names():
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight.absmax",
             "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
             "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.SCB",
             "model.layers.0.mlp.up_proj.weight_format", "model.norm.weight", "lm_head.weight"}
    assert BnbFormat().quantized_modules(names) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}


def test_load_errors_name_the_module():
    fmt = BnbFormat()
    int8 = export(quantize_linear(toy_linear(128, 256), BnbInt8Config()))
    nf4 = export(quantize_linear(toy_linear(128, 256), BnbNF4Config()))
    qc8, qc4 = (fmt.quantization_config({"x": c}, []) for c in (BnbInt8Config(), BnbNF4Config()))
    with pytest.raises(QuantkitError, match="m: the int8 module lacks SCB: the checkpoint is incomplete"):
        fmt.load_module("m", {k: v for k, v in int8.items() if k != "SCB"}, qc8, torch.float32)
    with pytest.raises(QuantkitError, match="m: the 4-bit module lacks weight.nested_absmax"):
        fmt.load_module("m", {k: v for k, v in nf4.items() if k != "weight.nested_absmax"}, qc4, torch.float32)
    with pytest.raises(QuantkitError, match="m: its tensors are 4-bit but quantization_config says load_in_4bit=False"):
        fmt.load_module("m", nf4, qc8, torch.float32)
    with pytest.raises(QuantkitError, match="weight_format 1 is not 0"):
        fmt.load_module("m", {**int8, "weight_format": torch.tensor(1, dtype=torch.uint8)}, qc8, torch.float32)


# -- transformers loads the export on CPU ---------------------------------------------------------


@pytest.fixture
def transformers_bnb(monkeypatch):
    """transformers, able to load bitsandbytes checkpoints here.

    transformers 5.24's Bnb4BitHfQuantizer/Bnb8BitHfQuantizer.validate_environment raise ImportError
    without accelerate, yet nothing on their CPU loading path uses accelerate. Where accelerate is not
    installed only that gate is lifted; with accelerate installed this runs transformers untouched.
    """
    import transformers
    from transformers.quantizers import quantizer_bnb_4bit, quantizer_bnb_8bit

    if importlib.util.find_spec("accelerate") is None:
        for module in (quantizer_bnb_4bit, quantizer_bnb_8bit):
            monkeypatch.setattr(module, "is_accelerate_available", lambda: True)
    return transformers


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("config", ONE_OF_EACH, ids=lambda c: c.method)
def test_transformers_loads_it_on_cpu_with_identical_logits(transformers_bnb, tmp_path, config, dtype):
    import bitsandbytes as bnb

    model = random_model(tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                     num_key_value_heads=2, torch_dtype=dtype)).to(getattr(torch, dtype))
    quantize(model, config)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ours = run(model, ids)  # run before exporting: the export must not depend on bitsandbytes' CPU repack
    hf = transformers_bnb.AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    bnb_cls = bnb.nn.Linear8bitLt if config.method == "bnb-int8" else bnb.nn.Linear4bit
    assert type(hf.model.layers[1].mlp.down_proj) is bnb_cls and type(hf.lm_head) is nn.Linear
    assert hf.dtype == getattr(torch, dtype)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.equal(theirs, ours)  # same modules, same kernels: exact


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantkit_loads_what_transformers_quantized_and_saved(transformers_bnb, tmp_path, kind):
    """The other direction: transformers quantizes with its BitsAndBytesConfig and save_pretrained writes."""
    fp = random_model(tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                  num_key_value_heads=2, torch_dtype="float16")).half()
    save_model(fp, tmp_path / "fp16")
    bnb_config = (transformers_bnb.BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
                  transformers_bnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                                      bnb_4bit_compute_dtype=torch.float16))
    hf = transformers_bnb.AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", quantization_config=bnb_config,
                                                               dtype=torch.float16).eval()
    hf.save_pretrained(tmp_path / "hf-bnb")
    ours = quantkit.load(tmp_path / "hf-bnb")
    ids = torch.randint(0, fp.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)
