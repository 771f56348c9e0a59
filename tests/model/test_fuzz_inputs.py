"""Seeded fuzzing of what a user's model directory may hold: config.json values and safetensors bytes.

Every case either loads (Checkpoint and quantkit.load both work) or raises one QuantkitError whose
message is one line naming the file at fault; any other exception, a multi-line message or one that
names no file fails the test. The cases are fixed (hypothesis derandomized, random.Random(seed) for
the bytes), so every run checks the same ones. Counts of outcomes by kind are written to
fuzz_counts.json in the test's tmp directory and printed (see them with -s).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.errors import QuantkitError
from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import Checkpoint, save_model
from tests.conftest import random_model, tiny_config

pytestmark = pytest.mark.slow  # 4,500 mutated inputs: `make test-fast` leaves it out

CONFIG_CASES = 1500
SAFETENSORS_CASES = 2500
INDEX_CASES = 500

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "pretraining_tp", "attention_bias", "mlp_bias", "bos_token_id",
               "eos_token_id", "pad_token_id", "dtype", "torch_dtype", "rope_scaling", "rope_parameters",
               "rope_scaling.factor", "rope_scaling.type", "rope_parameters.rope_type", "rope_parameters.factor",
               "rope_parameters.rope_theta", "model_type"]
DELETE = object()
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
PLAUSIBLE = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, -1, -64, 64.0, 0.5, 1e-6, 1e300, "64", True,
                             False, None, [], {}, "float16", "bfloat16", "float64", "int8", "auto", "linear",
                             "dynamic", "yarn", "default", {"type": "linear", "factor": None},
                             {"rope_type": "dynamic", "factor": 2.0}, [2, 3], 2**63, float("nan")])
MUTATIONS = st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), PLAUSIBLE | JUNK | st.just(DELETE)),
                     min_size=1, max_size=3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny bf16 model (hidden 64, 1 layer, vocab 128) saved once for the module."""
    model = random_model(tiny_config(vocab_size=128, num_hidden_layers=1))
    base = save_model(model, tmp_path_factory.mktemp("fuzz") / "base", dtype="bf16")
    (base / MANIFEST_FILE).unlink()  # as another tool writes it: the manifest would refuse every mutation first
    return base


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    """Outcome kind -> number of cases, over the whole module; written out and printed at the end."""
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    yield found
    out = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    out.write_text(json.dumps({k: dict(v.most_common()) for k, v in found.items()}, indent=1))
    for target, counter in found.items():
        print(f"\nfuzz {target}: {sum(counter.values())} cases -> {out}")
        for kind, n in counter.most_common():
            print(f"  {n:5d}  {kind}")


def outcome(model_dir: Path, files: tuple[str, ...]) -> str:
    """'loaded', or the kind of refusal; anything but a one-line QuantkitError naming a file fails."""
    try:
        Checkpoint(model_dir)
        quantkit.load(model_dir)
    except QuantkitError as e:
        message = str(e)
        assert "\n" not in message, message
        assert any(name in message for name in files), message
        return refusal_kind(message, model_dir)
    return "loaded"


def refusal_kind(message: str, model_dir: Path) -> str:
    """'config.json: hidden_size is N' -> a short label of what was refused, numbers and paths folded."""
    text = message.replace(str(model_dir) + "/", "").replace(str(model_dir), "DIR")
    file, _, rest = text.partition(": ")
    words = re.sub(r"\d+", "N", rest).split()
    # the library's exception behind a corrupt file, and what it says about the header
    cause = re.search(r"\((\w+(?:Error|Exception))(?:: (?:Error while deserializing header: )?([^):]{0,40}))?", rest)
    detail = f" ({': '.join(g for g in cause.groups() if g)})" if cause else ""
    return f"{file}: {' '.join(words[:4])}{detail}"


def set_path(d: dict, key: str, value):
    head, _, tail = key.partition(".")
    if not tail:
        if value is DELETE:
            d.pop(head, None)
        else:
            d[head] = value
        return
    if not isinstance(d.get(head), dict):
        d[head] = {}
    set_path(d[head], tail, value)


