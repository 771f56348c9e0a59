import json

import pytest
import transformers

from quantkit.errors import QuantkitError
from quantkit.model import LlamaConfig, LlamaForCausalLM, preset
from quantkit.model.config import ASSUMED_KEY, HF_DEFAULTS

HF4_7B = {  # meta-llama/Llama-2-7b-hf config.json, as transformers 4.x wrote it
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_reads_transformers4_dialect():
    c = LlamaConfig.from_hf_dict({**HF4_7B, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.torch_dtype) == (4096, 32, 128, "float16")
    assert (c.rope_theta, c.rope_type, c.rope_factor) == (5e5, "linear", 4.0)


def test_reads_transformers5_dialect():
    d = {**HF4_7B, "dtype": "bfloat16", "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}}
    del d["torch_dtype"], d["rope_scaling"]
    c = LlamaConfig.from_hf_dict(d)
    assert (c.torch_dtype, c.rope_type, c.rope_factor, c.rope_theta) == ("bfloat16", "dynamic", 2.0, 1e4)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0}])
def test_written_config_reads_back_in_transformers(tmp_path, rope):
    d = {**HF4_7B, "num_key_value_heads": 8, "rope_scaling": rope}
    ours = LlamaConfig.from_hf_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 8 and hf.hidden_size == 4096
    assert hf.rope_parameters["rope_type"] == (rope or {}).get("rope_type", "default")
    assert LlamaConfig.from_file(tmp_path / "config.json") == ours


@pytest.mark.parametrize("name, params, kv_heads", [
    ("llama2-7b", 6_738_415_616, 32), ("llama2-13b", 13_015_864_320, 40), ("llama2-70b", 68_976_648_192, 8)])
def test_presets_have_the_real_shapes(name, params, kv_heads):
    import torch
    with torch.device("meta"):
        model = LlamaForCausalLM(preset(name))
    assert sum(p.numel() for p in model.parameters()) == params  # the published parameter counts
    assert model.config.num_key_value_heads == kv_heads


def test_non_llama_config_is_refused():
    with pytest.raises(QuantkitError, match="model_type is 'mistral', not 'llama'"):
        LlamaConfig.from_hf_dict({**HF4_7B, "model_type": "mistral"})


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(QuantkitError, match="rope_scaling.type is \"yarn\": quantkit supports"):
        LlamaConfig.from_hf_dict({**HF4_7B, "rope_scaling": {"type": "yarn", "factor": 2.0}})


# -- what config.json states ------------------------------------------------------------------

def test_a_config_remembers_which_keys_it_stated():
    d = {k: v for k, v in HF4_7B.items() if k not in ("torch_dtype", "vocab_size", "num_key_value_heads")}
    c = LlamaConfig.from_hf_dict(d)
    assert c.torch_dtype is None and "dtype" not in c.to_hf_dict()
    assert {"hidden_size", "intermediate_size", "num_hidden_layers"} <= c.stated
    assert not {"vocab_size", "num_key_value_heads", "torch_dtype", "head_dim"} & c.stated
    assert preset("llama2-7b").stated >= {"vocab_size", "torch_dtype", "num_key_value_heads"}  # in code: all stated
    assert LlamaConfig.from_hf_dict(HF4_7B).torch_dtype == "float16"


@pytest.mark.parametrize("key, value", [("num_key_value_heads", None), ("head_dim", None), ("pad_token_id", None),
                                        ("rope_scaling", None), ("pad_token_id", -1), ("eos_token_id", [2, 32000]),
                                        ("torch_dtype", "bf16"), ("rope_theta", 10000)])
def test_values_transformers_accepts_are_read(key, value):
    c = LlamaConfig.from_hf_dict({**HF4_7B, key: value})
    assert (c.num_key_value_heads, c.head_dim, c.eos_token_id) == (32, 128, 2)
    assert c.torch_dtype == ("bfloat16" if key == "torch_dtype" else "float16")


