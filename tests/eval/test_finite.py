"""A metric that comes out NaN or infinite is an error naming the model and the window, never a number."""

from __future__ import annotations


import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.eval import text_data
from quantkit.eval.evaluate import EvalResult, evaluate, model_entry
from quantkit.eval.finite import check_numbers
from quantkit.eval.perplexity import PerplexityResult, perplexity_from_nll
from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import assert_one_line_error, run, without_progress

SEQ = ("--seq-len", 32, "--no-speed")



def overflowing_model():
    """Finite in fp32 and bf16; in fp16 the MLP's gate*up products (~2.5e5) pass 65504: inf, then NaN."""
    model = random_model(tiny_config())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(3e3)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    text = root / "text.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text()[:1500])
    return {"big": save_model(overflowing_model(), root / "big", tokenizer_dir=DEMO_MODEL),
            "ok": save_model(random_model(tiny_config()), root / "ok", tokenizer_dir=DEMO_MODEL),
            "text": text, "root": root}


def test_the_fixture_overflows_only_in_fp16(dirs):
    ids = torch.randint(0, 4096, (1, 32))
    for dtype, finite in (("fp32", True), ("bf16", True), ("fp16", False)):
        assert torch.isfinite(quantkit.load(dirs["big"], dtype=dtype)(ids)).all().item() is finite


# (command, what the one line must name); every one runs with --dtype fp16
FAILING = {
    "eval": (lambda d: ("eval", d["big"]), lambda d: [str(d["big"]), "window 0 (tokens 0-32"]),
    "eval --base (the model)": (lambda d: ("eval", d["big"], "--base", d["ok"]),
                                lambda d: [str(d["big"]), "window 0"]),
    "eval --base (the base)": (lambda d: ("eval", d["ok"], "--base", d["big"]),
                               lambda d: [f"the base {d['big']}", "window 0"]),
    "eval --save-logits": (lambda d: ("eval", d["big"], "--save-logits", d["root"] / "big.qkl"),
                           lambda d: [str(d["big"]), "window 0"]),
    "compare (the base)": (lambda d: ("compare", d["big"], d["ok"]), lambda d: [f"the base {d['big']}"]),
    "compare (a model)": (lambda d: ("compare", d["ok"], d["big"]), lambda d: [str(d["big"]), "window 0"]),
}


@pytest.mark.parametrize("case", FAILING)
def test_fp16_overflow_is_one_line_error(dirs, case):
    command, needles = FAILING[case]
    result = run(*command(dirs), "--dataset", dirs["text"], *SEQ, "--dtype", "fp16")
    assert_one_line_error(without_progress(result), *needles(dirs), "non-finite logits", "computed in fp16",
                          "fp16 overflow", "--dtype bf16 or --dtype fp32")
    assert not (dirs["root"] / "big.qkl").exists()  # no half-written base logits either


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", FAILING)
def test_the_same_commands_run_in_fp32_and_bf16(dirs, case, dtype):
    command, _ = FAILING[case]
    result = run(*command(dirs), "--dataset", dirs["text"], *SEQ, "--dtype", dtype, "--json")
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower()
    (dirs["root"] / "big.qkl").unlink(missing_ok=True)


def test_tp_noise_floor_names_its_fp16_run(dirs):
    """The --tp comparison always runs fp16 and bf16: an fp16 overflow there names that run, not a NaN row."""
    result = run("eval", dirs["big"], "--dataset", dirs["text"], *SEQ, "--dtype", "fp32", "--tp", 2,
                 "--tp-windows", 1)
    assert_one_line_error(without_progress(result), str(dirs["big"]),
                          "the --tp noise floor's fp16, pretraining_tp=1 run", "window 0", "drop --tp",
                          "--dtype bf16 or --dtype fp32")


def test_tp_noise_floor_of_a_finite_model_runs(dirs):
    result = run("eval", dirs["ok"], "--dataset", dirs["text"], *SEQ, "--tp", 2, "--tp-windows", 1, "--json")
    assert result.exit_code == 0, result.output


def test_library_evaluate_names_the_window(dirs, tokenizer_file):
    data = text_data(quantkit.load_tokenizer(tokenizer_file), (DEMO_MODEL / "test.txt").read_text()[:1500], 32)
    big = quantkit.load(dirs["big"], dtype="fp16")
    with pytest.raises(QuantkitError, match=rf"^{dirs['big']}: non-finite logits in window 0 \(tokens 0-32, first "
                                            rf"at token \d+\) computed in fp16: likely an fp16 overflow"):
        evaluate(big, data)
    with pytest.raises(QuantkitError, match=r"^my label: non-finite logits in window 0"):
        evaluate(big, data, base=quantkit.load(dirs["ok"]), label="my label")


def test_perplexity_overflowing_exp_is_an_error_not_an_overflow(tokenizer_file):
    data = text_data(quantkit.load_tokenizer(tokenizer_file), (DEMO_MODEL / "test.txt").read_text()[:300], 32)
    result = perplexity_from_nll(torch.full((10,), 800.0), data)  # exp(800) overflows a float
    assert result.ppl == float("inf")
    with pytest.raises(QuantkitError, match=r"^m: perplexity\.ppl came out inf: "):
        check_numbers(result.report(), "m", "perplexity")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["tokens_per_s", "fidelity", "sensitivity"])
def test_every_report_number_is_checked(bad, where):
    ppl = PerplexityResult(ppl=5.0, ppl_stderr=0.1, nll=1.6, nll_stderr=0.01, n_tokens=10, n_windows=1, seq_len=32)
    fidelity = {"kl": {"mean": bad}} if where == "fidelity" else None
    kwargs = {"tokens_per_s": {"tokens_per_s": bad}, "fidelity": {},
              "sensitivity": {"sensitivity": {"rows": [{"name": "layer 0", "kl_mean": bad}]}}}[where]
    with pytest.raises(QuantkitError, match=rf"^out/q: {where}.* came out {bad}"):
        model_entry({"path": "out/q"}, EvalResult(ppl, fidelity=fidelity), **kwargs)
    model_entry({"path": "out/q"}, EvalResult(ppl), tokens_per_s=12.5)  # finite: no error
