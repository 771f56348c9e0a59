"""Recipes: every rule and ignore pattern must apply to some module, or the run is refused before any work."""

import pytest

from quantkit.backends import Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.calibrator import quantize_calibrated
from quantkit.model.layout import module_names
from tests.conftest import random_model, tiny_config

LINEARS, OTHERS = module_names(tiny_config())  # 2 layers
INT4, RTN8 = Int4Config(32), RTNConfig(8, -1)


def test_assign_gives_each_decoder_linear_its_config():
    recipe = Recipe(INT4, rules=[(r"mlp\.down_proj$", RTN8)], ignore=[r"layers\.1\.self_attn"])
    assignment = recipe.assign(LINEARS, OTHERS)
    assert list(assignment) == LINEARS
    assert assignment["model.layers.0.mlp.down_proj"] is RTN8
    assert assignment["model.layers.1.self_attn.q_proj"] is None
    assert assignment["model.layers.0.self_attn.q_proj"] is INT4


@pytest.mark.parametrize("recipe, needles", [
    # a request for a module quantkit does not quantize: refused with the reason
    (Recipe(INT4, rules=[("lm_head", RTN8)]), ["recipe rule 'lm_head'", "does not quantize the lm_head"]),
    (Recipe(INT4, rules=[("embed_tokens", RTN8)]), ["model.embed_tokens", "lookup table"]),
    (Recipe(INT4, rules=[(".*", RTN8)]), ["recipe rule '.*'", "matches model.embed_tokens"]),
    (Recipe(INT4, rules=[("input_layernorm", RTN8)]), ["not decoder linears", "input_layernorm"]),
    # a typo: the closest names
    (Recipe(INT4, rules=[(r"mlp\.dwn_proj$", RTN8)]), [r"'mlp\.dwn_proj$' matches no module", "'mlp.down_proj'"]),
    (Recipe(INT4, ignore=[r"self_atn\.q_proj"]), ["ignore pattern", "'self_attn.q_proj'"]),
    (Recipe(INT4, ignore=[r"layers\.40\."]), ["matches no module", "decoder layers are 0 to 1"]),
    # a rule that decides nothing: shadowed by an earlier rule, or by an ignore pattern
    (Recipe(INT4, rules=[("mlp", RTN8), ("down_proj", RTNConfig(4, 32))]),
     ["recipe rule 2 ('down_proj') decides no module", "rule 1 ('mlp') comes first"]),
    (Recipe(INT4, rules=[(r"layers\.0\.", RTN8)], ignore=[r"layers\.0\."]), ["decides no module", "ignore pattern"]),
])
def test_a_pattern_that_changes_nothing_is_refused(recipe, needles):
    with pytest.raises(QuantkitError) as e:
        recipe.assign(LINEARS, OTHERS)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("ignore", ["lm_head", r"layers\.0\.", "input_layernorm"])
def test_ignoring_what_stays_in_full_precision_anyway_is_accepted(ignore):
    assert Recipe(INT4, ignore=[ignore]).assign(LINEARS, OTHERS)  # the request is honoured: those stay unquantized


def test_in_memory_quantize_refuses_a_rule_that_matches_nothing():
    model = random_model(tiny_config())
    with pytest.raises(QuantkitError, match="matches no module"):
        quantize(model, Recipe(INT4, rules=[(r"mlp\.dwn_proj$", RTN8)]))
    assert not any(hasattr(m, "quant_record") for m in model.modules())  # refused before any linear was swapped


def test_calibrated_quantize_refuses_a_rule_that_matches_nothing():
    from quantkit.backends.gptq import GPTQConfig

    model = random_model(tiny_config())
    with pytest.raises(QuantkitError, match="lm_head"):
        quantize_calibrated(model, Recipe(GPTQConfig(4, 32), rules=[("lm_head", RTN8)]), tokens=None, progress=False)
