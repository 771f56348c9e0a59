"""`quantkit quantize ... --format gguf -o OUT.gguf` (quantkit/formats/gguf.py's GGUFFormat through the streamed
pipeline and save_quantized): one file that loads back with the same quantized linears, and every input GGUF cannot
take refused before any work, in one line, with nothing written."""

import json
import shutil

import gguf
import pytest
import torch

import quantkit
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.export import save_quantized
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import assert_one_line_error, run

RTN_W4 = ("--method", "rtn", "--bits", 4, "--group-size", 32, "--sym")


def logits(model, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens).float()


@pytest.mark.parametrize("flags,kind", [
    (RTN_W4, "Q4_0"),
    (("--method", "rtn", "--bits", 8, "--group-size", 32, "--sym"), "Q8_0"),
    (("--method", "gptq", "--bits", 4, "--group-size", 32, "--sym", "--n-samples", 4, "--seq-len", 32), "Q4_0"),
])
def test_quantize_to_gguf_loads_with_the_linears_of_the_directory_export(kernel_model_dir, tmp_path, tokens, flags,
                                                                        kind):
    """The streamed GGUF and a compressed-tensors directory of the same run hold the same integers and scales: the
    same logits, bit for bit (the fp16 model's scales are fp16 already, the one rounding GGUF's d could add)."""
    calib = ("--calib", tokens) if "gptq" in flags else ()
    out = tmp_path / "m.gguf"
    result = run("quantize", kernel_model_dir, *flags, *calib, "--format", "gguf", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (gguf" in result.output and "4.50 bits per weight" in result.output or kind == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.pt", "m.gguf", "src"])  # no work dir left
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} == {kind, "F32"}
    result = run("quantize", kernel_model_dir, *flags, *calib, "-o", tmp_path / "ct")
    assert result.exit_code == 0, result.output
    assert torch.equal(logits(quantkit.load(out)), logits(quantkit.load(tmp_path / "ct")))
    assert run("verify", out).exit_code == 0


def test_an_asymmetric_int4_run_is_q4_1(kernel_model_dir, tmp_path):
    result = run("quantize", kernel_model_dir, "--method", "int4", "--group-size", 32, "--format", "gguf",
                 "-o", tmp_path / "m.gguf")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} == {"Q4_1", "F32"}


def test_save_quantized_writes_the_same_file_as_write_gguf(kernel_model_dir, tmp_path):
    """The in-memory API: quantkit.save_quantized(model, "X.gguf", format="gguf") and write_gguf write the same
    metadata and the same tensors, byte for byte (in another order: the export writes the quantized linears first)."""
    from quantkit.formats.gguf import write_gguf
    model = quantkit.quantize(quantkit.load(kernel_model_dir), RTNConfig(bits=4, group_size=32, symmetric=True))
    save_quantized(model, tmp_path / "a.gguf", format="gguf", tokenizer_dir=kernel_model_dir)
    write_gguf(model, tmp_path / "b.gguf", kernel_model_dir, recipe=model.quant_recipe)
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    assert {k: [bytes(p) for p in f.parts] for k, f in a.fields.items() if not k.startswith("GGUF.")} == \
        {k: [bytes(p) for p in f.parts] for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert {t.name: (t.tensor_type, bytes(t.data)) for t in a.tensors} == \
        {t.name: (t.tensor_type, bytes(t.data)) for t in b.tensors}


def test_force_replaces_a_gguf_and_without_it_the_file_is_kept(kernel_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert_one_line_error(run("quantize", kernel_model_dir, *RTN_W4, "--format", "gguf", "-o", out), "already exists")
    assert out.read_bytes() == b"old"
    assert run("quantize", kernel_model_dir, *RTN_W4, "--format", "gguf", "-o", out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def refusals(tmp_path, src):
    """(flags, output, needle): each refused before any tensor is read."""
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(src, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    not_llama = tmp_path / "not-llama"
    shutil.copytree(src, not_llama)
    config = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    (not_llama / "quantkit_manifest.json").unlink()  # a checkpoint as the hub has it
    (tmp_path / "a-dir").mkdir()
    gguf_out = tmp_path / "m.gguf"
    return [
        (src, ("--method", "rtn", "--bits", 4, "--group-size", 128, "--sym"), gguf_out, "--group-size 32"),
        (src, ("--method", "rtn", "--bits", 3, "--group-size", 32, "--sym"), gguf_out, "--bits 4 --group-size 32"),
        (src, ("--method", "rtn", "--bits", 8, "--group-size", 32, "--asym"), gguf_out, "Q8_0"),
        (src, ("--method", "gptq", "--group-size", 32, "--sym", "--act-order", "--calib", tmp_path / "unread.txt"),
         gguf_out, "without --act-order"),
        (src, ("--method", "bnb-nf4",), gguf_out, "no integer-affine scheme"),
        (src, RTN_W4, tmp_path / "a-dir", "is a directory: GGUF is one file"),
        (src, RTN_W4, tmp_path / "m.bin", "ends in .gguf"),
        (no_tokenizer, RTN_W4, gguf_out, "no tokenizer.model"),
        (not_llama, RTN_W4, gguf_out, "not 'llama': quantkit reads Llama 2 checkpoints only"),
    ]


@pytest.mark.parametrize("case", range(9))
@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_what_gguf_cannot_hold_is_refused_before_any_work(kernel_model_dir, tmp_path, case, command):
    src, flags, out, needle = refusals(tmp_path, kernel_model_dir)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(command, src, *flags, "--format", "gguf", "-o", out)
    assert_one_line_error(result, needle)
    assert "--format gguf" in result.output or "gguf" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no work directory, no temporary


def test_rope_scaling_llama_cpp_does_not_apply_is_refused(tmp_path):
    model = quantkit.quantize(random_model(tiny_config(rope_type="dynamic", rope_factor=2.0)).half(),
                              RTNConfig(bits=4, group_size=32, symmetric=True))
    with pytest.raises(QuantkitError, match="rope_type 'dynamic'"):
        save_quantized(model, tmp_path / "m.gguf", format="gguf", tokenizer_dir=DEMO_MODEL)
    assert list(tmp_path.iterdir()) == []
