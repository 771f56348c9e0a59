"""Every directory quantkit writes from a pretraining_tp > 1 source loads and runs with no flags.

Where the written modules can be sliced, the output keeps the source's pretraining_tp and runs sliced;
where they cannot (bitsandbytes, act-order, groups across a slice), config.json records 1, quantkit's
record keeps the source's value, and one warning says why.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import quantkit
from quantkit.backends import QuantConfig
from quantkit.errors import QuantkitError
from quantkit.eval import perplexity_of, text_data
from quantkit.run.export import ExportOptions
from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, random_model, tiny_config

TEXT = (DEMO_MODEL / "test.txt").read_text(encoding="utf-8")[:600]
G32 = {"group_size": 32}
# (config, format, whether tp=2 slices survive); tiny: o_proj 64 -> 32 input columns, down_proj 128 -> 64
CASES = [
    ({"method": "int4", **G32}, "compressed-tensors", True),
    ({"method": "int4", **G32}, "gptq", True),
    ({"method": "rtn", "bits": 4, **G32}, "compressed-tensors", True),
    ({"method": "rtn", "bits": 3, **G32, "symmetric": True}, "gptq", True),
    ({"method": "gptq", "bits": 4, **G32}, "gptq", True),
    ({"method": "gptq", "bits": 4, **G32}, "compressed-tensors", True),
    ({"method": "gptq", "bits": 4, **G32, "desc_act": True}, "gptq", False),  # act-order groups scatter
    ({"method": "bnb-int8"}, "bnb", False),
    ({"method": "bnb-nf4"}, "bnb", False),
    ({"method": "bnb-fp4"}, "bnb", False),
]
# intermediate 192, groups of 64: down_proj's tp=2 slice of 96 columns is not whole groups
UNALIGNED = [({"method": "int4", "group_size": 64}, "compressed-tensors"),
             ({"method": "int4", "group_size": 64}, "gptq")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_sources")
    return {name: save_model(random_model(tiny_config(pretraining_tp=2, **extra)), root / name,
                             tokenizer_dir=DEMO_MODEL)
            for name, extra in (("tiny", {}), ("wide", {"intermediate_size": 192}))}


@pytest.fixture(scope="module")
def data(tokenizer_file):
    return text_data(quantkit.load_tokenizer(tokenizer_file), TEXT, seq_len=32)


def quantize(src, config: dict, fmt: str, out):
    calibration = torch.randint(1, 4096, (2, 32)) if config["method"] == "gptq" else None
    quantkit.quantize_checkpoint(src, QuantConfig.from_dict(config), out, ExportOptions(format=fmt),
                                 calibration=calibration, progress=False)
    return json.loads((out / "config.json").read_text())


def tp_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "pretraining_tp" in r.getMessage()]


@pytest.mark.parametrize("config, fmt, sliced", CASES + [(c, f, False) for c, f in UNALIGNED],
                         ids=lambda v: v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else None)
def test_quantize_load_eval(sources, data, tmp_path, caplog, config, fmt, sliced):
    src = sources["wide" if (config, fmt) in UNALIGNED else "tiny"]
    written = quantize(src, config, fmt, tmp_path / "out")
    quantize_warnings = tp_warnings(caplog)
    if sliced:
        assert written["pretraining_tp"] == 2 and "source_pretraining_tp" not in written["quantkit"]
        assert not quantize_warnings
    else:
        assert written["pretraining_tp"] == 1 and written["quantkit"]["source_pretraining_tp"] == 2
        assert len(quantize_warnings) == 1 and "records pretraining_tp=1, not the source's 2" in quantize_warnings[0]
    caplog.clear()
    model = quantkit.load(tmp_path / "out")  # no flags, no warning: config.json says what it runs
    assert not tp_warnings(caplog)
    assert model.pretraining_tp == (2 if sliced else 1)
    assert model.model.layers[0].mlp.pretraining_tp == model.pretraining_tp
    if sliced:
        assert model.model.layers[0].mlp.down_proj.__dict__["_tp_parts"]  # really runs through the slices
    result = perplexity_of(model, data, progress=False)
    assert math.isfinite(result.ppl) and result.ppl > 1


@pytest.mark.parametrize("config, fmt", [({"method": "bnb-nf4"}, "bnb"), UNALIGNED[0]])
def test_directories_from_other_tools_fall_back_to_tp_1(sources, data, tmp_path, caplog, config, fmt):
    """A quantized directory whose config.json asks for a tp its modules cannot run (another tool's, an older
    quantkit's) loads at tp=1 with one warning instead of being refused."""
    src = sources["wide" if fmt != "bnb" else "tiny"]
    written = quantize(src, config, fmt, tmp_path / "out")
    written["pretraining_tp"] = 2
    (tmp_path / "out" / "config.json").write_text(json.dumps(written))
    (tmp_path / "out" / MANIFEST_FILE).unlink()  # another tool's directory
    caplog.clear()
    model = quantkit.load(tmp_path / "out")
    (warning,) = tp_warnings(caplog)
    assert "sets pretraining_tp=2, which its quantized modules cannot run" in warning and "config.json" in warning
    assert model.pretraining_tp == 1 and model.model.layers[1].self_attn.pretraining_tp == 1
    assert math.isfinite(perplexity_of(model, data, progress=False).ppl)


@pytest.mark.parametrize("quantized", [False, True])
def test_tp_that_does_not_divide_the_shapes_is_an_error_naming_config_json(sources, tmp_path, quantized):
    """Dense checkpoints honour pretraining_tp as before. One that does not divide the shapes is a wrong
    config.json, dense or quantized (quantkit never writes one: its source would be refused the same way)."""
    assert quantkit.load(sources["tiny"]).pretraining_tp == 2
    out = tmp_path / "out"
    if quantized:
        written = quantize(sources["tiny"], {"method": "int4", **G32}, "gptq", out)
    else:
        save_model(random_model(tiny_config()), out, tokenizer_dir=DEMO_MODEL)
        written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**written, "pretraining_tp": 3}))  # hidden 64 % 3 != 0
    (out / MANIFEST_FILE).unlink()  # else the manifest refuses the edited file first
    with pytest.raises(QuantkitError, match=r"config\.json: pretraining_tp is 3, which does not divide .*set it to 1"):
        quantkit.load(out)


def test_in_memory_re_export_of_a_fallback_model_records_tp_1(sources, tmp_path):
    quantize(sources["tiny"], {"method": "bnb-nf4"}, "bnb", tmp_path / "a")
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**written, "pretraining_tp": 2}))
    (tmp_path / "a" / MANIFEST_FILE).unlink()  # an older quantkit's directory
    quantkit.save_quantized(quantkit.load(tmp_path / "a"), tmp_path / "b")
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert again["pretraining_tp"] == 1 and again["quantkit"]["source_pretraining_tp"] == 2
    assert quantkit.load(tmp_path / "b").pretraining_tp == 1
