import json

import pytest
import transformers

from quantkit.errors import QuantkitError
from quantkit.model import LlamaConfig, LlamaForCausalLM, preset

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
    with pytest.raises(QuantkitError, match="rope scaling type 'yarn'"):
        LlamaConfig.from_hf_dict({**HF4_7B, "rope_scaling": {"type": "yarn", "factor": 2.0}})
