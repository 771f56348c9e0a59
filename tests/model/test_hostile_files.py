"""Hostile model directories: none may crash with a traceback, read outside the directory, or run code.

Shard indexes that point outside the directory (directly or through symlinks) are refused before any
file is opened; hub cache snapshots, whose files are symlinks into the repo's blobs/, load. Corrupt
safetensors headers, dtypes quantkit cannot compute with, and pickles that would run code are one line
naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantkit
import quantkit.model.checkpoint as checkpoint
from quantkit.errors import QuantkitError
from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import Checkpoint, save_model
from tests.conftest import random_model, tiny_config
from tests.helpers import file_tensors


@pytest.fixture
def small_dir(tmp_path):
    """A one-layer bf16 model with a 128-token vocabulary, without quantkit's manifest (as hostile files come)."""
    out = save_model(random_model(tiny_config(vocab_size=128, num_hidden_layers=1)), tmp_path / "m", dtype="bf16")
    (out / MANIFEST_FILE).unlink()
    return out


@pytest.fixture
def sharded_dir(tmp_path):
    out = save_model(random_model(tiny_config(vocab_size=128, num_hidden_layers=1)), tmp_path / "sharded",
                     max_shard_size="40KB", dtype="bf16")
    assert (out / "model.safetensors.index.json").is_file()
    (out / MANIFEST_FILE).unlink()  # as hostile files come
    return out


@pytest.fixture
def opened(monkeypatch):
    """Every path safe_open and torch.load are asked to open, in order."""
    paths = []

    def spy_safe_open(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return safe_open(path, *args, **kwargs)

    real_load = torch.load

    def spy_load(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy_safe_open)
    monkeypatch.setattr(checkpoint.torch, "load", spy_load)
    return paths


def rewrite_index(model_dir, name="model.safetensors.index.json", **changes):
    index = json.loads((model_dir / name).read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"].update({first: changes["entry"]} if "entry" in changes else {})
    if "weight_map" in changes:
        index["weight_map"] = changes["weight_map"]
    (model_dir / name).write_text(json.dumps(index))


def one_line(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


# -- shard indexes pointing outside the directory -----------------------------------------------

@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "../../etc/passwd", "PLACEHOLDER_ABSOLUTE"])
def test_index_entries_outside_the_directory_are_refused_before_opening(sharded_dir, tmp_path, opened, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"x": torch.zeros(2)}, outside / "model.safetensors")  # a real, readable file out there
    entry = str(outside / "model.safetensors") if entry == "PLACEHOLDER_ABSOLUTE" else entry
    rewrite_index(sharded_dir, entry=entry)
    with pytest.raises(QuantkitError) as e:
        Checkpoint(sharded_dir)
    one_line(e, "model.safetensors.index.json", "outside the model directory")
    assert opened == []


def test_bin_index_entries_outside_the_directory_are_refused(tmp_path, opened):
    model = random_model(tiny_config(vocab_size=128, num_hidden_layers=1))
    out = tmp_path / "bin"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    torch.save(model.state_dict(), tmp_path / "elsewhere.bin")
    weight_map = dict.fromkeys(model.state_dict(), "../elsewhere.bin")
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(QuantkitError) as e:
        Checkpoint(out)
    one_line(e, "pytorch_model.bin.index.json", "outside the model directory")
    assert opened == []


