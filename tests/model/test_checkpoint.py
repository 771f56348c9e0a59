"""Checkpoint I/O: round trips, the per-layer streaming API, .bin files, and every bad-input case."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import quantkit
from quantkit.errors import QuantkitError
from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import Checkpoint, save_model
from quantkit.model.hub import resolve_model_dir
from quantkit.io.shards import parse_size
from tests.conftest import random_model, tiny_config
from tests.helpers import file_tensors


@pytest.fixture
def tiny_model_dir(tiny_model_dir):
    """conftest's, without quantkit's manifest: these tests edit its files as checkpoints from other tools come
    (with the manifest, any edit is refused first: tests/io/test_manifest.py)."""
    return unsealed(tiny_model_dir)


def unsealed(model_dir):
    """A saved directory without its manifest, to be edited as another tool's files."""
    (model_dir / MANIFEST_FILE).unlink()
    return model_dir


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
    loaded = quantkit.load(tiny_model_dir).state_dict()
    del tensors["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in loaded
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


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
    import quantkit.model.save as save

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save, "copy_tokenizer_files", boom)
    with pytest.raises(QuantkitError, match="out: cannot write there"):  # one line, not an OSError
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
    unsealed(out)  # the manifest would name the missing file first
    with pytest.raises(QuantkitError, match=f"{victim.name}: shard named in model.safetensors.index.json is missing"):
        quantkit.load(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_model_dir, damage):
    path = tiny_model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(QuantkitError, match="model.safetensors: truncated or corrupt safetensors file"):
        quantkit.load(tiny_model_dir)


@pytest.mark.parametrize("key, value, implied, evidence", [
    ("intermediate_size", 96, 128, "model.layers.0.mlp.gate_proj.weight in model.safetensors is [128, 64]"),
    ("hidden_size", 128, 64, "model.embed_tokens.weight in model.safetensors is [4096, 64]"),
    ("num_hidden_layers", 3, 2, "model.safetensors names layers 0-1"),
    ("num_hidden_layers", 1, 2, "model.safetensors names layers 0-1"),
    ("num_key_value_heads", 4, 2, "model.layers.0.self_attn.k_proj.weight in model.safetensors is [32, 64], "
                                  "head_dim 16")])
def test_stated_shape_disagreeing_with_the_tensors_is_one_line(tiny_model_dir, key, value, implied, evidence):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(QuantkitError) as e:
        quantkit.load(tiny_model_dir)
    assert str(e.value) == (f"{tiny_model_dir / 'config.json'}: {key} is {value} but the stored tensors imply "
                            f"{implied} ({evidence}): the config does not belong to these weights")


def test_other_shape_disagreements_name_the_tensor(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 8}))
    with pytest.raises(QuantkitError, match=r"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has "
                                            r"shape \[64, 64\] but config.json implies \[128, 64\]"):
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


# -- config.json silent or contradicting the stored tensors --------------------------------------

def edit_config(model_dir, drop=(), **values):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    cfg.update(values)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.fixture
def bf16_dir(tmp_path):
    return unsealed(save_model(random_model(tiny_config()), tmp_path / "bf16", dtype="bf16"))  # the tests edit it


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_config_without_dtype_computes_in_the_stored_dtype(bf16_dir, caplog, layout):
    edit_config(bf16_dir, drop=("dtype", "torch_dtype"))
    if layout == "bin":
        torch.save(file_tensors(bf16_dir), bf16_dir / "pytorch_model.bin")
        (bf16_dir / "model.safetensors").unlink()
    ckpt = Checkpoint(bf16_dir)
    assert ckpt.config.torch_dtype is None
    assert ckpt.stored_dtype == ckpt.default_dtype() == ckpt.output_dtype() == torch.bfloat16
    assert "states no dtype: using the stored bfloat16" in caplog.text and not warnings_of(caplog)
    model = quantkit.load(bf16_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = save_model(model, bf16_dir.parent / "again")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in file_tensors(out).values()} == {torch.bfloat16}


