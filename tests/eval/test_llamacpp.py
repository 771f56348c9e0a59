"""llama.cpp runs quantkit's GGUF files as quantkit computes them: `quantkit check OUT.gguf --base BASE` runs the
file in llama-cpp-python (eval/runtime_worker.py, a subprocess) and compares its logits and its tokenization with
quantkit's own model of the same file.

llama-cpp-python is built once from source by `.ci/llamacpp-wheel.sh` (about 4 minutes) and installed by `.ci/run`:
without it these tests skip here and fail in CI.
"""

import importlib.util
import json
import os

import pytest

import quantkit
from quantkit.eval.check import RUNTIME_PACKAGE, tokenizer_problem
from quantkit.formats.gguf import write_gguf
from tests.conftest import DEMO_MODEL
from tests.helpers import run

WINDOWS = ("--dataset", DEMO_MODEL / "test.txt", "--seq-len", 128, "--windows", 2)
CALIB = ("--calib", DEMO_MODEL / "train.txt", "--n-samples", 8, "--seq-len", 64)
SCHEMES = {  # name -> (quantize flags, the ggml type of the decoder linears)
    "gptq-q4_0": (("--method", "gptq", "--bits", 4, "--group-size", 32, "--sym", *CALIB), "Q4_0"),
    "awq-q4_0": (("--method", "awq", "--bits", 4, "--group-size", 32, "--sym", *CALIB), "Q4_0"),
    "int4-q4_1": (("--method", "int4", "--group-size", 32), "Q4_1"),
    "rtn-q8_0": (("--method", "rtn", "--bits", 8, "--group-size", 32, "--sym"), "Q8_0"),
}
KL_MAX, TOP1_MIN = 1e-3, 0.99  # the agreement llama.cpp must reach with quantkit's model of the same file


@pytest.fixture(scope="module")
def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the llama.cpp tests: .ci/run installs llama-cpp-python (.ci/llamacpp-wheel.sh)")
        pytest.skip("llama-cpp-python is not installed: pip install the wheel .ci/llamacpp-wheel.sh builds")


def checked(out):
    result = run("check", out, "--base", DEMO_MODEL, *WINDOWS, "--json")
    report = json.loads(result.output[result.output.index("{"):])
    return result, {row["runtime"]: row for row in report["rows"]}


@pytest.mark.slow  # llama.cpp runs: `make test-fast` leaves it out
@pytest.mark.parametrize("scheme", SCHEMES)
def test_llama_cpp_computes_what_quantkit_computes(llama_cpp, tmp_path, scheme):
    """quantize --format gguf -> llama.cpp: the same tokens, mean KL <= 1e-3 and top-1 >= 99% against quantkit's
    fp32 model of the file, every decoder linear in the type written."""
    flags, kind = SCHEMES[scheme]
    out = tmp_path / "m.gguf"
    result = run("quantize", DEMO_MODEL, *flags, "--format", "gguf", "-o", out)
    assert result.exit_code == 0, result.output
    result, rows = checked(out)
    assert result.exit_code == 0, result.output
    row = rows["llama.cpp"]
    assert row["status"] == "ok" and row["passed"], row
    assert row["vs_quantkit"]["kl_mean"] <= KL_MAX and row["vs_quantkit"]["top1"] >= TOP1_MIN, row
    assert row["applied"]["kernels"] == {kind: 28} and row["applied"]["tokenizer"].startswith("same 1")


@pytest.mark.slow  # llama.cpp runs: `make test-fast` leaves it out
def test_an_f16_gguf_in_llama_cpp_is_the_fp16_model(llama_cpp, tmp_path):
    """write_gguf of the unquantized fp16 model: llama.cpp agrees with quantkit's model of it (and so with the
    base's own) to fp16 rounding."""
    out = write_gguf(quantkit.load(DEMO_MODEL, dtype="fp16"), tmp_path / "f16.gguf", DEMO_MODEL)
    result, rows = checked(out)
    assert result.exit_code == 0, result.output
    row = rows["llama.cpp"]
    assert row["applied"]["kernels"] == {"F16": 28} and row["applied"]["quantized"] == 0
    assert row["vs_quantkit"]["kl_mean"] <= 1e-5 and row["vs_quantkit"]["top1"] >= TOP1_MIN, row
    assert rows["quantkit"]["vs_base"]["kl_mean"] <= 1e-5  # quantkit's model of the F16 file is the base


def test_a_gguf_check_without_llama_cpp_says_how_to_install_it(tmp_path, monkeypatch):
    out = write_gguf(quantkit.load(DEMO_MODEL, dtype="fp16"), tmp_path / "f16.gguf", DEMO_MODEL)
    monkeypatch.delenv("QUANTKIT_LLAMACPP_PYTHON", raising=False)
    monkeypatch.setitem(RUNTIME_PACKAGE, "gguf", "no_such_llama_cpp")
    result, rows = checked(out)
    assert result.exit_code == 0, result.output
    assert rows["llama.cpp"]["status"] == "not installed" and ".ci/llamacpp-wheel.sh" in rows["llama.cpp"]["message"]


