"""The registry: configs validate and round-trip to JSON, lookup by type and name, third-party plugins."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from quantkit.backends import BACKENDS, QuantConfig, Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.bnb import BnbInt8Config, BnbNF4Config
from quantkit.backends.gptq import GPTQConfig
from quantkit.backends.registry import CONFIG_VERSION, Registry
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from tests.conftest import install_plugin, random_model, tiny_config

CONFIGS = [Int4Config(), Int4Config(group_size=32), RTNConfig(), RTNConfig(bits=3, group_size=-1, symmetric=True),
           GPTQConfig(bits=3, desc_act=True, damp_percent=0.05), BnbInt8Config(threshold=0), BnbNF4Config(blocksize=128)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_config_json_round_trip(config):
    import json

    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_configs_are_values(config):
    import dataclasses

    assert config.to_dict()["version"] == CONFIG_VERSION
    assert hash(config) == hash(QuantConfig.from_dict(config.to_dict())) and len({config, dataclasses.replace(config)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method_field = 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_from_strings_types_every_field_by_its_hint(config):
    texts = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in config.to_dict().items() if k != "version"}
    assert QuantConfig.from_strings(texts) == config


@pytest.mark.parametrize("texts, message", [
    ({"method": "gptq", "bits": "4.0"}, "gptq: bits=4.0: bits is an integer"),
    ({"method": "gptq", "damp_percent": "lots"}, "gptq: damp_percent=lots: damp_percent is a number"),
    ({"method": "rtn", "symmetric": "maybe"}, "rtn: symmetric=maybe: symmetric is true or false"),
    ({"method": "rtn", "colour": "red"}, "rtn: unknown option(s) colour; known: bits, group_size, symmetric"),
    ({"method": "nope"}, "unknown method 'nope'"),
])
def test_from_strings_names_the_field(texts, message):
    with pytest.raises(QuantkitError) as e:
        QuantConfig.from_strings(texts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reload_refuses_a_newer_version_and_reads_one_without():
    assert QuantConfig.from_dict({"method": "rtn", "bits": 3}) == RTNConfig(bits=3)  # files of older quantkit
    with pytest.raises(QuantkitError, match=r"rtn: config version 2 is newer than this quantkit reads \(1\): upgrade"):
        QuantConfig.from_dict({"method": "rtn", "version": 2, "bits": 3})


def test_a_mutable_config_is_refused_at_registration():
    from dataclasses import dataclass

    @dataclass
    class Mutable(QuantConfig):
        level: int = 1

    with pytest.raises(QuantkitError, match=r"declare .*Mutable with @dataclass\(frozen=True\)"):
        Registry().register("mutable", Mutable)


@pytest.mark.parametrize("make, message", [
    (lambda: Int4Config(group_size=48), "--group-size 48 is not supported"),
    (lambda: RTNConfig(bits=5), "--bits 5 is not supported"),
    (lambda: RTNConfig(group_size=0), "--group-size 0 must be positive"),
    (lambda: QuantConfig.from_dict({"method": "int4", "bits": 4}), "unknown option"),
    (lambda: QuantConfig.from_dict({"method": "int3"}), "unknown method 'int3': known methods are int4, rtn"),
])
def test_bad_configs(make, message):
    with pytest.raises(QuantkitError, match=message):
        make()


def test_lookup_by_type_and_name():
    assert BACKENDS.for_config(Int4Config()).name == "int4"
    assert BACKENDS.get("rtn").config_cls is RTNConfig
    assert not BACKENDS.get("int4").needs_calibration


def test_quantize_dispatches_and_respects_ignore_and_recipes():
    model = random_model(tiny_config(hidden_size=128, intermediate_size=256))
    recipe = Recipe(default=Int4Config(32), rules=[(r"mlp\.down_proj$", RTNConfig(8, -1))], ignore=[r"layers\.1\."])
    quantize(model, recipe)
    layer0, layer1 = model.model.layers
    assert layer0.self_attn.q_proj.quant_record.config == Int4Config(32)
    assert layer0.mlp.down_proj.bits == 8
    assert type(layer1.mlp.up_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    with pytest.raises(QuantkitError, match="already quantized"):  # layer 0 has no plain linear left
        quantize(model.model.layers[0], Int4Config(32), prefix="model.layers.0.")


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(QuantkitError, match="method int4 is not usable here: needs torchao: pip install torchao"):
        quantize(random_model(tiny_config()), Int4Config(32))


def test_third_party_plugin_through_entry_points(tmp_path, monkeypatch):
    """A toy package installed (a dist-info on sys.path) registers `toy` through `quantkit.backends`."""
    install_plugin(tmp_path, monkeypatch, "toy_quant", textwrap.dedent('''
        from dataclasses import dataclass
        import torch
        from torch import nn
        from quantkit.backends.registry import QuantConfig

        @dataclass(frozen=True)
        class ToyConfig(QuantConfig):
            scale: float = 0.5

        class Halved(nn.Module):
            def __init__(self, linear, scale):
                super().__init__()
                self.register_buffer("weight", linear.weight.data * scale)
            def forward(self, x):
                return x @ self.weight.T

        def register(registry):
            @registry.register("toy", ToyConfig, description="halves weights")
            def handle(linear, config, name):
                return Halved(linear, config.scale)
    '''), "[quantkit.backends]\ntoy = toy_quant:register\n")
    registry = Registry()
    backend = registry.get("toy")
    assert backend.description == "halves weights" and backend.unusable_reason() is None
    config = backend.config_cls(scale=0.25)
    linear = nn.Linear(8, 4, bias=False)
    module = backend.handler(linear, config, "x")
    torch.testing.assert_close(module(torch.ones(1, 8)), linear(torch.ones(1, 8)) * 0.25)
    sys.modules.pop("toy_quant", None)


@pytest.mark.parametrize("body", ["raise RuntimeError('broken')", "registry.register('rtn', type('C', (), {}))(len)"],
                         ids=["raises", "re-registers a built-in"])
def test_a_broken_plugin_leaves_the_built_ins_working(tmp_path, monkeypatch, caplog, body):
    install_plugin(tmp_path, monkeypatch, "broken_quant", f"def register(registry):\n    {body}\n",
                   "[quantkit.backends]\nbroken = broken_quant:register\n")
    registry = Registry()
    registry.register("rtn", RTNConfig)(lambda linear, config, name: linear)
    assert registry.get("rtn").config_cls is RTNConfig and "broken" in caplog.text
    sys.modules.pop("broken_quant", None)


def test_gpu_only_backend_says_where_it_runs(monkeypatch):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class CudaOnlyConfig(QuantConfig):
        pass

    registry = Registry()
    registry.register("cuda-only", CudaOnlyConfig, devices=("cuda",))(lambda linear, config, name: linear)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantkitError, match="method cuda-only is not usable here: runs on cuda only, "
                                            "and no GPU is available here"):
        registry.get("cuda-only").check_usable()