def test_a_config_dtype_unlike_the_stored_one_wins_with_one_warning(bf16_dir, caplog):
    edit_config(bf16_dir, drop=("dtype",), torch_dtype="float16")
    ckpt = Checkpoint(bf16_dir)
    assert (ckpt.default_dtype(), ckpt.output_dtype(), ckpt.stored_dtype) == (torch.float16, torch.bfloat16,
                                                                                torch.bfloat16)
    ckpt.layer_module(0)
    assert warnings_of(caplog) == [
        f"{bf16_dir / 'config.json'} says torch_dtype=float16 but the weights are stored as bfloat16: computing in "
        f"float16 as transformers does; pass --dtype bf16 to keep the stored precision"]
    assert quantkit.load(bf16_dir).lm_head.weight.dtype == torch.float16


SHAPE_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"]


@pytest.mark.parametrize("drop", [[k] for k in SHAPE_KEYS] + [SHAPE_KEYS + ["head_dim"]],
                         ids=SHAPE_KEYS + ["all"])
def test_unstated_shape_keys_come_from_the_tensors(tiny_model_dir, caplog, drop):
    edit_config(tiny_model_dir, drop=drop)
    config = Checkpoint(tiny_model_dir).config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_key_value_heads, config.head_dim) == (4096, 64, 128, 2, 2, 16)
    defaults = {"vocab_size": (32000, 4096), "hidden_size": (4096, 64), "intermediate_size": (11008, 128),
                "num_hidden_layers": (32, 2), "num_key_value_heads": (4, 2)}  # MHA default: the 4 query heads
    for key in drop:
        if key in defaults:
            default, stored = defaults[key]
            assert any(f"states no {key}: using {stored} from the stored tensors" in w and f"default {default}" in w
                       for w in warnings_of(caplog)), (key, warnings_of(caplog))
    model = quantkit.load(tiny_model_dir)
    with torch.no_grad():
        assert torch.equal(model(torch.arange(8)[None]), random_model(tiny_config())(torch.arange(8)[None]))


def test_a_stated_vocab_size_the_tensors_contradict_is_corrected(tiny_model_dir, tmp_path, caplog):
    edit_config(tiny_model_dir, vocab_size=4000)
    model = quantkit.load(tiny_model_dir)
    assert model.config.vocab_size == 4096 and model.lm_head.weight.shape == (4096, 64)
    assert any("says vocab_size=4000 but the stored tensors have 4096 rows" in w for w in warnings_of(caplog))
    out = save_model(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 4096


def test_an_embedding_and_lm_head_of_different_vocabularies_are_refused(tiny_model_dir):
    tensors = file_tensors(tiny_model_dir)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:4000].clone()
    save_file(tensors, tiny_model_dir / "model.safetensors")
    with pytest.raises(QuantkitError, match=r"model.safetensors: tensor lm_head.weight has shape \[4000, 64\]"):
        quantkit.load(tiny_model_dir)


