"""AWQ (quantkit/backends/awq.py) on toy layers: the folded scales keep the float layer, the search's guarantees,
and AWQ through the streamed pipeline, its exports and --resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import quantkit
from quantkit.backends.awq import (AWQConfig, awq_layer_transform, block_error, candidate_scales, clip_weight,
                                   fake_quantize, input_statistics, linear_error, search_clip, search_scale,
                                   second_moment_pays)
from quantkit.errors import QuantkitError
from quantkit.model.layout import SEQUENTIAL_GROUPS
from quantkit.model.llama import LlamaDecoderLayer, rotary_embedding
from quantkit.run.calibrator import quantize_calibrated
from quantkit.run.stages import LayerStages
from tests.conftest import KERNEL_SHAPES, random_model, tiny_config
from tests.helpers import LAYERS, method_args, run

ALL_LINEARS = tuple(n for group in SEQUENTIAL_GROUPS for n in group)


def toy_layer(kv_heads: int, seed: int = 0):
    config = tiny_config(**KERNEL_SHAPES, num_key_value_heads=kv_heads)
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.05)
    x = torch.randn(6, 16, config.hidden_size) * torch.linspace(0.1, 4, config.hidden_size)  # uneven channels
    cos, sin = rotary_embedding(config, torch.arange(16)[None], x.dtype)
    return layer, x, cos, sin


def context(layer, x, cos, sin, config: AWQConfig):
    """What the calibrator hands a layer transform (quantkit/run/calibrator.py's LayerContext)."""
    stages = LayerStages(layer, x, 2, cos, sin, lambda i: pytest.fail(f"batch {i} not finite"))
    return SimpleNamespace(layer=layer, prefix="model.layers.0.", configs={n: config for n in ALL_LINEARS},
                           inputs=stages.inputs, attention=lambda a: layer.self_attn(a, cos, sin, None, None),
                           mlp=layer.mlp, changed=stages.changed, rescaled=stages.rescaled,
                           tokens=x.shape[0] * x.shape[1])


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("duo_scaling", [True, False])
def test_the_scaled_layer_computes_what_it_did(kv_heads, duo_scaling):
    """All four pairs (three under GQA: v_proj -> o_proj does not pair) are rescaled; the float layer is unchanged
    to fp32 rounding."""
    layer, x, cos, sin = toy_layer(kv_heads)
    with torch.no_grad():
        before = layer(x, cos, sin)
        weights = {n: layer.get_submodule(n).weight.clone() for n in ALL_LINEARS}
        config = AWQConfig(bits=3, group_size=32, duo_scaling=duo_scaling, clip=False)
        awq_layer_transform(context(layer, x, cos, sin, config))
        after = layer(x, cos, sin)
    changed = {n for n in ALL_LINEARS if not torch.equal(weights[n], layer.get_submodule(n).weight)}
    expected = set(ALL_LINEARS) - ({"self_attn.o_proj"} if kv_heads == 2 else set())
    assert changed <= expected and {"mlp.down_proj", "mlp.gate_proj"} <= changed
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def searched(linear, batches, config, exact: bool, search_tokens: int = 10_000):
    """search_scale on one linear judged by its own output: through block_error, or linear_error (exact=True)."""
    stats = input_statistics(batches, search_tokens)
    error = (linear_error if exact else block_error)(linear, stats.searched)
    return search_scale(stats.x_mean, [linear], [config], ["fc"], error)


@pytest.mark.parametrize("exact", [False, True], ids=["block", "linear"])
def test_uniform_activations_give_scale_one(exact):
    """Without duo scaling s = mean|x|^a: channels of equal magnitude give s = 1 at every a."""
    linear = nn.Linear(64, 32, bias=False)
    x = torch.ones(4, 8, 64) * torch.where(torch.rand(4, 8, 64) > 0.5, 1.0, -1.0)  # |x| = 1 everywhere
    s, _, _ = searched(linear, [x], AWQConfig(bits=3, group_size=32, duo_scaling=False), exact)
    assert torch.equal(s, torch.ones(64))
    assert torch.allclose(candidate_scales(torch.full((64,), 0.7), None, 0.35), torch.ones(64))


@pytest.mark.parametrize("exact", [False, True], ids=["block", "linear"])
@pytest.mark.parametrize("seed", range(4))
def test_the_searched_scale_is_never_worse_than_none(seed, exact):
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64, bias=False)
    x = torch.randn(4, 16, 128) * torch.rand(128) * 5
    for config in (AWQConfig(bits=3, group_size=32), AWQConfig(bits=4, group_size=-1, duo_scaling=False)):
        weight = linear.weight.detach().clone()
        s, loss, unscaled = searched(linear, [x], config, exact)
        assert loss <= unscaled and torch.equal(linear.weight, weight)  # the search leaves the weight as it was


