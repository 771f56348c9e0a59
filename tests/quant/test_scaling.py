"""fold_scales leaves the float layer's function unchanged for every scaling pair of the layout; GQA's v_proj ->
o_proj does not pair and is refused."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.model.layout import SCALING_PAIRS
from quantkit.model.llama import LlamaDecoderLayer, rotary_embedding
from quantkit.quant.scaling import fold_scales
from tests.conftest import tiny_config


def layer_and_inputs(**overrides):
    config = tiny_config(hidden_size=128, intermediate_size=256, **overrides)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.05)
    x = torch.randn(2, 12, config.hidden_size)
    cos, sin = rotary_embedding(config, torch.arange(12)[None], x.dtype)
    return layer, x, cos, sin


@pytest.mark.parametrize("pair", SCALING_PAIRS, ids=lambda p: p[0])
def test_folded_scales_keep_the_float_layer(pair):
    layer, x, cos, sin = layer_and_inputs(num_key_value_heads=4)  # MHA: every pair applies
    preceding, followers, _ = pair
    with torch.no_grad():
        before, weight = layer(x, cos, sin), layer.get_submodule(followers[0]).weight.clone()
        s = torch.rand(layer.get_submodule(followers[0]).in_features, generator=torch.Generator().manual_seed(1)) + 0.5
        fold_scales(layer.get_submodule(preceding), [layer.get_submodule(n) for n in followers], s, preceding)
        after = layer(x, cos, sin)
    assert not torch.equal(layer.get_submodule(followers[0]).weight, weight)  # the weights did change
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_gqa_v_proj_does_not_pair_with_o_proj():
    layer, *_ = layer_and_inputs(num_key_value_heads=2)
    with pytest.raises(QuantkitError, match="scales for a module of 64 output channels and a linear of 128 inputs"):
        fold_scales(layer.self_attn.v_proj, [layer.self_attn.o_proj], torch.ones(128), "v_proj")


def test_scales_must_be_positive():
    layer, *_ = layer_and_inputs()
    with pytest.raises(QuantkitError, match="finite and positive"):
        fold_scales(layer.input_layernorm, [layer.self_attn.q_proj], -torch.ones(128), "input_layernorm")
