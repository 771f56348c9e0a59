"""`quantkit eval` / `quantkit compare` as library calls: the report, its schema, and the base checks."""

from __future__ import annotations

import copy
import io
import json
import shutil

import jsonschema
import pytest
import sentencepiece as spm

import quantkit
from quantkit.eval import report, text_data
from quantkit.eval.compare import EvalOptions, run_compare, run_eval
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, peaked_model

TEXT = (DEMO_MODEL / "test.txt").read_text(encoding="utf-8")[:1200]  # 10 windows of 32
QUIET = EvalOptions(speed=False, progress=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def validate(result):
    jsonschema.validate(result, report.load_schema())
    return result


def safetensors_bytes(path):
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def other_tokenizer_model() -> bytes:
    """A different sentencepiece model (trained in memory on demo text, in ~0.1 s)."""
    lines = [line for line in (DEMO_MODEL / "train.txt").read_text(encoding="utf-8")[:50_000].splitlines() if line]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=300, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tokenizer_file):
    return text_data(quantkit.load_tokenizer(tokenizer_file), TEXT, seq_len=32)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{name: directory}: the fp16 base and two quantized copies of it."""
    root, base = tmp_path_factory.mktemp("models"), peaked_model().half()
    out = {"base": save_model(base, root / "base", tokenizer_dir=DEMO_MODEL)}
    for name, config in {"int4": Int4Config(group_size=32), "rtn": RTNConfig(bits=3, group_size=32)}.items():
        model = quantkit.quantize(copy.deepcopy(base), config)
        out[name] = quantkit.save_quantized(model, root / name, tokenizer_dir=DEMO_MODEL)
    return out


@pytest.fixture(scope="module")
def compared(dirs, data):
    return run_compare(dirs["base"], [dirs["int4"], dirs["rtn"]], data, options=QUIET)


# --- the compare report ----------------------------------------------------------------------------------


def test_compare_report_validates(compared, data):
    validate(compared)
    assert compared["dataset"] == data.describe()
    assert compared["tp"] is None and compared["command"] is None


def test_base_entry_first_without_fidelity(compared, dirs):
    base = compared["base"]
    assert base["name"] == "base" and base["path"] == str(dirs["base"])
    assert base["fidelity"] is None and base["layer_errors"] == [] and base["tokens_per_s"] is None
    assert base["method"] == "fp16" and base["bits_per_weight"] == 16.0
    assert base["size_bytes"] == safetensors_bytes(dirs["base"])


def test_model_entries(compared, dirs, data):
    int4, rtn = compared["models"]
    assert [int4["name"], rtn["name"]] == ["int4", "rtn"]
    assert (int4["method"], rtn["method"]) == ("int4 g32", "rtn w3 g32")
    # b bits + an fp16 scale and a b-bit (packed) zero per group of 32, + each linear's int64 shape pair,
    # over the 2 * 36864 decoder linear weights: int4 4.649, rtn w3 3.618
    shapes = 14 * 2 * 64 / (2 * 36864)
    assert int4["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32 + shapes, rel=1e-9)
    assert rtn["bits_per_weight"] == pytest.approx(3 + 16 / 32 + 3 / 32 + shapes, rel=1e-9)
    for entry in (int4, rtn):
        assert entry["size_bytes"] == safetensors_bytes(dirs[entry["name"]])
        assert entry["fidelity"]["source"] == "in-memory" and entry["fidelity"]["kl"]["mean"] > 0
        assert entry["perplexity"]["n_tokens"] == data.n_tokens
        assert entry["sensitivity"] is None
    assert int4["fidelity"]["kl"]["mean"] < rtn["fidelity"]["kl"]["mean"]  # 4 bits beat 3


def test_layer_errors_of_quantized_dirs(compared):
    for entry in compared["models"]:
        errors = entry["layer_errors"]
        assert sorted((e["layer"], e["name"]) for e in errors) == \
            sorted((i, f"model.layers.{i}.{n}") for i in range(2) for n in LINEARS)
        assert all(e["kind"] == "weight" and 0 < e["relative_error"] < 1 for e in errors)
        assert {e["method"] for e in errors} == {entry["method"].split()[0]}


def test_base_perplexity_is_the_base_models(compared, dirs, data):
    alone = run_eval(dirs["base"], data, options=QUIET)
    assert compared["base"]["perplexity"]["ppl"] == pytest.approx(alone["models"][0]["perplexity"]["ppl"], rel=1e-9)


def test_compare_needs_a_model(dirs, data):
    with pytest.raises(QuantkitError, match="at least one model"):
        run_compare(dirs["base"], [], data, options=QUIET)


# --- bases that cannot be compared ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v4000_dir(tmp_path_factory):
    """A model with the demo tokenizer.model but a vocabulary of 4000 (as a resized or padded embedding would)."""
    return save_model(peaked_model(vocab_size=4000).half(), tmp_path_factory.mktemp("v4000") / "v4000",
                      tokenizer_dir=DEMO_MODEL)


def test_base_with_another_vocabulary(dirs, data, v4000_dir):
    base = v4000_dir
    with pytest.raises(QuantkitError, match="vocabulary of 4096, the base .* 4000"):
        run_compare(base, [dirs["int4"]], data, options=QUIET)
    with pytest.raises(QuantkitError, match="vocabulary of 4096, the base .* 4000"):
        run_eval(dirs["int4"], data, base=base, options=QUIET)


@pytest.fixture(scope="module")
def other_tokenizer_base(dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("other-tok") / "base"
    shutil.copytree(dirs["base"], path)
    (path / "tokenizer.model").write_bytes(other_tokenizer_model())
    (path / "quantkit_manifest.json").unlink()  # a model with another tokenizer, not a damaged copy of the base
    return path


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_base_with_another_tokenizer(dirs, data, other_tokenizer_base, command):
    with pytest.raises(QuantkitError, match="another tokenizer"):
        if command == "compare":
            run_compare(other_tokenizer_base, [dirs["int4"]], data, options=QUIET)
        else:
            run_eval(dirs["int4"], data, base=other_tokenizer_base, options=QUIET)


def test_compare_tokenizer_message_names_the_base(dirs, data, other_tokenizer_base):
    with pytest.raises(QuantkitError) as e:
        run_compare(other_tokenizer_base, [dirs["int4"]], data, options=QUIET)
    assert f"the base {other_tokenizer_base}" in str(e.value)


# --- saved base logits through run_eval / run_compare -------------------------------------------------------


@pytest.fixture(scope="module")
def saved_logits(dirs, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("logits") / "base.qkl"
    own = run_eval(dirs["base"], data, save_logits=path, options=QUIET)
    return path, own


def test_save_logits_report_is_the_models_own(saved_logits, dirs):
    path, own = saved_logits
    validate(own)
    assert path.is_file() and own["base"] is None and own["models"][0]["fidelity"] is None


def test_saved_logits_give_the_in_memory_kl(saved_logits, dirs, data):
    path, _ = saved_logits
    memory = validate(run_eval(dirs["int4"], data, base=dirs["base"], options=QUIET))
    saved = validate(run_eval(dirs["int4"], data, base_logits=path, options=QUIET))
    m, s = memory["models"][0]["fidelity"], saved["models"][0]["fidelity"]
    assert (m["source"], s["source"]) == ("in-memory", "base-logits")
    assert s["kl"]["mean"] == pytest.approx(m["kl"]["mean"], rel=1e-4)
    assert saved["models"][0]["perplexity"] == memory["models"][0]["perplexity"]
    # the base entry comes from the file's metadata, with the base perplexity of this run
    assert {k: saved["base"][k] for k in ("name", "path", "method", "size_bytes")} == \
        {k: memory["base"][k] for k in ("name", "path", "method", "size_bytes")}
    assert saved["base"]["perplexity"]["ppl"] == pytest.approx(memory["base"]["perplexity"]["ppl"], rel=1e-6)


def test_compare_with_saved_logits(saved_logits, compared, dirs, data):
    path, _ = saved_logits
    result = validate(run_compare(dirs["base"], [dirs["int4"]], data, base_logits=path, options=QUIET))
    assert result["models"][0]["fidelity"]["kl"]["mean"] == \
        pytest.approx(compared["models"][0]["fidelity"]["kl"]["mean"], rel=1e-4)


def test_saved_logits_of_another_seq_len(saved_logits, dirs, tokenizer_file):
    path, _ = saved_logits
    other = text_data(quantkit.load_tokenizer(tokenizer_file), TEXT, seq_len=16)
    with pytest.raises(QuantkitError, match="made from dataset"):
        run_eval(dirs["int4"], other, base_logits=path, options=QUIET)


def test_saved_logits_of_another_vocabulary(saved_logits, v4000_dir, data):
    with pytest.raises(QuantkitError, match="vocabulary of 4096, the evaluated model has 4000"):
        run_eval(v4000_dir, data, base_logits=saved_logits[0], options=QUIET)


def test_compare_with_saved_logits_checks_each_models_vocabulary(saved_logits, dirs, v4000_dir, data):
    with pytest.raises(QuantkitError, match="vocabulary"):
        run_compare(dirs["base"], [v4000_dir], data, base_logits=saved_logits[0], options=QUIET)


def test_base_and_base_logits_together(saved_logits, dirs, data):
    with pytest.raises(QuantkitError, match="not both"):
        run_eval(dirs["int4"], data, base=dirs["base"], base_logits=saved_logits[0], options=QUIET)


# --- optional sections ----------------------------------------------------------------------------------------


def test_eval_report_with_a_tp_section(dirs, data):
    result = validate(run_eval(dirs["int4"], data, base=dirs["base"],
                               options=EvalOptions(tps=[], tp_windows=1, speed=False, progress=False)))
    tp = result["tp"]
    assert tp["model"] == str(dirs["int4"]) and tp["reference"].endswith("1 windows of 32")
    assert [(r["dtype"], r["tp"]) for r in tp["rows"]] == [("fp16", 1), ("fp16", 2), ("bf16", 1), ("bf16", 2)]
    assert [u["tp"] for u in tp["unsupported"]] == [4, 8]  # o_proj's 64 columns / 4 < a group of 32


def test_eval_report_with_speed_sensitivity_and_command(dirs, data):
    options = EvalOptions(progress=False, command="quantkit eval base",
                          sensitivity={"unit": "layer", "config": RTNConfig(bits=3, group_size=32)})
    result = validate(run_eval(dirs["base"], data, options=options))
    entry = result["models"][0]
    assert entry["tokens_per_s"] > 0 and result["command"] == "quantkit eval base"
    assert [r["name"] for r in entry["sensitivity"]["rows"]] == ["layer 0", "layer 1"]


def test_report_round_trips_through_json(compared):
    assert json.loads(report.to_json(compared)) == compared


def test_a_copy_of_the_base_gives_a_valid_report(dirs, tokenizer_file, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(dirs["base"], copy_dir)
    tok = quantkit.load_tokenizer(tokenizer_file)
    # whether x @ x / (|x| |x|) rounds above 1 depends on the values: about one text length in three does
    for n_chars in range(300, 1500, 100):
        data = text_data(tok, (DEMO_MODEL / "test.txt").read_text()[:n_chars], 32)
        result = run_compare(dirs["base"], [copy_dir], data, options=QUIET)
        assert result["models"][0]["fidelity"]["kl"]["max"] == 0
        validate(result)
