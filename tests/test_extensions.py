"""The extension seams: a third-party backend, a third-party format, and a calibrated backend's transform.

Each is plugged in the way a package would (the registries, the `quantkit.formats` entry point) and
goes through quantkit's own pipeline without any change to quantkit.
"""

import json
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

import quantkit
from quantkit.quant.affine import quantize_weight
from quantkit.backends import BACKENDS, QuantConfig
from quantkit.run.export import ExportOptions
from quantkit.formats import format_names, get_format
from quantkit.run.calibrator import quantize_calibrated
from quantkit.model.layout import SEQUENTIAL_GROUPS
from quantkit.quant.linear import AffineLinear
from quantkit.quant.observers import ChannelMagnitudeObserver
from quantkit.run.pipeline import quantize_checkpoint
from tests.conftest import KERNEL_SHAPES, install_plugin, random_model, tiny_config
from tests.helpers import run

SHAPES = KERNEL_SHAPES  # the shapes of kernel_model_dir
IDS = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def registry(monkeypatch):
    """The global backend registry, restored after the test (plugins register into it)."""
    BACKENDS.all()  # load the entry-point plugins first, so the copy holds them
    monkeypatch.setattr(BACKENDS, "_by_name", dict(BACKENDS._by_name))
    return BACKENDS


# -- a third-party backend whose modules are AffineLinear: every affine format holds them ------------------


