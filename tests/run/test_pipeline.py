"""Streaming quantization and export: round trips for every valid method x format x options, bad input."""

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file

import quantkit
from quantkit.backends import QuantConfig, Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.export import ExportOptions, save_quantized
from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import save_model
from quantkit.run.pipeline import quantize_checkpoint
from tests.conftest import KERNEL_SHAPES, random_model, tiny_config
from tests.helpers import file_tensors

SHAPES = KERNEL_SHAPES  # the shapes of kernel_model_dir
AFFINE_CASES = ([Int4Config(g) for g in (32, 64, 128)]
                + [RTNConfig(b, g, s) for b in (2, 3, 4, 8) for g in (32, 128, -1) for s in (False, True)])


def in_memory(kernel_model_dir, config):
    return quantize(quantkit.load(kernel_model_dir), config)


IDS = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("config", AFFINE_CASES, ids=lambda c: c.describe())
def test_quantize_save_load_same_logits(kernel_model_dir, tmp_path, config, fmt):
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", ExportOptions(format=fmt), progress=False)
    reloaded = quantkit.load(tmp_path / "q")  # no flags: everything is in config.json
    expected = in_memory(kernel_model_dir, config)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), expected(IDS))
    assert summary.format == fmt and summary.bytes_after < summary.bytes_before
    bits = config.bits
    assert bits < summary.bits_per_weight < bits + 1.5  # scales and zeros cost a little more


@pytest.mark.parametrize("method, fmt", [("int4", "compressed-tensors"), ("rtn", "gptq"), ("bnb-nf4", "bnb")])
def test_one_bits_per_weight_in_summary_plan_and_report(kernel_model_dir, tmp_path, method, fmt):
    """Quantize's summary, the planner and the eval report give the same figure: the decoder linears' stored
    bits per weight, the linears kept in full precision (--ignore) included."""
    from quantkit.eval.evaluate import model_info
    from quantkit.plan.planner import make_plan

    config = QuantConfig.from_dict({"method": method, **({"group_size": 32} if method != "bnb-nf4" else {})})
    ignore = (r"mlp\.down_proj$",)
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", ExportOptions(format=fmt), ignore=ignore,
                                  progress=False)
    reported = model_info(tmp_path / "q")["bits_per_weight"]
    planned = make_plan(kernel_model_dir, config, ExportOptions(format=fmt), ignore=ignore, measure=False).bits_per_weight
    assert summary.bits_per_weight == pytest.approx(reported, rel=1e-12)
    assert planned == pytest.approx(reported, rel=1e-3)
    bits = config.bits if method != "bnb-nf4" else 4
    assert bits + 2 < reported < 16  # down_proj, 22% of the linears' weights here, in fp16


BNB_CASES = ["bnb-int8", "bnb-nf4", "bnb-fp4"]


@pytest.mark.parametrize("options", [{}, {"double_quant": False, "blocksize": 128}], ids=["default", "no-dq-128"])
@pytest.mark.parametrize("method", BNB_CASES)
def test_bnb_quantize_save_load_same_logits(kernel_model_dir, tmp_path, method, options):
    if method == "bnb-int8":
        options = {"threshold": 0.0} if options else {}
    config = QuantConfig.from_dict({"method": method, **options})
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", progress=False)
    assert summary.format == "bnb"
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "q")(IDS), in_memory(kernel_model_dir, config)(IDS))


def test_streamed_and_in_memory_exports_are_identical(kernel_model_dir, tmp_path):
    config = Recipe(Int4Config(32), rules=[(r"down_proj$", RTNConfig(8, -1))], ignore=[r"layers\.1\.self_attn"])
    quantize_checkpoint(kernel_model_dir, config, tmp_path / "streamed", progress=False)
    save_quantized(in_memory(kernel_model_dir, config), tmp_path / "memory")

    a, b = file_tensors(tmp_path / "streamed"), file_tensors(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["quantkit"]["recipe"] == config.to_dict()
    from safetensors import safe_open

    with safe_open(tmp_path / "streamed" / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["quantkit_recipe"]) == config.to_dict()
    assert (tmp_path / "streamed" / "tokenizer.model").exists()
    reloaded = quantkit.load(tmp_path / "streamed")
    assert type(reloaded.model.layers[1].self_attn.q_proj) is torch.nn.Linear  # ignored stays full precision
    assert reloaded.model.layers[0].mlp.down_proj.bits == 8


def test_sharded_output(kernel_model_dir, tmp_path):
    quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", ExportOptions(max_shard_size="200KB"), progress=False)
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "q")(IDS), in_memory(kernel_model_dir, Int4Config(32))(IDS))