def test_a_linears_error_from_its_inputs_second_moment_is_its_output_error():
    """linear_error's tr(D H D^T) / N is block_error's mean squared output error, computed from H alone."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    batches = [torch.randn(3, 10, 96) * torch.rand(96) * 3 for _ in range(4)]
    error, reference = linear_error(linear, batches), block_error(linear, batches)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, AWQConfig(bits=3, group_size=32), "fc"))
    assert error() == pytest.approx(reference(), rel=1e-4) and error() > 0


def test_the_second_moment_is_used_where_it_is_cheaper():
    meta = lambda k, n: nn.Linear(k, n, bias=False, device="meta")  # noqa: E731
    assert second_moment_pays(meta(768, 256), 4096, 21)  # a small model's down_proj: K^2 is cheap
    assert not second_moment_pays(meta(11008, 4096), 4096, 21)  # Llama-2-7B's: a pass over 4096 tokens is cheaper
    assert not second_moment_pays(meta(768, 256), 64, 21)  # a few tokens


def test_the_search_judges_search_tokens_spread_over_the_set():
    """Every k-th token for a block of tokens, every k-th whole window for the attention; x_mean from all tokens."""
    batches = [torch.arange(b * 32, (b + 1) * 32, dtype=torch.float32).reshape(2, 16, 1) for b in range(5)]  # 160
    tokens = input_statistics(iter(batches), 40, total=160)
    assert torch.cat(tokens.searched).flatten().tolist() == list(range(0, 160, 4))  # 40 tokens, every 4th
    assert tokens.x_mean.item() == torch.arange(160.0).mean().item()
    windows = input_statistics(iter(batches), 40, windows=True, total=160)
    assert [w[0, 0].item() for w in torch.cat(windows.searched)] == [0.0, 80.0]  # 10 windows of 16: every 5th
    assert windows.searched[0].shape[1:] == (16, 1)


def test_the_attention_is_judged_on_window_prefixes(monkeypatch):
    """Windows longer than SEARCH_WINDOW give their prefixes, whose causal attention outputs are the window's own."""
    import quantkit.backends.awq as awq
    monkeypatch.setattr(awq, "SEARCH_WINDOW", 8)
    batches = [torch.arange(b * 32, (b + 1) * 32, dtype=torch.float32).reshape(2, 16, 1) for b in range(5)]
    stats = input_statistics(iter(batches), 16, windows=True, total=160)
    assert [w[:, 0].tolist() for w in torch.cat(stats.searched)] == [list(range(0, 8)), list(range(80, 88))]
    layer, x, cos, sin = toy_layer(4)
    with torch.no_grad():
        whole = layer.self_attn(x, cos, sin, None, None)
        prefix = layer.self_attn(x[:, :8], cos[:, :, :8], sin[:, :, :8], None, None)
    torch.testing.assert_close(prefix, whole[:, :8])


def test_a_block_search_runs_the_block_once_a_chunk_and_candidate():
    linear = nn.Linear(32, 16, bias=False)
    seen = []

    def block(x):
        seen.append(x.shape[0])
        return linear(x)
    batches = [torch.randn(2, 8, 32) for _ in range(5)]  # 80 tokens
    stats = input_statistics(iter(batches), 40, total=80)
    search_scale(stats.x_mean, [linear], [AWQConfig(bits=4, group_size=32, n_grid=3)], ["fc"],
                 block_error(block, stats.searched))
    assert seen == [40] * (1 + 4)  # the reference, then s = 1 and 3 exponents, on one chunk of 40 tokens