@pytest.mark.parametrize("same", [True, False])
def test_tied_config_with_a_stored_lm_head(tiny_model_dir, caplog, same):
    tensors = file_tensors(tiny_model_dir)
    if same:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tiny_model_dir / "model.safetensors")
    edit_config(tiny_model_dir, tie_word_embeddings=True)
    model = quantkit.load(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = [] if same else [
        f"{tiny_model_dir / 'config.json'} sets tie_word_embeddings=true but model.safetensors stores its own "
        f"lm_head.weight (different from embed_tokens.weight): tying them as transformers does; set "
        f"tie_word_embeddings to false to use the stored lm_head"]
    assert warnings_of(caplog) == expected


@pytest.mark.parametrize("tie", [False, "absent"])
def test_an_untied_config_without_a_stored_lm_head_is_one_line(tiny_model_dir, tie):
    tensors = file_tensors(tiny_model_dir)
    del tensors["lm_head.weight"]
    save_file(tensors, tiny_model_dir / "model.safetensors")
    edit_config(tiny_model_dir, drop=["tie_word_embeddings"] if tie == "absent" else [], **(
        {} if tie == "absent" else {"tie_word_embeddings": False}))
    with pytest.raises(QuantkitError) as e:
        quantkit.load(tiny_model_dir)
    assert str(e.value) == (f"{tiny_model_dir / 'config.json'}: tie_word_embeddings is false (or absent) but the "
                            f"checkpoint stores no lm_head.weight: set \"tie_word_embeddings\": true if the embedding "
                            f"is also the lm_head")


@pytest.mark.parametrize("key, bias", [("attention_bias", "self_attn.q_proj.bias"), ("mlp_bias", "mlp.gate_proj.bias")])
def test_biases_the_checkpoint_does_not_store_are_one_line(tiny_model_dir, key, bias):
    edit_config(tiny_model_dir, **{key: True})
    with pytest.raises(QuantkitError, match=f"config.json: {key} is true but model.safetensors stores no "
                                            f"model.layers.0.{bias}: set {key} to false"):
        quantkit.load(tiny_model_dir)


def test_a_pretraining_tp_that_does_not_divide_is_one_line(tiny_model_dir):
    edit_config(tiny_model_dir, pretraining_tp=3)
    with pytest.raises(QuantkitError, match=r"config.json: pretraining_tp is 3, which does not divide "
                                            r".*hidden_size=64.*set it to 1"):
        quantkit.load(tiny_model_dir)


def test_a_missing_decoder_layer_is_named(tmp_path):
    out = unsealed(save_model(random_model(tiny_config(num_hidden_layers=3)), tmp_path / "m"))
    tensors = {k: v for k, v in file_tensors(out).items() if not k.startswith("model.layers.1.")}
    save_file(tensors, out / "model.safetensors")
    edit_config(out, drop=["num_hidden_layers"])
    with pytest.raises(QuantkitError, match="model.safetensors: no tensors for decoder layer 1 .*layers up to 2"):
        quantkit.load(out)


# -- which weight file: transformers' order --------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_stale_index_beside_a_complete_file_is_ignored_with_a_warning(tmp_path, caplog, kind):
    stale = save_model(random_model(tiny_config(), seed=0), tmp_path / "stale", max_shard_size="60KB")
    current = random_model(tiny_config(), seed=1)
    out = unsealed(save_model(current, tmp_path / "m"))
    if kind == "safetensors":
        for f in stale.glob("model*"):
            if f.name != "model.safetensors":
                shutil.copy(f, out / f.name)
        single, index = "model.safetensors", "model.safetensors.index.json"
    else:
        (out / "model.safetensors").unlink()
        torch.save(current.state_dict(), out / "pytorch_model.bin")
        torch.save(random_model(tiny_config(), seed=0).state_dict(), out / "stale.bin")
        weight_map = dict.fromkeys(current.state_dict(), "stale.bin")
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        single, index = "pytorch_model.bin", "pytorch_model.bin.index.json"
    loaded = quantkit.load(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), current.state_dict().values()))
    assert warnings_of(caplog) == [f"{out}: both {single} and {index} exist: reading {single}, as transformers does "
                                   f"(the index is ignored; delete whichever is stale)"]


def test_safetensors_shards_come_before_a_pytorch_bin(tmp_path, caplog):
    current = random_model(tiny_config(), seed=1)
    out = unsealed(save_model(current, tmp_path / "m", max_shard_size="60KB"))
    torch.save(random_model(tiny_config(), seed=0).state_dict(), out / "pytorch_model.bin")
    loaded = quantkit.load(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), current.state_dict().values()))
    assert not warnings_of(caplog)


# -- the CLI on a bf16 checkpoint whose config.json names no dtype --------------------------------

def test_cli_eval_on_a_bf16_model_without_a_config_dtype(tmp_path, tokenizer_file):
    from click.testing import CliRunner

    from quantkit.cli import main

    model_dir = unsealed(save_model(random_model(tiny_config()), tmp_path / "m", tokenizer_dir=tokenizer_file.parent,
                                    dtype="bf16"))
    edit_config(model_dir, drop=("dtype", "torch_dtype"))
    text = tmp_path / "text.txt"
    text.write_text((tokenizer_file.parent / "test.txt").read_text()[:4000])
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--dataset", str(text), "--seq-len", "64",
                                       "--no-speed", "--json"])
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower()
    entry = json.loads(result.output[result.output.index("{"):])["models"][0]
    assert entry["method"] == "bf16" and 1 < entry["perplexity"]["ppl"] < float("inf")