@pytest.mark.parametrize("got,expected,status", [
    ([1, 5, 6], [1, 5, 6], "ok"),
    ([1, 5, 7], [1, 5, 6], "refused"),
    ([1, 5], [1, 5, 6], "refused"),
])
def test_a_runtime_that_tokenizes_otherwise_is_refused(got, expected, status):
    row = {"status": "ok", "applied": {"tokens": got}}
    tokenizer_problem(row, expected)
    assert row["status"] == status and "tokens" not in row["applied"]
    if status == "refused":
        assert f"first difference at id {2}" in row["message"]


# -- eval and compare of .gguf files, run by llama.cpp (eval/llamacpp.py) -----------------------------------------


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """The fp16 demo model as an F16 GGUF, and RTN w4 g32 of it as Q4_0."""
    root = tmp_path_factory.mktemp("ggufs")
    model = quantkit.load(DEMO_MODEL, dtype="fp16")
    f16 = write_gguf(model, root / "f16.gguf", DEMO_MODEL)
    q4 = root / "q4.gguf"
    result = run("quantize", DEMO_MODEL, "--method", "rtn", "--bits", 4, "--group-size", 32, "--sym", "--format", "gguf",
                 "-o", q4)
    assert result.exit_code == 0, result.output
    return {"f16": f16, "q4": q4, "root": root}


def report_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


EVAL_DATA = ("--dataset", DEMO_MODEL / "test.txt", "--seq-len", 128)


@pytest.mark.slow  # llama.cpp runs: `make test-fast` leaves it out
def test_compare_runs_gguf_files_in_llama_cpp(llama_cpp, ggufs):
    """One table: the F16 GGUF is the base to fp16 rounding; the Q4_0 one has its quantization's KL, 4.5 bits per
    weight, the recipe's method and llama.cpp's arithmetic; the directory export of the same run agrees with it."""
    result = run("compare", DEMO_MODEL, ggufs["f16"], ggufs["q4"], *EVAL_DATA, "--json")
    models = {m["name"]: m for m in report_of(result)["models"]}
    f16, q4 = models["f16.gguf"], models["q4.gguf"]
    assert f16["fidelity"]["kl"]["mean"] < 1e-5 and f16["fidelity"]["top1"]["agreement"] > 0.99
    assert f16["method"] == "F16 (GGUF F16)" and f16["bits_per_weight"] == 16
    assert q4["method"] == "rtn w4 g32 sym (GGUF Q4_0)" and q4["bits_per_weight"] == 4.5
    assert q4["arithmetic"].startswith("llama.cpp (llama-cpp-python") and "Q4_0 (28 linears)" in q4["arithmetic"]
    assert 1e-4 < q4["fidelity"]["kl"]["mean"] < 0.1 and q4["tokens_per_s"] > 0 and q4["layer_errors"] == []


@pytest.mark.slow  # llama.cpp runs: `make test-fast` leaves it out
def test_eval_of_a_gguf_is_compares_number(llama_cpp, ggufs):
    compared = report_of(run("compare", DEMO_MODEL, ggufs["q4"], *EVAL_DATA, "--json"))["models"][0]
    evaluated = report_of(run("eval", ggufs["q4"], "--base", DEMO_MODEL, *EVAL_DATA, "--json"))["models"][0]
    assert evaluated["fidelity"]["kl"]["mean"] == compared["fidelity"]["kl"]["mean"]
    assert evaluated["perplexity"] == compared["perplexity"]


@pytest.mark.parametrize("flags,needle", [
    ((), "a .gguf carries no tokenizer.model: give --base"),
    (("--base", DEMO_MODEL, "--tp", 2), "--tp compares quantkit's pretraining_tp arithmetic"),
    (("--base", DEMO_MODEL, "--sensitivity", "layer", "--method", "rtn"), "--sensitivity quantizes quantkit's model"),
])
def test_what_eval_cannot_do_with_a_gguf_is_refused_in_one_line(ggufs, flags, needle):
    from tests.helpers import assert_one_line_error
    assert_one_line_error(run("eval", ggufs["q4"], *flags, *EVAL_DATA), needle)


@pytest.mark.slow  # llama.cpp runs: `make test-fast` leaves it out
def test_a_gguf_llama_cpp_tokenizes_otherwise_is_refused(llama_cpp, ggufs):
    from quantkit.errors import QuantkitError
    from quantkit.eval.llamacpp import LlamaCppModel

    class Other:
        def encode(self, text, bos=True):
            return [1, 7, 7]

    model = LlamaCppModel(ggufs["q4"], n_ctx=64)
    with pytest.raises(QuantkitError, match="tokenizes the text otherwise than the base B's tokenizer .* first "
                                            "difference at id 1"):
        model.check_tokenizer(Other(), "The list type", "B")
    model.close()


def test_generate_of_a_gguf_says_where_it_runs(ggufs):
    from tests.helpers import assert_one_line_error
    assert_one_line_error(run("generate", ggufs["q4"], "The"), "a .gguf carries no tokenizer.model", "llama-cli -m")
