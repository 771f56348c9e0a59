"""bnb-int8 / bnb-nf4 / bnb-fp4: configs validate and round-trip, every variant quantizes and runs on CPU."""

import importlib.util
import json

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from quantkit.backends import BACKENDS, QuantConfig, quantize
from quantkit.backends.bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from quantkit.errors import QuantkitError
from tests.conftest import random_model, tiny_config
from tests.helpers import BNB_CONFIGS, LINEAR_SHAPES, quantize_linear, toy_linear

# Relative output error bounds vs the fp linear, for N(0, 0.02) weights and N(0, 1) inputs. Measured
# here: int8 0.009-0.010 (inputs and weights rounded to int8 per row), nf4 0.087-0.096, fp4 0.12-0.126.
MAX_REL_ERROR = {"bnb-int8": 0.02, "bnb-nf4": 0.11, "bnb-fp4": 0.15}


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("config", BNB_CONFIGS, ids=lambda c: c.describe())
def test_every_variant_runs_on_cpu_with_bounded_error(config, shape):
    linear = toy_linear(*shape)
    module = quantize_linear(linear, config)
    expected = (bnb.nn.Linear8bitLt, torch.int8) if config.method == "bnb-int8" else (bnb.nn.Linear4bit, torch.uint8)
    assert isinstance(module, expected[0]) and module.weight.dtype == expected[1] and not module.training
    x = torch.randn(3, 5, shape[1])
    with torch.no_grad():
        y, ref = module(x), linear(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert 1e-4 < rel_error(y, ref) < MAX_REL_ERROR[config.method]  # quantized, and not badly


@pytest.mark.parametrize("config", [BnbNF4Config(blocksize=128), BnbFP4Config(double_quant=False)],
                         ids=lambda c: c.describe())
def test_4bit_options_reach_bitsandbytes(config):
    module = quantize_linear(toy_linear(128, 256), config)
    qs = module.weight.quant_state
    assert (qs.quant_type, qs.blocksize, qs.nested) == (config.quant_type, config.blocksize, config.double_quant)
    assert module.compute_dtype == torch.float16


def test_int8_threshold_keeps_outlier_columns_accurate():
    """LLM.int8: input columns above the threshold run in fp16, so an outlier feature costs little."""
    linear = toy_linear(128, 256, bias=False)
    x = torch.randn(8, 256)
    x[:, 7] *= 40  # one systematic outlier feature, as in large LLMs
    with torch.no_grad():
        ref = linear(x)
        errors = {t: rel_error(quantize_linear(linear, BnbInt8Config(t))(x), ref) for t in (0.0, 6.0)}
    assert errors[6.0] < 0.02 < errors[0.0]


def test_4bit_out_features_bitsandbytes_cpu_repack_cannot_take_still_run():
    """out_features % 32 != 0: bitsandbytes' AVX512-BF16 repack asserts, the generic CPU path is used."""
    linear = toy_linear(100, 256)
    module = quantize_linear(linear, BnbNF4Config())
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert rel_error(module(x), linear(x)) < MAX_REL_ERROR["bnb-nf4"]
    assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("shape, blocksize", [((128, 96), 64), ((128, 256), 512)])
def test_4bit_blocks_must_not_cross_rows(shape, blocksize):
    """bitsandbytes 0.50.2's CPU dequantize indexes absmax per row: such blocks would dequantize wrongly."""
    linear = toy_linear(*shape)
    with pytest.raises(QuantkitError, match=f"toy: bnb-nf4 --blocksize {blocksize} does not divide "
                                            f"in_features={shape[1]}: choose one that does"):
        quantize_linear(linear, BnbNF4Config(blocksize=blocksize))


def test_quantized_module_follows_the_linears_mode():
    linear = toy_linear(128, 256).train()
    assert quantize_linear(linear, BnbInt8Config()).training
    assert quantize_linear(linear, BnbNF4Config()).training


@pytest.mark.parametrize("config", BNB_CONFIGS + [BnbInt8Config(threshold=3), BnbNF4Config(compute_dtype="bf16"),
                                              BnbFP4Config(compute_dtype="fp32", blocksize=4096)],
                         ids=lambda c: c.describe())
def test_config_json_round_trip(config):
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_threshold_is_stored_as_a_float():
    assert BnbInt8Config(threshold=3).threshold == 3.0 and isinstance(BnbInt8Config(3).threshold, float)


@pytest.mark.parametrize("make, message", [
    (lambda: BnbInt8Config(threshold=-1.0), r"bnb-int8: --threshold -1.0 must be a number >= 0"),
    (lambda: BnbInt8Config(threshold=float("nan")), r"--threshold nan must be a number >= 0"),
    (lambda: BnbInt8Config(threshold="6"), r"--threshold '6' must be a number"),
    (lambda: BnbNF4Config(blocksize=48), r"bnb-nf4: --blocksize 48 is not supported by bitsandbytes: use one of 32, "),
    (lambda: BnbFP4Config(blocksize=8192), r"bnb-fp4: --blocksize 8192 is not supported"),
    (lambda: BnbNF4Config(compute_dtype="fp8"), r"bnb-nf4: --compute-dtype 'fp8' is not supported: use one of fp32, fp16, bf16"),
    (lambda: BnbFP4Config(compute_dtype="float16"), r"--compute-dtype 'float16' is not supported"),
    (lambda: BnbNF4Config(double_quant="yes"), r"--double-quant must be true or false"),
    (lambda: QuantConfig.from_dict({"method": "bnb-nf4", "group_size": 64}),
     r"bnb-nf4: unknown option\(s\) group_size"),
])
def test_bad_configs_name_the_option(make, message):
    with pytest.raises(QuantkitError, match=message):
        make()


def test_registered_with_devices_formats_and_requirements():
    for name, cls in (("bnb-int8", BnbInt8Config), ("bnb-nf4", BnbNF4Config), ("bnb-fp4", BnbFP4Config)):
        backend = BACKENDS.get(name)
        assert backend.config_cls is cls and cls.method == name
        assert backend.devices == ("cpu", "cuda") and backend.formats == ("bnb",)
        assert backend.requires == ("bitsandbytes",) and not backend.needs_calibration
        assert backend.unusable_reason() is None  # bitsandbytes runs on this CPU


@pytest.mark.parametrize("config", [BnbInt8Config(), BnbNF4Config(), BnbFP4Config()], ids=lambda c: c.method)
def test_quantize_a_model(config):
    model = random_model(tiny_config(hidden_size=128, intermediate_size=256))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        quantize(model, config)
        logits = model(ids)
    layer = model.model.layers[1]
    assert layer.mlp.down_proj.quant_record.config == config and type(model.lm_head) is nn.Linear
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear8bitLt if config.method == "bnb-int8" else bnb.nn.Linear4bit)
    assert rel_error(logits, ref) < MAX_REL_ERROR[config.method]