def test_unknown_keys_round_trip(tmp_path):
    c = LlamaConfig.from_hf_dict({**HF4_7B, "my_key": {"nested": [1, 2]}, "stated": "mine", "extra": 3})
    assert c.to_hf_dict()["my_key"] == {"nested": [1, 2]}
    assert c.to_hf_dict()["stated"] == "mine" and c.to_hf_dict()["extra"] == 3


# -- malformed values: one line naming config.json and the key --------------------------------

MALFORMED = [
    ("hidden_size", True, "hidden_size is true: it must be a positive integer"),
    ("hidden_size", "4096", 'hidden_size is "4096": it must be a positive integer'),
    ("hidden_size", 4096.0, "hidden_size is 4096.0: it must be a positive integer"),
    ("hidden_size", None, "hidden_size is null: it must be a positive integer"),
    ("hidden_size", [4096], "hidden_size is [4096]: it must be a positive integer"),
    ("vocab_size", -1, "vocab_size is -1: it must be a positive integer"),
    ("num_hidden_layers", 0, "num_hidden_layers is 0: it must be a positive integer"),
    ("num_attention_heads", 0, "num_attention_heads is 0: it must be a positive integer"),
    ("num_attention_heads", 3, "hidden_size=4096 is not a multiple of num_attention_heads=3"),
    ("num_key_value_heads", 5, "num_attention_heads=32 is not a multiple of num_key_value_heads=5"),
    ("num_key_value_heads", False, "num_key_value_heads is false: it must be a positive integer"),
    ("head_dim", 0, "head_dim is 0: it must be a positive integer"),
    ("max_position_embeddings", 0, "max_position_embeddings is 0: it must be a positive integer"),
    ("pretraining_tp", 0, "pretraining_tp is 0: it must be a positive integer"),
    ("rms_norm_eps", 0, "rms_norm_eps is 0: it must be a positive number"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps is NaN: it must be a positive number"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps is Infinity: it must be a positive number"),
    ("rms_norm_eps", "1e-5", 'rms_norm_eps is "1e-5": it must be a positive number'),
    ("rope_theta", 0, "rope_theta is 0: it must be a positive number"),
    ("rope_theta", True, "rope_theta is true: it must be a positive number"),
    ("rope_scaling", {"type": "linear", "factor": None}, "rope_scaling.factor is null: it must be a positive number"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "rope_scaling.factor is 0: it must be a positive number"),
    ("rope_scaling", {"type": "linear", "factor": -2.0}, "rope_scaling.factor is -2.0: it must be a positive number"),
    ("rope_scaling", {"type": "dynamic"}, "rope_scaling.factor is missing: dynamic scaling needs a positive number"),
    ("rope_scaling", {"type": "ntk", "factor": 2.0}, 'rope_scaling.type is "ntk": quantkit supports default'),
    ("rope_scaling", "linear", 'rope_scaling is "linear": it must be an object'),
    ("rope_scaling", [2.0], "rope_scaling is [2.0]: it must be an object"),
    ("rope_parameters", {"rope_type": "linear", "factor": "2"}, 'rope_parameters.factor is "2": it must be a positive'),
    ("rope_parameters", {"rope_theta": -1}, "rope_parameters.rope_theta is -1: it must be a positive number"),
    ("torch_dtype", "float64", 'torch_dtype is "float64": it must be one of float32, float16, bfloat16'),
    ("torch_dtype", 16, "torch_dtype is 16: it must be one of float32, float16, bfloat16"),
    ("dtype", ["float16"], 'dtype is ["float16"]: it must be one of float32, float16, bfloat16'),
    ("eos_token_id", "2", 'eos_token_id is "2": it must be a token id'),
    ("eos_token_id", [], "eos_token_id is []: it must be a token id or a non-empty list of them"),
    ("eos_token_id", [2, "x"], 'eos_token_id is "x": it must be a token id'),
    ("bos_token_id", True, "bos_token_id is true: it must be a token id"),
    ("bos_token_id", -1, "bos_token_id is -1: it must be a token id"),
    ("pad_token_id", 1.5, "pad_token_id is 1.5: it must be a token id"),
    ("tie_word_embeddings", "yes", 'tie_word_embeddings is "yes": it must be true or false'),
    ("tie_word_embeddings", None, "tie_word_embeddings is null: it must be true or false"),
    ("attention_bias", 1, "attention_bias is 1: it must be true or false"),
]