def test_clipping_is_never_worse_on_each_groups_output():
    """auto_clip's objective: the squared error of each (row, group)'s partial output x_g . w_g, fake-quantized."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    w[::7, 5] = 0.6  # outliers that stretch their groups' ranges
    x = torch.randn(300, 128)
    config = AWQConfig(bits=3, group_size=32)
    bound = search_clip(w, x, config, "fc")
    clipped = nn.Linear(128, 64, bias=False)
    clipped.weight.data.copy_(w)
    clip_weight(clipped, bound)

    def group_errors(weight):
        q = fake_quantize(weight, config, "fc")
        xg, wg, qg = x.reshape(1, 300, 4, 32), w.reshape(64, 1, 4, 32), q.reshape(64, 1, 4, 32)
        return ((xg * qg).sum(-1) - (xg * wg).sum(-1)).pow(2).mean(1)  # (rows, groups)
    assert (group_errors(clipped.weight.data) <= group_errors(w) * (1 + 1e-5)).all()
    assert (bound < w.abs().reshape(64, 4, 32).amax(-1, keepdim=True)).any()  # the outliers' groups are clipped


def test_clipping_leaves_q_and_k_alone():
    layers = {}
    for clip in (False, True):
        layer, x, cos, sin = toy_layer(4)
        with torch.no_grad():
            awq_layer_transform(context(layer, x, cos, sin, AWQConfig(bits=3, group_size=32, clip=clip)))
        layers[clip] = layer
    same = {n for n in ALL_LINEARS
            if torch.equal(layers[False].get_submodule(n).weight, layers[True].get_submodule(n).weight)}
    assert {"self_attn.q_proj", "self_attn.k_proj"} <= same and "mlp.down_proj" not in same


def test_the_clipping_tokens_are_every_stride_th_token_of_the_stream():
    batches = [torch.arange(b * 10, (b + 1) * 10, dtype=torch.float32).reshape(1, 10, 1) for b in range(5)]
    stats = input_statistics(iter(batches), 0, clip_tokens=10, total=50)
    assert stats.spaced.flatten().tolist() == list(range(0, 50, 5)) and stats.searched == []


@pytest.mark.parametrize("bad", [dict(n_grid=0), dict(search_tokens=0), dict(clip_tokens=0), dict(bits=5),
                                 dict(group_size=0)])
def test_bad_configs_are_refused(bad):
    with pytest.raises(QuantkitError, match="awq"):
        AWQConfig(**bad)


def test_awq_beats_rtn_on_a_toy_model_and_keeps_its_shapes():
    from quantkit.backends import quantize
    from quantkit.backends.rtn import RTNConfig

    calib = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    model = random_model(tiny_config(**KERNEL_SHAPES))
    with torch.no_grad():
        reference = torch.log_softmax(model(test), -1)

    def kl(m):
        with torch.no_grad():
            lp = torch.log_softmax(m(test), -1)
        return float((reference.exp() * (reference - lp)).sum(-1).mean())
    awq, rtn = random_model(tiny_config(**KERNEL_SHAPES)), random_model(tiny_config(**KERNEL_SHAPES))
    quantize_calibrated(awq, AWQConfig(bits=3, group_size=32), calib, batch_size=4, progress=False)
    quantize(rtn, RTNConfig(bits=3, group_size=32))
    assert kl(awq) < kl(rtn)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_awq_quantize_export_and_reload(src, tokens, tmp_path, fmt):
    """Streamed with one layer in memory (its --resume: tests/run/test_workdir.py, parametrized over methods)."""
    done = run("quantize", src, *method_args("awq", tokens), "--format", fmt, "-o", tmp_path / "q")
    assert done.exit_code == 0, done.output
    assert run("verify", tmp_path / "q").exit_code == 0
    model = quantkit.load(tmp_path / "q")
    reference = quantkit.load(src)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - reference(ids)).abs().max() < 0.5  # quantized, not broken
    assert sum(1 for m in model.modules() if getattr(m, "quant_record", None) is not None) == 7 * LAYERS


def test_gptq_after_awq_rescales_the_layer_then_solves_on_the_scaled_inputs(src, tokens, tmp_path):
    """--method gptq --awq: the norms come out rescaled (AWQ's pairs), the recipe says so; plain GPTQ keeps them."""
    from safetensors.torch import load_file

    def norms(out):
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(f))
        return {k: v for k, v in tensors.items() if k.endswith("layernorm.weight")}
    source = norms(src)
    for flags, scaled in ((["--awq"], True), ([], False)):
        out = tmp_path / ("awq" if scaled else "plain")
        done = run("quantize", src, *method_args("gptq", tokens), *flags, "-o", out)
        assert done.exit_code == 0, done.output
        changed = [k for k, v in norms(out).items() if not torch.equal(v, source[k])]
        assert (len(changed) > LAYERS) if scaled else not changed  # s = 1 may win a pair of this random model
        assert quantkit.load(out).quant_recipe["default"]["awq"] is scaled


@pytest.mark.parametrize("extra, message", [
    ([], "Error: method awq needs calibration data: pass --calib"),
    (["--format", "bnb", "CALIB"], "bnb"),
    (["--bits", "5", "CALIB"], "Error: awq: --bits 5 is not supported: use one of 2, 3, 4, 8"),
], ids=["no calibration", "bnb format", "5 bits"])
def test_awq_bad_input_is_one_line(src, tokens, tmp_path, extra, message):
    extra = [a for e in extra for a in (["--calib", tokens, "--n-samples", "8", "--seq-len", "32"]
                                        if e == "CALIB" else [e])]
    result = run("quantize", src, "--method", "awq", "-o", tmp_path / "q", *extra)
    errors = [line for line in result.lines if line.startswith("Error")]
    assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "q").exists()
