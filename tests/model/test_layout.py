"""The Llama module grammar: names, shapes and groupings agree with the native model."""

import pytest

from quantkit.model.layout import (DECODER_LINEARS, FUSED_SHARDS, SEQUENTIAL_GROUPS, block_of, checkpoint_shapes,
                                   is_decoder_linear, layer_index, layer_prefix, linear_of, local_name, parse)
from tests.conftest import random_model, tiny_config


@pytest.mark.parametrize("name, expected", [
    ("model.layers.3.mlp.down_proj.weight", (3, "mlp.down_proj.weight")),
    ("model.layers.12.self_attn.q_proj", (12, "self_attn.q_proj")),
    ("layers.0.input_layernorm.weight", (0, "input_layernorm.weight")),
    ("model.layers.7", (7, "")),
    ("lm_head.weight", (None, "lm_head.weight")),
    ("model.embed_tokens.weight", (None, "model.embed_tokens.weight")),
])
def test_parse(name, expected):
    assert parse(name) == expected
    assert layer_index(name) == expected[0]


def test_prefix_block_local_and_linear_names_round_trip():
    name = layer_prefix(5) + "self_attn.o_proj"
    assert name == "model.layers.5.self_attn.o_proj"
    assert block_of(name) == "model.layers.5" and local_name(name) == "self_attn.o_proj"
    assert linear_of(name + ".qweight") == name and linear_of("model.layers.5.input_layernorm.weight") is None
    assert block_of("lm_head") is None and linear_of("lm_head.weight") is None
    assert is_decoder_linear(name) and is_decoder_linear("layers.0.mlp.up_proj")
    assert not is_decoder_linear("lm_head") and not is_decoder_linear(name + ".weight")


def test_groupings_cover_the_seven_linears_once():
    assert sorted(sum(SEQUENTIAL_GROUPS, ())) == sorted(DECODER_LINEARS)
    assert set(sum(FUSED_SHARDS, ())) <= set(DECODER_LINEARS)
    assert {n for n, dim in DECODER_LINEARS.items() if dim == 1} == {"self_attn.o_proj", "mlp.down_proj"}


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}],
                         ids=["plain", "biases", "tied"])
def test_checkpoint_shapes_are_the_native_models(overrides):
    config = tiny_config(**overrides)
    state = random_model(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert checkpoint_shapes(config) == {k: tuple(v.shape) for k, v in state.items()}