def test_one_layer_in_memory_at_a_time(kernel_model_dir, tmp_path, monkeypatch):
    from quantkit.model.checkpoint import Checkpoint

    alive, most = [], [0]
    original = Checkpoint.layer_module

    def tracked(self, index, dtype=None):
        gc.collect()
        live = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(live))
        layer = original(self, index, dtype)
        alive.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(Checkpoint, "layer_module", tracked)
    quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", progress=False)
    assert len(alive) == 2 and most[0] == 0  # when a layer is read, the previous one is gone


def test_generate_and_perplexity_on_a_quantized_directory(kernel_model_dir, tmp_path):
    from quantkit.eval import perplexity

    quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", progress=False)
    model, tok = quantkit.load(tmp_path / "q"), quantkit.load_tokenizer(tmp_path / "q")
    out = quantkit.generate(model, [tok.encode("Hello")], quantkit.SamplingConfig(max_new_tokens=4))
    assert len(out[0]) == 4
    assert perplexity(model, tok, "some text to score " * 20, seq_len=32, progress=False).ppl > 1


# -- bad input ------------------------------------------------------------------------------------

def test_output_exists_is_refused_and_untouched(kernel_model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")
    with pytest.raises(QuantkitError, match="already exists.*--force"):
        quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", progress=False)
    assert (tmp_path / "q" / "mine.txt").read_text() == "keep"
    quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", ExportOptions(overwrite=True), progress=False)
    assert not (tmp_path / "q" / "mine.txt").exists()


def test_already_quantized_source(kernel_model_dir, tmp_path):
    quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", progress=False)
    with pytest.raises(QuantkitError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", Int4Config(32), tmp_path / "qq", progress=False)


def test_nan_weight_names_the_tensor_and_writes_nothing(kernel_model_dir, tmp_path):

    tensors = file_tensors(kernel_model_dir)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, kernel_model_dir / "model.safetensors")
    (kernel_model_dir / MANIFEST_FILE).unlink()  # a source another tool wrote
    with pytest.raises(QuantkitError, match="model.layers.1.mlp.up_proj: contains NaN or Inf"):
        quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_group_size_that_does_not_divide(kernel_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="group size 96 does not divide in_features=128"):
        quantize_checkpoint(kernel_model_dir, RTNConfig(4, 96), tmp_path / "q", progress=False)


def test_format_that_cannot_hold_the_method(kernel_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match=r"--format bnb: cannot hold method int4: it holds bitsandbytes modules .*: use --format compressed-tensors, gptq, gguf$"):
        quantize_checkpoint(kernel_model_dir, Int4Config(32), tmp_path / "q", ExportOptions(format="bnb"), progress=False)


def test_unknown_method_lists_known_ones():
    with pytest.raises(QuantkitError, match="unknown method 'omniquant': known methods are int4, rtn"):
        QuantConfig.from_dict({"method": "omniquant"})


@pytest.mark.parametrize("config", [Int4Config(group_size=32), RTNConfig(bits=3, group_size=32)], ids=lambda c: c.method)
def test_per_linear_weight_errors_are_written_and_exact(kernel_model_dir, tmp_path, config):
    """Every quantized linear's ||W - Q|| / ||W|| goes to quantkit_errors.json, the same streamed or in memory."""
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", progress=False)
    written = json.loads((tmp_path / "q" / "quantkit_errors.json").read_text())
    assert written == summary.errors and len(written) == 14 and {e["kind"] for e in written} == {"weight"}
    dense = quantkit.load(kernel_model_dir, dtype="fp32")
    quantized = quantkit.load(tmp_path / "q", dtype="fp32")
    for e in written:
        w, q = dense.get_submodule(e["name"]).weight, quantized.get_submodule(e["name"]).dequantize().float()
        assert e["relative_error"] == pytest.approx(((q - w).norm() / w.norm()).item(), rel=1e-4)
    save_quantized(quantize(quantkit.load(kernel_model_dir, dtype="fp32"), config), tmp_path / "m")
    in_memory = json.loads((tmp_path / "m" / "quantkit_errors.json").read_text())
    assert [e["name"] for e in in_memory] == [e["name"] for e in written]
    # the pipeline quantizes in the checkpoint dtype, this in fp32: the qparams round a little differently
    assert [e["relative_error"] for e in in_memory] == pytest.approx([e["relative_error"] for e in written], rel=1e-3)


# -- the quantized-module record: a loaded model re-exports and re-evaluates like a fresh one -------------


@pytest.mark.parametrize("config, first, second", [
    (Int4Config(32), "compressed-tensors", "gptq"),
    (RTNConfig(3, 32, True), "gptq", "compressed-tensors"),
], ids=["int4", "rtn-w3-sym"])
def test_loaded_model_carries_the_record_and_re_exports(kernel_model_dir, tmp_path, config, first, second):
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "a", ExportOptions(format=first), progress=False)
    loaded = quantkit.load(tmp_path / "a")
    record = loaded.model.layers[1].self_attn.o_proj.quant_record
    written = {e["name"]: e for e in summary.errors}["model.layers.1.self_attn.o_proj"]
    assert record.config == config and (record.error, record.error_kind) == (written["relative_error"], "weight")
    save_quantized(loaded, tmp_path / "b", format=second)
    again = quantkit.load(tmp_path / "b")
    assert torch.equal(again(IDS), loaded(IDS))
    assert json.loads((tmp_path / "b" / "quantkit_errors.json").read_text()) == summary.errors
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantkit"]["recipe"] == summary.recipe


