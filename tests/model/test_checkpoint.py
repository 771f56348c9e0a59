"""Checkpoint I/O: round trips, the per-layer streaming API, .bin files, and every bad-input case."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantkit
from quantkit.errors import QuantkitError
from quantkit.model import Checkpoint, save_model
from quantkit.model.checkpoint import resolve_model_dir
from quantkit.model.shards import parse_size
from tests.conftest import random_model, tiny_config


def file_tensors(model_dir):
    """Every tensor stored under model_dir, by name, as read back from the files."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("max_shard_size", ["5GB", "60KB"])
def test_save_load_round_trip_bit_for_bit(tmp_path, dtype, max_shard_size):
    model = random_model(tiny_config(tie_word_embeddings=dtype == "bf16"))
    first = save_model(model, tmp_path / "a", max_shard_size=max_shard_size, dtype=dtype)
    sharded = (first / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size == "60KB")
    if sharded:
        index = json.loads((first / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(file_tensors(first))
        assert len(set(index["weight_map"].values())) > 1
    reloaded = quantkit.load(first)
    assert reloaded.lm_head.weight.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    second = save_model(reloaded, tmp_path / "b", max_shard_size=max_shard_size)
    a, b = file_tensors(first), file_tensors(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for name, p in reloaded.state_dict().items():
        if name in a:
            assert torch.equal(p, a[name])


def test_tied_embeddings_are_saved_once_and_retied(tmp_path):
    model = random_model(tiny_config(tie_word_embeddings=True))
    save_model(model, tmp_path / "m")
    assert "lm_head.weight" not in file_tensors(tmp_path / "m")
    loaded = quantkit.load(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_loaded_model_computes_like_the_saved_one(tiny_model_dir):
    model = quantkit.load(tiny_model_dir)
    assert not any(p.is_meta for p in model.parameters())
    original = random_model(tiny_config())
    ids = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))


def test_copies_tokenizer_files(tiny_model_dir, tmp_path):
    save_model(quantkit.load(tiny_model_dir), tmp_path / "again")  # tokenizer found through source_dir
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()


def test_layer_api_reads_only_that_layer(tiny_model_dir, monkeypatch):
    ckpt = Checkpoint(tiny_model_dir)
    read = []
    original = ckpt.read

    def spy(names, dtype=None):
        names = list(names)
        read.extend(names)
        return original(names, dtype)

    monkeypatch.setattr(ckpt, "read", spy)
    layer = ckpt.layer(1, torch.float16)
    assert all(n.startswith("model.layers.1.") for n in read) and len(read) == 9
    assert set(layer) == {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                          "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}
    assert layer["self_attn.k_proj.weight"].shape == (32, 64) and layer["mlp.up_proj.weight"].dtype == torch.float16
    assert [i for i, _ in ckpt.layers()] == [0, 1]
    assert ckpt.non_layer_names() == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def test_pytorch_bin_checkpoints_load(tiny_model_dir, tmp_path):
    model = quantkit.load(tiny_model_dir)
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    loaded = quantkit.load(tmp_path / "bin")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_old_rotary_inv_freq_tensors_are_ignored(tiny_model_dir):
    tensors = file_tensors(tiny_model_dir)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, tiny_model_dir / "model.safetensors")
    quantkit.load(tiny_model_dir)


def test_existing_output_is_refused_and_kept(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuantkitError, match="already exists.*--force"):
        save_model(quantkit.load(tiny_model_dir), out)
    assert (out / "keep.txt").read_text() == "mine"
    save_model(quantkit.load(tiny_model_dir), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_failed_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import quantkit.model.checkpoint as checkpoint

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "copy_tokenizer_files", boom)
    with pytest.raises(OSError):
        save_model(quantkit.load(tiny_model_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tiny_model_dir.parent / "tiny"] or not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (123, 123)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(QuantkitError, match="'lots' is not a size"):
        parse_size("lots")


# -- bad input: each names the file and says what to do ---------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(QuantkitError, match=f"{tmp_path / 'nope'}: no such model directory"):
        quantkit.load(tmp_path / "nope")


def test_missing_config(tiny_model_dir):
    (tiny_model_dir / "config.json").unlink()
    with pytest.raises(QuantkitError, match="config.json: no config.json"):
        quantkit.load(tiny_model_dir)


def test_non_llama_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(QuantkitError, match="config.json: model_type is 'gpt2', not 'llama'"):
        quantkit.load(tiny_model_dir)


def test_shard_missing_from_index(tmp_path):
    out = save_model(random_model(tiny_config()), tmp_path / "m", max_shard_size="60KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(QuantkitError, match=f"{victim.name}: shard named in model.safetensors.index.json is missing"):
        quantkit.load(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_model_dir, damage):
    path = tiny_model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(QuantkitError, match="model.safetensors: truncated or corrupt safetensors file"):
        quantkit.load(tiny_model_dir)


def test_shape_disagrees_with_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(QuantkitError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape "
                                            r"\[128, 64\] but config.json implies \[96, 64\]"):
        quantkit.load(tiny_model_dir)


def test_missing_tensor(tiny_model_dir):
    tensors = file_tensors(tiny_model_dir)
    del tensors["model.norm.weight"]
    save_file(tensors, tiny_model_dir / "model.safetensors")
    with pytest.raises(QuantkitError, match="tensor model.norm.weight is missing"):
        quantkit.load(tiny_model_dir)


def test_missing_tokenizer(tiny_model_dir):
    (tiny_model_dir / "tokenizer.model").unlink()
    with pytest.raises(QuantkitError, match="tokenizer.model: no tokenizer.model"):
        quantkit.load_tokenizer(tiny_model_dir)


def test_no_weights(tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()
    with pytest.raises(QuantkitError, match="no weights"):
        quantkit.load(tiny_model_dir)


def test_hub_id_offline_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantkitError, match="meta-llama/Llama-2-7b-hf: .*hub could not provide it.*pass a local directory"):
        resolve_model_dir("meta-llama/Llama-2-7b-hf")