@dataclass(frozen=True)
class AbsmaxConfig(QuantConfig):
    """A toy method: symmetric, per group, qparams from the weight scaled down by `shrink` before rounding."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    shrink: float = 0.9


def absmax_handler(linear: nn.Linear, config: AbsmaxConfig, name: str) -> nn.Module:
    w = quantize_weight(linear.weight.data * config.shrink, config.bits, config.group_size, True, name)
    w.scale = w.scale / config.shrink  # dequantizes back to the original range
    return AffineLinear(w, linear.bias, dtype=linear.weight.dtype)


@pytest.mark.parametrize("fmt", [None, "compressed-tensors", "gptq"])
def test_plugin_backend_returning_affine_linear_exports_to_the_affine_formats(registry, kernel_model_dir, tmp_path, fmt):
    registry.register("absmax-toy", AbsmaxConfig, description="a plugin")(absmax_handler)  # no formats declared
    summary = quantize_checkpoint(kernel_model_dir, AbsmaxConfig(), tmp_path / "q", ExportOptions(format=fmt),
                                  progress=False)
    assert summary.format == (fmt or "compressed-tensors")  # the first registered format that holds it
    in_memory = quantkit.quantize(quantkit.load(kernel_model_dir), AbsmaxConfig())
    loaded = quantkit.load(tmp_path / "q")
    assert loaded.model.layers[1].mlp.down_proj.quant_record.config == AbsmaxConfig()
    assert torch.equal(loaded(IDS), in_memory(IDS))


def test_plugin_backend_is_refused_by_the_bnb_format_before_any_work(registry, kernel_model_dir, tmp_path):
    registry.register("absmax-toy", AbsmaxConfig)(absmax_handler)
    with pytest.raises(quantkit.QuantkitError, match=r"--format bnb: cannot hold method absmax-toy: .*"
                                                     r"use --format compressed-tensors, gptq, gguf$"):
        quantize_checkpoint(kernel_model_dir, AbsmaxConfig(), tmp_path / "q", ExportOptions(format="bnb"), progress=False)
    assert not (tmp_path / "q").exists()


# -- a third-party format through the `quantkit.formats` entry point, with its own container -------------


ONE_FILE_FORMAT = '''
import json
from pathlib import Path

from safetensors.torch import save_file

from quantkit.formats.compressed_tensors import CompressedTensorsFormat


class Collect:
    """A sink that keeps the tensors until the end (a toy: a real one would spool)."""

    def __init__(self, directory):
        self.directory, self.tensors, self.total_size = Path(directory), {}, 0

    def add(self, name, tensor):
        self.tensors[name] = tensor.contiguous()
        self.total_size += tensor.numel() * tensor.element_size()

    def close(self):
        return []


class OneFileFormat(CompressedTensorsFormat):
    """compressed-tensors tensors and config.json in a single file: model.qk1 (safetensors + metadata)."""

    name = "one-file"

    def open_sink(self, directory, max_shard_size, metadata, config):
        self.sink = Collect(directory)
        return self.sink

    def finish(self, directory, config_json, tokenizer_dir, errors):
        save_file(self.sink.tensors, str(Path(directory) / "model.qk1"), metadata={"config": json.dumps(config_json)})
'''


@pytest.fixture
def one_file_format(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "one_file_format", textwrap.dedent(ONE_FILE_FORMAT),
                   "[quantkit.formats]\none-file = one_file_format:OneFileFormat\n")
    yield "one-file"
    sys.modules.pop("one_file_format", None)


def test_plugin_format_owns_its_container(one_file_format, kernel_model_dir, tmp_path):
    from quantkit.backends.int4 import Int4Config

    assert one_file_format in format_names() and get_format(one_file_format).name == one_file_format
    summary = quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", ExportOptions(format=one_file_format),
                                  progress=False)
    assert summary.format == one_file_format
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.qk1", "quantkit_manifest.json"]
    with safe_open(tmp_path / "q" / "model.qk1", framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        assert "model.layers.1.mlp.down_proj.weight_packed" in f.keys() and "lm_head.weight" in f.keys()
    assert config["quantization_config"]["format"] == "pack-quantized" and config["quantkit"]["format"] == "one-file"


def test_plugin_format_is_a_cli_choice(one_file_format, kernel_model_dir, tmp_path):
    assert "one-file" in run("quantize", "--help").output
    result = run("quantize", kernel_model_dir, "--method", "int4", "--group-size", 32, "--format", "one-file",
                 "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["format"] == "one-file"
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.qk1", "quantkit_manifest.json"]


# -- a calibrated backend with an observer and a transform: the phases collect, transform, quantize -------


@dataclass(frozen=True)
class SmoothConfig(QuantConfig):
    """A toy activation-aware method: scale each group's input channels by sqrt(mean |x|) (AWQ-like, alpha 0.5),
    fold the inverse into the preceding RMSNorm, then round to nearest."""

    bits: int = 8
    group_size: int = -1


PRECEDING_NORM = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}


def smooth_transform(ctx, log):
    """q/k/v after input_layernorm, gate/up after post_attention_layernorm: exact rescaling (outputs unchanged)."""
    norm = PRECEDING_NORM.get(ctx.names[0])
    if norm is None:  # o_proj and down_proj follow a linear; this toy leaves them alone
        log.append((ctx.prefix, ctx.names, None))
        return
    before = ctx.run()
    s = ctx.observers[ctx.names[0]].mean_abs.clamp(min=1e-5).sqrt()  # (K,)
    with torch.no_grad():
        ctx.layer.get_submodule(norm).weight.div_(s.to(ctx.layer.get_submodule(norm).weight.dtype))
        for n in ctx.names:
            ctx.layer.get_submodule(n).weight.mul_(s)
    log.append((ctx.prefix, ctx.names, (ctx.run() - before).abs().max().item()))


def smooth_handler(linear, config, name, channel_magnitude=None):
    assert channel_magnitude is not None and channel_magnitude.shape == (linear.in_features,)
    w = quantize_weight(linear.weight.data, config.bits, config.group_size, True, name)
    return AffineLinear(w, linear.bias, dtype=linear.weight.dtype)


def test_transform_runs_between_collect_and_quantize_and_keeps_the_function(registry):
    log = []
    registry.register("smooth-toy", SmoothConfig, observer=ChannelMagnitudeObserver.for_linear,
                      transform=lambda ctx: smooth_transform(ctx, log))(smooth_handler)
    model = random_model(tiny_config(**SHAPES))
    tokens = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))
    reports = quantize_calibrated(model, SmoothConfig(), tokens, progress=False)
    assert [(p, names) for p, names, _ in log] == [(f"model.layers.{i}.", g) for i in range(2) for g in SEQUENTIAL_GROUPS]
    assert all(d is None or d < 1e-5 for _, _, d in log) and sum(d is not None for _, _, d in log) == 4
    assert len(reports) == 14 and {r.method for r in reports} == {"smooth-toy"}
    assert registry.get("smooth-toy").needs_calibration


# -- a layer transform (the seam AWQ uses): every scaling pair folded, then true-sequential GPTQ ---------------


@dataclass(frozen=True)
class ScaledGPTQConfig(QuantConfig):
    """A toy AWQ-then-GPTQ: random positive scales folded along every scaling pair, then GPTQ w4 g32."""

    bits: int = 4
    group_size: int = 32


def scale_every_pair(ctx, log):
    from quantkit.model.layout import SCALING_PAIRS
    from quantkit.quant.scaling import fold_scales

    qkv, o, gate_up, _ = SEQUENTIAL_GROUPS
    log.append(("layer", ctx.prefix, sorted(ctx.configs)))
    with torch.no_grad():
        attention = [ctx.attention(a) for a in ctx.inputs(qkv)]
        mlp = [ctx.mlp(m) for m in ctx.inputs(gate_up)]
        o_inputs = list(ctx.inputs(o))
        g = torch.Generator().manual_seed(len(log))
        scales = {}
        for preceding, followers, _ in SCALING_PAIRS:
            s = torch.rand(ctx.layer.get_submodule(followers[0]).in_features, generator=g) + 0.5
            fold_scales(ctx.layer.get_submodule(preceding), [ctx.layer.get_submodule(n) for n in followers], s)
            scales[preceding] = s
        ctx.changed()
        log.append(("attention", max((ctx.attention(a) - b).abs().max().item() / b.abs().max().item()
                                     for a, b in zip(ctx.inputs(qkv), attention))))
        log.append(("mlp", max((ctx.mlp(m) - b).abs().max().item() / b.abs().max().item()
                               for m, b in zip(ctx.inputs(gate_up), mlp))))
        log.append(("o inputs", max((y * scales["self_attn.v_proj"] - b).abs().max().item() / b.abs().max().item()
                                    for y, b in zip(ctx.inputs(o), o_inputs))))


def test_a_layer_transform_rescales_every_pair_before_true_sequential_gptq(registry):
    from quantkit.backends.gptq import GPTQConfig, HessianObserver, quantize_gptq

    log = []
    original_add = HessianObserver.add

    def observe(self, x):
        log.append(("collect",))
        return original_add(self, x)

    registry.register("scaled-gptq", ScaledGPTQConfig, observer=HessianObserver.for_linear,
                      layer_transform=lambda ctx: scale_every_pair(ctx, log))(
        lambda linear, config, name, hessian: quantize_gptq(linear, GPTQConfig(config.bits, config.group_size), name,
                                                            hessian))
    model = random_model(tiny_config(**SHAPES, num_key_value_heads=4))  # MHA: v_proj -> o_proj pairs
    tokens = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(HessianObserver, "add", observe)
        reports = quantize_calibrated(model, ScaledGPTQConfig(), tokens, batch_size=2, progress=False)
    layers = [i for i, entry in enumerate(log) if entry[0] == "layer"]
    assert len(layers) == 2 and log[layers[0]][2] == sorted(name for g in SEQUENTIAL_GROUPS for name in g)
    for start in layers:  # the transform, its checks, then the layer's collects: the layer is rescaled first
        assert [e[0] for e in log[start + 1:start + 4]] == ["attention", "mlp", "o inputs"]
        assert all(e[1] < 1e-5 for e in log[start + 1:start + 4]), log[start + 1:start + 4]
        assert log[start + 4] == ("collect",)
    assert len(reports) == 14 and all(r.kind == "output" for r in reports)
    assert registry.get("scaled-gptq").needs_calibration