def test_a_file_another_tool_wrote_loads_with_a_config_from_its_metadata(kernel_model_dir, tmp_path):
    """No quantkit recipe in config.json: the format's metadata stands for the config (GPTQ's options included)."""
    quantize_checkpoint(kernel_model_dir, RTNConfig(4, 32, True), tmp_path / "a", ExportOptions(format="gptq"), progress=False)
    config_path = tmp_path / "a" / "config.json"
    config_json = json.loads(config_path.read_text())
    del config_json["quantkit"]
    config_path.write_text(json.dumps(config_json))
    (tmp_path / "a" / "quantkit_errors.json").unlink()
    (tmp_path / "a" / MANIFEST_FILE).unlink()
    record = quantkit.load(tmp_path / "a").model.layers[0].mlp.up_proj.quant_record
    assert (record.config.method, record.config.bits, record.config.group_size, record.config.symmetric) == \
        ("gptq", 4, 32, True)
    assert record.error is None


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_output_over_the_source_is_refused_even_with_force(kernel_model_dir, where):
    before = sorted(p.name for p in kernel_model_dir.iterdir())
    out = kernel_model_dir if where == "itself" else kernel_model_dir.parent
    with pytest.raises(QuantkitError, match="is \\(or holds\\) the source .*which writing there would destroy"):
        quantize_checkpoint(kernel_model_dir, Int4Config(32), out, ExportOptions(overwrite=True), progress=False)
    assert sorted(p.name for p in kernel_model_dir.iterdir()) == before


def test_a_recipe_naming_a_method_not_installed_falls_back_to_the_format(kernel_model_dir, tmp_path):
    """A plugin's model loads without the plugin: its recipe cannot be read, the format's metadata stands in."""
    quantize_checkpoint(kernel_model_dir, RTNConfig(4, 32, True), tmp_path / "a", ExportOptions(format="gptq"), progress=False)
    config_path = tmp_path / "a" / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["quantkit"]["recipe"]["default"]["method"] = "not-installed"
    config_path.write_text(json.dumps(config_json))
    (tmp_path / "a" / MANIFEST_FILE).unlink()
    record = quantkit.load(tmp_path / "a").model.layers[0].mlp.up_proj.quant_record
    assert (record.config.method, record.config.bits, record.config.symmetric) == ("gptq", 4, True)


# -- calibration in its own dtype: the export does not change; dead inputs are counted and reported -------------

CALIB = torch.randint(3, 4096, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_gptq_export_keeps_the_export_dtype_whatever_calibration_computes_in(kernel_model_dir, tmp_path, fmt):
    """Calibration runs in fp32 on CPU (auto) or as asked: the files hold exactly the tensors (names, dtypes,
    shapes) an uncalibrated export of the same scheme holds, and everything not quantized is the source's, bit
    for bit."""
    from quantkit.backends.gptq import GPTQConfig
    from quantkit.run.calibrator import CalibrationOptions

    quantize_checkpoint(kernel_model_dir, RTNConfig(4, 32), tmp_path / "rtn", ExportOptions(format=fmt), progress=False)
    layout = {k: (t.dtype, t.shape) for k, t in file_tensors(tmp_path / "rtn").items()}
    source = file_tensors(kernel_model_dir)
    outputs = {}
    for calib_dtype in (None, "fp16", "fp32"):
        out = tmp_path / f"gptq-{calib_dtype}"
        quantize_checkpoint(kernel_model_dir, GPTQConfig(4, 32), out, ExportOptions(format=fmt), progress=False,
                            calibration=CalibrationOptions(CALIB, dtype=calib_dtype))
        outputs[calib_dtype] = tensors = file_tensors(out)
        assert {k: (t.dtype, t.shape) for k, t in tensors.items()} == layout
        kept = [k for k in tensors if k in source]  # norms, embedding, lm_head: not quantized
        assert len(kept) == 2 * 2 + 3 and all(torch.equal(tensors[k], source[k]) for k in kept)
    assert any(not torch.equal(outputs[None][k], outputs["fp16"][k]) for k in outputs[None])  # it did compute in fp32


def dead_input_model_dir(tmp_path, tokenizer_file, dead: int):
    """layer 0's up_proj has `dead` zero rows: those input channels of its down_proj are 0 on every token."""
    model = random_model(tiny_config(**SHAPES))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:dead] = 0
    save_model(model, tmp_path / "dead", tokenizer_dir=tokenizer_file.parent, dtype="fp16")
    return tmp_path / "dead"