@settings(max_examples=CONFIG_CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(mutations=MUTATIONS)
def test_fuzzed_config_json_loads_or_is_one_line(base_dir, tmp_path, counts, mutations):
    work = tmp_path / "config-case"
    if not work.exists():
        shutil.copytree(base_dir, work)
    config = json.loads((base_dir / "config.json").read_text())
    for key, value in mutations:
        set_path(config, key, value if value is DELETE else copy.deepcopy(value))
    (work / "config.json").write_text(json.dumps(config))
    counts["config.json"][outcome(work, ("config.json",))] += 1


# -- safetensors bytes --------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def junk_value(rng: random.Random):
    return rng.choice([None, -1, 0, 1, 2**60, -2**63, 2**64 + 5, 1.5, "x", "", [], {}, [1, 2, 3], [-1, 64],
                       [0, 0], [2**40, 2**41], True, "F16", "BF16", "F32", "I64", "F8_E4M3", "U8", "BOOL", "Q4",
                       {"a": 1}, [[1]], [64, -64], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def mutate_header(rng: random.Random, header: dict, body: bytes) -> bytes:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    what = rng.randrange(11)
    if what == 9:  # another dtype with the same byte count, which safetensors accepts (the file is bf16)
        entry["dtype"], entry["shape"] = rng.choice([("F16", entry["shape"]), ("I16", entry["shape"]),
                                                     ("U16", entry["shape"]), ("U8", entry["shape"] + [2]),
                                                     ("F8_E4M3", entry["shape"] + [2]), ("BOOL", entry["shape"] + [2]),
                                                     ("F32", entry["shape"][:-1] + [entry["shape"][-1] // 2]),
                                                     ("I64", entry["shape"][:-1] + [entry["shape"][-1] // 4])])
    elif what == 10:  # the same number of elements in another shape
        entry["shape"] = rng.choice([entry["shape"][::-1], [1] + entry["shape"], [math.prod(entry["shape"])]])
    elif what == 0:
        entry["dtype"] = junk_value(rng)
    elif what == 1:
        entry["shape"] = junk_value(rng)
    elif what == 2:
        entry["data_offsets"] = junk_value(rng)
    elif what == 3:  # overlap with, or swap with, another tensor's bytes
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"]) if rng.random() < 0.5 else \
            [other["data_offsets"][0], entry["data_offsets"][1]]
    elif what == 4:
        del entry[rng.choice(list(entry))]
    elif what == 5:
        header["__metadata__"] = junk_value(rng)
    elif what == 6:
        header = rng.choice([[], "text", 5, None, [header]])
    elif what == 7:  # a tensor's name changed, or a new junk tensor
        header[rng.choice(["", "model.layers.7.mlp.up_proj.weight", "x" * 300, name + ".extra", "a\nb"])] = \
            entry if rng.random() < 0.5 else junk_value(rng)
    else:  # shapes shifted by one, or offsets off by one
        key = rng.choice(["shape", "data_offsets"])
        values = list(entry[key])
        if values:
            i = rng.randrange(len(values))
            values[i] += rng.choice([-1, 1, -values[i] - 1])
        entry[key] = values
    return join(header, body, pad=rng.random() < 0.8)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    what = rng.randrange(12)  # half of the cases edit the JSON header and keep the file well-formed otherwise
    if what == 0:  # flip bytes in the header
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if what == 1:  # truncate
        return data[:rng.randrange(len(data))]
    if what == 2:  # declared header length
        n = rng.choice([0, 1, 7, 2**60, 2**64 - 1, header_end - 8 + rng.randint(-16, 16), len(data), len(data) + 1])
        return struct.pack("<Q", n) + data[8:]
    if what == 3:  # random bytes
        return rng.randbytes(rng.choice([0, 4, 8, 64, 4096]))
    if what == 4:  # extra bytes at the end
        return data + rng.randbytes(rng.randint(1, 64))
    if what == 5:  # header not JSON
        return struct.pack("<Q", 16) + rng.randbytes(16) + body
    return mutate_header(rng, copy.deepcopy(header), body)


def test_fuzzed_safetensors_loads_or_is_one_line(base_dir, tmp_path, counts):
    original = (base_dir / "model.safetensors").read_bytes()
    work = tmp_path / "st-case"
    shutil.copytree(base_dir, work)
    for seed in range(SAFETENSORS_CASES):
        (work / "model.safetensors").write_bytes(mutate_bytes(random.Random(seed), original))
        counts["model.safetensors"][outcome(work, ("model.safetensors",))] += 1


# -- sharded: the index ------------------------------------------------------------------------

def mutate_index(rng: random.Random, index: dict) -> object:
    weight_map = index["weight_map"]
    name = rng.choice(list(weight_map))
    what = rng.randrange(6)
    if what == 0:
        weight_map[name] = rng.choice(["../base/model.safetensors", "/etc/passwd", "sub/../../x", "", "nope",
                                       "new\nline.safetensors",
                                       "config.json", ".", "model.safetensors.index.json", 5, None, ["a"],
                                       "model-00001-of-00002.safetensors"])
    elif what == 1:
        del weight_map[name]
    elif what == 2:
        index["weight_map"] = junk_value(rng)
    elif what == 3:
        weight_map[rng.choice(["lm_head.bias", "", "model.layers.9.x", name + "x", "a\nb"])] = rng.choice(
            list(set(weight_map.values())))
    elif what == 4:
        return junk_value(rng)
    else:
        del index["weight_map"]
    return index


def test_fuzzed_shard_index_loads_or_is_one_line(tmp_path, counts):
    base = save_model(random_model(tiny_config(vocab_size=128, num_hidden_layers=1)), tmp_path / "base",
                      max_shard_size="40KB", dtype="bf16")
    (base / MANIFEST_FILE).unlink()
    original = json.loads((base / "model.safetensors.index.json").read_text())
    work = tmp_path / "index-case"
    shutil.copytree(base, work)
    for seed in range(INDEX_CASES):
        mutated = mutate_index(random.Random(seed), copy.deepcopy(original))
        (work / "model.safetensors.index.json").write_text(json.dumps(mutated))
        counts["model.safetensors.index.json"][outcome(work, (".safetensors", ".json", "config.json"))] += 1
