"""The staged layer forward (quantkit/run/stages.py): every group's inputs and the layer's outputs are bit for bit
those of a full forward pass, recomputed after a group changes, and the attention runs once per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit.backends.gptq import GPTQConfig
from quantkit.model.layout import SEQUENTIAL_GROUPS
from quantkit.model.llama import LlamaDecoderLayer, rotary_embedding
from quantkit.run.calibrator import quantize_calibrated
from quantkit.run.stages import LayerStages
from tests.conftest import KERNEL_SHAPES, peaked_model, random_model, tiny_config

BATCH = 3


def toy_layer(**overrides):
    config = tiny_config(**KERNEL_SHAPES, **overrides)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.05)
    x = torch.randn(7, 16, config.hidden_size)  # 7 windows: batches of 3, 3 and 1
    cos, sin = rotary_embedding(config, torch.arange(16)[None], x.dtype)
    return layer, x, cos, sin


def hooked_inputs(layer, x, cos, sin, names):
    """What each linear of `names` receives in a full forward pass over x in batches, concatenated."""
    seen = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: seen[n].append(args[0]))
             for n in names]
    with torch.no_grad():
        out = torch.cat([layer(b, cos, sin) for b in x.split(BATCH)])
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(ts) for n, ts in seen.items()}, out


def stages_of(layer, x, cos, sin, keep_down=False):
    def fail(i):
        raise AssertionError(f"batch {i} not finite")
    return LayerStages(layer, x, BATCH, cos, sin, fail, keep_down=keep_down)


@pytest.mark.parametrize("keep_down", [False, True], ids=["down recomputed", "down kept"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_group_sees_what_a_full_pass_gives_it(kv_heads, keep_down):
    layer, x, cos, sin = toy_layer(num_key_value_heads=kv_heads)
    stages = stages_of(layer, x, cos, sin, keep_down)
    with torch.no_grad():
        for group in SEQUENTIAL_GROUPS:
            expected, out = hooked_inputs(layer, x, cos, sin, group)
            got = torch.cat(list(stages.inputs(group)))
            assert all(torch.equal(got, expected[n]) for n in group), group
        assert torch.equal(stages.output(), out)


@pytest.mark.parametrize("keep_down", [False, True], ids=["down recomputed", "down kept"])
def test_a_changed_group_changes_what_follows_it(keep_down):
    layer, x, cos, sin = toy_layer()
    stages = stages_of(layer, x, cos, sin, keep_down)
    with torch.no_grad():
        for group in SEQUENTIAL_GROUPS:
            list(stages.inputs(group))
            for name in group:  # stands in for the quantized module: other weights, same shape
                linear = layer.get_submodule(name)
                replacement = nn.Linear(linear.in_features, linear.out_features, bias=False)
                replacement.weight.copy_(linear.weight.half().float())
                layer.set_submodule(name, replacement)
            stages.changed(group)
            later = SEQUENTIAL_GROUPS[SEQUENTIAL_GROUPS.index(group) + 1:]
            for following in later:
                expected, _ = hooked_inputs(layer, x, cos, sin, following)
                assert torch.equal(torch.cat(list(stages.inputs(following))), expected[following[0]]), following
        _, out = hooked_inputs(layer, x, cos, sin, ())
        assert torch.equal(stages.output(), out)


@pytest.mark.parametrize("keep_down", [False, True], ids=["down recomputed", "down kept"])
def test_a_rescaled_group_keeps_its_stages_to_rounding(keep_down, monkeypatch):
    """Each group read, then an exact rescaling folded into its inputs (quantkit.quant.scaling, as AWQ does): what the
    stages keep follows (divided by s), so every later read and the output equal a fresh pass over the rescaled layer
    to fp32 rounding, with the attention run once."""
    from quantkit.model.layout import SCALING_PAIRS
    from quantkit.quant.scaling import fold_scales
    layer, x, cos, sin = toy_layer(num_key_value_heads=4)  # MHA: v_proj -> o_proj pairs
    stages = stages_of(layer, x, cos, sin, keep_down)
    attends, attend = [], layer.self_attn.attend
    monkeypatch.setattr(layer.self_attn, "attend", lambda *a: attends.append(1) or attend(*a))

    def staged(read):  # the value, and the attentions it ran (the fresh passes' are not counted)
        before = len(attends)
        value = read()
        return value, len(attends) - before
    torch.manual_seed(1)
    runs = 0
    with torch.no_grad():
        for (preceding, followers, _), group in zip(SCALING_PAIRS, SEQUENTIAL_GROUPS):
            (got, n) = staged(lambda: torch.cat(list(stages.inputs(group))))
            runs += n
            expected, _ = hooked_inputs(layer, x, cos, sin, group)
            torch.testing.assert_close(got, expected[group[0]])
            s = torch.rand(layer.get_submodule(followers[0]).in_features) + 0.5
            fold_scales(layer.get_submodule(preceding), [layer.get_submodule(n) for n in followers], s)
            stages.rescaled(group, s)
        (got, n) = staged(stages.output)
        _, out = hooked_inputs(layer, x, cos, sin, ())
        torch.testing.assert_close(got, out)
    assert runs + n == 3  # one attention a batch


@pytest.mark.parametrize("keep_down", [True, False], ids=["down kept", "down recomputed"])
def test_the_attention_runs_once_a_layer(monkeypatch, keep_down):
    """And the MLP's gate/up once, where down_proj's inputs fit in memory (twice where they do not)."""
    from quantkit.model.llama import LlamaAttention, LlamaMLP
    from quantkit.run.calibrator import LayerCalibrator

    monkeypatch.setattr(LayerCalibrator, "_down_inputs_fit", lambda self, layer: keep_down)

    calls = {"attend": 0, "down_input": 0}
    for cls, name in ((LlamaAttention, "attend"), (LlamaMLP, "down_input")):
        real = getattr(cls, name)

        def spy(self, *args, real=real, name=name):
            calls[name] += 1
            return real(self, *args)
        monkeypatch.setattr(cls, name, spy)
    model = random_model(tiny_config(**KERNEL_SHAPES))
    tokens = torch.randint(0, 4096, (6, 16), generator=torch.Generator().manual_seed(0))
    quantize_calibrated(model, GPTQConfig(4, 32), tokens, batch_size=2, progress=False)
    batches, layers = 3, model.config.num_hidden_layers
    downs = 1 if keep_down else 2  # down's inputs (and again for the advance)
    assert calls == {"attend": batches * layers, "down_input": downs * batches * layers}


def test_a_stage_that_overflows_is_caught_in_its_batch():
    layer, x, cos, sin = toy_layer()
    x[4, 2, 0] = float("inf")  # batch 1 (windows 3-5)
    failed = []

    def note(i):
        failed.append(i)
        raise OverflowError
    stages = LayerStages(layer, x, BATCH, cos, sin, note)
    with torch.no_grad(), pytest.raises(OverflowError):
        list(stages.inputs(SEQUENTIAL_GROUPS[0]))
    assert failed == [1]


@pytest.mark.parametrize("config", [GPTQConfig(4, 32), GPTQConfig(3, 32, desc_act=True, symmetric=True)],
                         ids=lambda c: c.describe())
def test_staged_calibration_equals_a_full_pass_per_group(monkeypatch, config):
    """The whole calibration, staged and with one full forward pass per group (the path before the stages):
    the same quantized model, bit for bit."""
    from quantkit.run.calibrator import LayerCalibrator

    def calibrated():
        model = peaked_model(**KERNEL_SHAPES)
        tokens = torch.randint(0, 4096, (5, 16), generator=torch.Generator().manual_seed(1))
        quantize_calibrated(model, config, tokens, batch_size=2, progress=False)
        return model.state_dict()

    staged = calibrated()
    monkeypatch.setattr(LayerCalibrator, "staged", False)
    full = calibrated()
    assert staged.keys() == full.keys() and all(torch.equal(staged[k], full[k]) for k in staged)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_activations_stay_in_cpu_memory_and_give_the_same_stages(device):
    """--offload-activations: x and the kept stages live in CPU memory, each batch computed on the layer's device;
    the same values as with everything on that device. (On a machine without CUDA this runs CPU to CPU only.)"""
    layer, x, cos, sin = toy_layer()
    layer, cos, sin = layer.to(device), cos.to(device), sin.to(device)

    def fail(i):
        raise AssertionError(f"batch {i} not finite")
    on_device = LayerStages(layer, x.to(device), BATCH, cos, sin, fail)
    offloaded = LayerStages(layer, x.clone(), BATCH, cos, sin, fail, device=torch.device(device))
    with torch.no_grad():
        for group in SEQUENTIAL_GROUPS:
            got, expected = list(offloaded.inputs(group)), list(on_device.inputs(group))
            assert all(g.device.type == device and torch.equal(g, e) for g, e in zip(got, expected)), group
        assert all(t.device.type == "cpu" for t in offloaded._h)  # what is kept stays where x is
        out = offloaded.output()
        assert out.device.type == "cpu" and torch.equal(out, on_device.output().cpu())