@pytest.mark.parametrize("key, value, says", MALFORMED, ids=[f"{k}={v!r}" for k, v, _ in MALFORMED])
def test_malformed_values_are_one_line_naming_the_file_and_key(tmp_path, key, value, says):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF4_7B, key: value}))
    with pytest.raises(QuantkitError) as e:
        LlamaConfig.from_file(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert says in message, message


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '"x"', "[" * 100000 + "]" * 100000, "\xff\xfe"])
def test_unreadable_config_json_is_one_line(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(QuantkitError) as e:
        LlamaConfig.from_file(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")


def test_in_code_configs_are_checked_too():
    with pytest.raises(QuantkitError, match="hidden_size is true: it must be a positive integer"):
        LlamaConfig(hidden_size=True)
    with pytest.raises(QuantkitError, match="torch_dtype is \"int8\""):
        LlamaConfig(torch_dtype="int8")


def hf_value(hf, key):
    return hf.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(hf, key)


FULL = {**HF4_7B, "rope_theta": 10000.0, "head_dim": 128, "attention_bias": False, "mlp_bias": False,
        "pad_token_id": None}


@pytest.mark.parametrize("key", sorted({*FULL} - {"architectures", "initializer_range", "model_type", "use_cache",
                                                   "transformers_version", "torch_dtype", "rope_scaling"}))
def test_an_absent_key_takes_transformers_default(tmp_path, key):
    """Every key quantkit reads from config.json, left out, means what it means to transformers' LlamaConfig."""
    d = {k: v for k, v in FULL.items() if k != key}
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours, hf = LlamaConfig.from_file(tmp_path / "config.json"), transformers.AutoConfig.from_pretrained(tmp_path)
    ours_value = "silu" if key == "hidden_act" else getattr(ours, key)  # the one activation quantkit computes
    assert ours_value == hf_value(hf, key), key
    if key in HF_DEFAULTS:
        assert ours.assumed == {key: HF_DEFAULTS[key]} and ours.to_hf_dict()[ASSUMED_KEY] == {key: HF_DEFAULTS[key]}


@pytest.mark.parametrize("key, rope, warns", [("rms_norm_eps", None, True), ("rope_theta", None, False),
                                              ("max_position_embeddings", {"type": "dynamic", "factor": 2.0}, True),
                                              ("max_position_embeddings", None, False), ("pretraining_tp", None, False)])
def test_a_default_that_changes_the_logits_is_one_warning(caplog, key, rope, warns):
    d = {k: v for k, v in {**FULL, "rope_scaling": rope}.items() if k != key}
    LlamaConfig.from_hf_dict(d)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == int(warns), warnings
    if warns:
        assert f"states no {key}: taking transformers' default {key}={HF_DEFAULTS[key]}" in warnings[0]


def test_an_early_checkpoint_with_max_sequence_length_computes_as_transformers(tmp_path, caplog):
    """transformers#22222: config.json has max_sequence_length, no max_position_embeddings; with dynamic rope the
    logits past 2048 tokens depend on the default (transformers: 2048)."""
    import torch

    import quantkit
    from quantkit.model import save_model
    from tests.conftest import DEMO_MODEL, random_model, tiny_config

    save_model(random_model(tiny_config(vocab_size=512)), tmp_path / "m", tokenizer_dir=DEMO_MODEL)
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    del d["max_position_embeddings"]
    d.update(max_sequence_length=2048, rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0})
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    (tmp_path / "m" / "quantkit_manifest.json").unlink()  # a hand edit
    ids = torch.randint(0, 512, (1, 2100), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(quantkit.load(tmp_path / "m")(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert "max_sequence_length=2048 is not a key transformers reads" in caplog.text
    quantkit.save_model(quantkit.load(tmp_path / "m"), tmp_path / "out", tokenizer_dir=tmp_path / "m")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["max_position_embeddings"] == 2048 and written["max_sequence_length"] == 2048
    assert written[ASSUMED_KEY]["max_position_embeddings"] == 2048