@pytest.mark.parametrize("how", ["shard", "single", "directory"])
def test_symlinks_leaving_the_directory_are_refused(sharded_dir, small_dir, tmp_path, opened, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    if how == "shard":  # a shard replaced by a link to a file elsewhere
        target = sorted(sharded_dir.glob("model-*.safetensors"))[0]
        shutil.move(target, outside / target.name)
        target.symlink_to(outside / target.name)
        model_dir, named = sharded_dir, target.name
    elif how == "single":
        target = small_dir / "model.safetensors"
        shutil.move(target, outside / "model.safetensors")
        target.symlink_to(outside / "model.safetensors")
        model_dir, named = small_dir, "model.safetensors"
    else:  # an index entry inside a subdirectory that is itself a link out
        (sharded_dir / "sub").symlink_to(outside, target_is_directory=True)
        first = sorted(sharded_dir.glob("model-*.safetensors"))[0]
        shutil.copy(first, outside / first.name)
        index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f"sub/{v}" if v == first.name else v for k, v in index["weight_map"].items()}
        (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        model_dir, named = sharded_dir, "sub"
    with pytest.raises(QuantkitError) as e:
        Checkpoint(model_dir)
    one_line(e, named, "outside the model directory")
    assert not any(p.startswith(str(outside.resolve())) for p in opened)


def test_symlinks_inside_the_directory_load(sharded_dir):
    stored = file_tensors(sharded_dir)
    blobs = sharded_dir / "blobs"
    blobs.mkdir()
    for shard in sharded_dir.glob("model-*.safetensors"):
        shutil.move(shard, blobs / f"sha-{shard.name}")
        shard.symlink_to(f"blobs/sha-{shard.name}")
    loaded = quantkit.load(sharded_dir).state_dict()
    assert all(p.is_symlink() for p in sharded_dir.glob("model-*.safetensors"))
    assert stored.keys() <= loaded.keys() and all(torch.equal(loaded[k], t) for k, t in stored.items())


def hub_snapshot(src, cache, repo="models--org--tiny", shared_store=False):
    """src laid out as huggingface_hub caches it: snapshots/REV/FILE -> ../../blobs/SHA (-> the shared store)."""
    snapshot = cache / repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / repo / "blobs").mkdir()
    if shared_store:
        (cache / "blobs" / "ab").mkdir(parents=True)
        (cache / "blobs" / ".huggingface-shared-blobs").write_text("1\n")
    for i, file in enumerate(sorted(src.iterdir())):
        blob = cache / repo / "blobs" / f"{i:040x}"
        if shared_store:
            stored = cache / "blobs" / "ab" / f"{i:064x}"
            shutil.copy(file, stored)
            blob.symlink_to(os.path.relpath(stored, blob.parent))
        else:
            shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.mark.parametrize("shared_store", [False, True])
def test_a_hub_cache_snapshot_loads(sharded_dir, tmp_path, shared_store):
    snapshot = hub_snapshot(sharded_dir, tmp_path / "hub", shared_store=shared_store)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    loaded = quantkit.load(snapshot)
    reference = quantkit.load(sharded_dir)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_a_hub_snapshot_linking_into_another_repos_blobs_is_refused(sharded_dir, tmp_path):
    cache = tmp_path / "hub"
    snapshot = hub_snapshot(sharded_dir, cache)
    other = hub_snapshot(sharded_dir, cache, repo="models--evil--other")
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to((other / shard.name).resolve())
    with pytest.raises(QuantkitError) as e:
        Checkpoint(snapshot)
    one_line(e, shard.name, "outside the model directory")


@pytest.mark.parametrize("weight_map, says", [
    ([1, 2], "no weight_map object"), ("model.safetensors", "no weight_map object"), ({}, "no weight_map object"),
    ({"model.norm.weight": 5}, "is 5: it must be a file name"),
    ({"model.norm.weight": None}, "is null: it must be a file name"),
    ({"model.norm.weight": ["a.safetensors"]}, "it must be a file name"),
    ({"model.norm.weight": "config.json"}, "not a .safetensors file")])
def test_malformed_weight_maps_are_one_line(sharded_dir, weight_map, says):
    rewrite_index(sharded_dir, weight_map=weight_map)
    with pytest.raises(QuantkitError) as e:
        Checkpoint(sharded_dir)
    one_line(e, "model.safetensors.index.json", says)


@pytest.mark.parametrize("link, says", [("loop", "model.safetensors: cannot be resolved"),
                                        ("dangling", "model.safetensors: truncated or corrupt safetensors file")])
def test_broken_symlinks_are_one_line(small_dir, link, says):
    (small_dir / "model.safetensors").unlink()
    (small_dir / "model.safetensors").symlink_to(small_dir / "blob")
    if link == "loop":
        (small_dir / "blob").symlink_to(small_dir / "model.safetensors")
    with pytest.raises(QuantkitError) as e:
        Checkpoint(small_dir)
    one_line(e, says)