@pytest.mark.parametrize("config", [BnbInt8Config(), BnbNF4Config(), BnbFP4Config()], ids=lambda c: c.method)
def test_missing_bitsandbytes_says_what_to_install(monkeypatch, config):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    message = f"method {config.method} is not usable here: needs bitsandbytes: pip install bitsandbytes"
    with pytest.raises(QuantkitError, match=message):
        quantize(random_model(tiny_config()), config)


def test_running_a_row_crossing_module_on_cpu_raises():
    """A 4-bit module from elsewhere (quantized on CUDA, say) whose blocks cross rows: refused on CPU."""
    from quantkit.backends.bnb import linear4bit

    module = linear4bit(torch.randn(128, 96) * 0.02, None, "nf4", False, 64, torch.float16).eval()
    with pytest.raises(QuantkitError, match="blocksize 64 does not divide in_features, which bitsandbytes 0.50.2"):
        module(torch.randn(1, 96))


NF4_CPU_FORWARD = """
import logging, torch
from quantkit.backends.bnb import BNB_CPU_OPS_LOGGER, linear4bit
module = linear4bit(torch.randn(128, 128) * 0.02, None, "nf4", True, 64, torch.bfloat16).eval()
x = torch.randn(2, 128, dtype=torch.bfloat16)
with torch.no_grad():
    y = module(x)
assert y.shape == (2, 128) and torch.isfinite(y).all()
assert logging.getLogger(BNB_CPU_OPS_LOGGER).level == logging.NOTSET  # the silencing ended with the import
print("ok")
"""


def run_python(code: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_bitsandbytes_cpu_forward_prints_nothing_about_kernels():
    """bitsandbytes 0.50.2 warns at import on AVX512-BF16 CPUs that it cannot fetch a hub kernel (the `kernels`
    package missing, offline, or untrusted); quantkit imports it with that one logger silenced."""
    result = run_python(NF4_CPU_FORWARD)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "kernels" not in result.stderr.lower() + result.stdout.lower(), result.stderr
    assert "Failed to load" not in result.stderr, result.stderr
    if bnb.functional.has_avx512bf16():  # the control: imported plainly, this CPU does print it
        plain = run_python("import bitsandbytes")
        assert "gemm_4bit_forward" in plain.stderr, plain.stderr


def test_silenced_import_still_runs_bitsandbytes_own_cpu_kernel():
    from quantkit.backends.bnb import linear4bit

    weight = torch.randn(128, 128) * 0.02
    module = linear4bit(weight, None, "nf4", False, 64, torch.bfloat16).eval()
    dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = module(x).float()
    torch.testing.assert_close(y, x.float() @ dequantized.T, rtol=0.05, atol=0.02)