@pytest.mark.parametrize("dead", [0, 12])
def test_dead_calibration_inputs_are_counted_warned_and_written(tmp_path, tokenizer_file, caplog, dead):
    import jsonschema
    from quantkit.backends.gptq import GPTQConfig
    from quantkit.eval.report import load_schema

    src = dead_input_model_dir(tmp_path, tokenizer_file, dead)
    summary = quantize_checkpoint(src, GPTQConfig(4, 32), tmp_path / "q", progress=False, calibration=CALIB)
    counts = {e["name"]: e["dead_inputs"] for e in summary.errors}
    assert counts == {name: dead if name == "model.layers.0.mlp.down_proj" else 0 for name in counts}
    written = json.loads((tmp_path / "q" / "quantkit_errors.json").read_text())
    assert written == summary.errors
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "input channels" in r.getMessage()]
    assert warned == ([f"model.layers.0.mlp.down_proj: {dead} of 256 input channels were zero on every calibration "
                       f"token; GPTQ set their weight columns to 0 (the reference does too): calibrate on text that "
                       f"uses them"] if dead else [])
    down = quantkit.load(tmp_path / "q", dtype="fp32").model.layers[0].mlp.down_proj
    assert (down.dequantize()[:, :dead].abs() <= down.weight_scale[:, :1]).all()  # quantized from 0: within a step
    # the eval report's layer_errors rows are these rows: the schema takes the new field (and rows without it)
    schema = load_schema()
    rows = {"type": "array", "items": {"$ref": "#/$defs/layer_error"}, "$defs": schema["$defs"]}
    jsonschema.validate([dict(e, layer=0) for e in written], rows)
    jsonschema.validate([{k: v for k, v in dict(e, layer=0).items() if k != "dead_inputs"} for e in written], rows)


def test_dead_inputs_in_the_cli_summary_and_rtn_rows_have_none(tmp_path, tokenizer_file):
    from click.testing import CliRunner

    from quantkit.cli import main

    src = dead_input_model_dir(tmp_path, tokenizer_file, 12)
    torch.save(CALIB, tmp_path / "tokens.pt")
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q"), "--method", "gptq",
                                       "--group-size", "32", "--calib", str(tmp_path / "tokens.pt"),
                                       "--n-samples", "8", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    assert ("dead inputs: 1 linears had input channels that were zero on every calibration token (12 in all; GPTQ "
            "set their weight columns to 0): calibrate on text that uses them") in result.output
    summary = quantize_checkpoint(src, RTNConfig(4, 32), tmp_path / "rtn", progress=False)
    assert {e["dead_inputs"] for e in summary.errors} == {None}  # not calibrated: not measured


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_the_summary_says_where_the_seconds_went(kernel_model_dir, tmp_path, method):
    from quantkit.run.calibrator import CalibrationOptions

    config = QuantConfig.from_dict({"method": method, "bits": 4, "group_size": 32})
    tokens = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", progress=False,
                                  calibration=CalibrationOptions(tokens) if method == "gptq" else None)
    expected = {"read", "quantize", "write", "assemble"} | ({"forward", "statistics", "transform"}
                                                            if method == "gptq" else set())
    assert set(summary.phases) == expected and all(s >= 0 for s in summary.phases.values())
    assert sum(summary.phases.values()) <= summary.seconds
    layer_seconds = sum(s for p, s in summary.phases.items() if p != "assemble")
    assert summary.seconds_per_layer == pytest.approx(layer_seconds / 2, abs=2e-3)  # 2 layers
    assert json.loads(json.dumps(summary.to_dict()))["phases"] == summary.phases