# -- corrupt safetensors --------------------------------------------------------------------------

def header_and_body(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header, body):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


def damage(kind, data, header, body):
    if kind == "random bytes":
        return os.urandom(256)
    if kind == "header length 2**60":
        return struct.pack("<Q", 2**60) + data[8:]
    if kind == "header not an object":
        return with_header([header], body)
    entry = first_tensor(header)
    if kind == "unknown dtype":
        entry["dtype"] = "Q4_K"
    elif kind == "negative shape":
        entry["shape"] = [-entry["shape"][0], *entry["shape"][1:]]
    elif kind == "overlapping offsets":
        others = [v for k, v in header.items() if k != "__metadata__" and v is not entry]
        entry["data_offsets"] = list(others[0]["data_offsets"])
    elif kind == "offsets past the end":
        entry["data_offsets"] = [len(body), len(body) + 4096]
    return with_header(header, body)


@pytest.mark.parametrize("kind", ["random bytes", "header length 2**60", "header not an object", "unknown dtype",
                                  "negative shape", "overlapping offsets", "offsets past the end"])
def test_corrupt_safetensors_headers_are_one_line(small_dir, kind):
    path = small_dir / "model.safetensors"
    data = path.read_bytes()
    header, body = header_and_body(path)
    path.write_bytes(damage(kind, data, header, body))
    with pytest.raises(QuantkitError) as e:
        quantkit.load(small_dir)
    one_line(e, "model.safetensors", "corrupt safetensors file")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float8_e4m3fn, torch.uint8, torch.float64])
def test_a_weight_stored_in_a_dtype_quantkit_cannot_compute_with_is_one_line(small_dir, dtype):
    path = small_dir / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(tensors, path)
    with pytest.raises(QuantkitError) as e:
        quantkit.load(small_dir)
    one_line(e, "model.safetensors", "model.layers.0.mlp.up_proj.weight is stored as", "F32, F16, BF16")


# -- pickles ------------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(small_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = quantkit.load(small_dir)
    state = dict(model.state_dict())
    state["model.norm.weight"] = RunsCode(marker)
    (small_dir / "model.safetensors").unlink()
    torch.save(state, small_dir / "pytorch_model.bin")
    with pytest.raises(QuantkitError) as e:
        quantkit.load(small_dir)
    one_line(e, "pytorch_model.bin", "objects other than tensors")
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["list", "non-tensor values", "non-string keys"])
def test_a_bin_that_is_not_a_state_dict_is_one_line(small_dir, payload):
    state = dict(quantkit.load(small_dir).state_dict())
    obj = {"list": list(state.values()), "non-tensor values": {k: 1 for k in state},
           "non-string keys": {i: v for i, v in enumerate(state.values())}}[payload]
    (small_dir / "model.safetensors").unlink()
    torch.save(obj, small_dir / "pytorch_model.bin")
    with pytest.raises(QuantkitError) as e:
        quantkit.load(small_dir)
    one_line(e, "pytorch_model.bin", "not a state dict")


@pytest.mark.parametrize("where", ["index key", "index file name", "header key"])
def test_names_with_newlines_stay_on_one_line(sharded_dir, small_dir, where):
    if where == "header key":
        path = small_dir / "model.safetensors"
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["evil\nname"] = torch.zeros(2)
        save_file(tensors, path)
        model_dir = small_dir
    else:
        index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
        if where == "index key":
            index["weight_map"]["evil\nname"] = sorted(index["weight_map"].values())[0]
        else:
            index["weight_map"]["model.norm.weight"] = "evil\nname.safetensors"
        (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        model_dir = sharded_dir
    with pytest.raises(QuantkitError) as e:
        Checkpoint(model_dir)
    one_line(e, "evil\\nname")


def test_a_huge_layer_number_is_one_line_at_once(small_dir):
    path = small_dir / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.99999999999999.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(QuantkitError) as e:
        Checkpoint(small_dir)
    one_line(e, "model.safetensors: no tensors for decoder layer 1 (the files have layers up to 99999999999999)")
