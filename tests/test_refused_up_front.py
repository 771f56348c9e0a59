"""What can be known before the first tensor is read is decided before, by quantize and plan alike: a format that
cannot hold the recipe's layout, a pattern that applies to nothing, a calibration source that cannot be read."""

import pytest
from tests.helpers import assert_one_line_error, run


GPTQ = ("--method", "gptq", "--group-size", 32)
INT4 = ("--method", "int4", "--group-size", 32)


def recipe_file(tmp_path, rules: str, default="{method: int4, group_size: 32}"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"default: {default}\nrules:\n{rules}")
    return path


def refusals(tmp_path):
    """(flags, needle): each refused before any work; the calibration file does not exist, so a refusal that came
    after reading it would name it instead."""
    calib = ("--calib", tmp_path / "not-read.txt")
    lm_head = recipe_file(tmp_path, "  - {pattern: 'lm_head', config: {method: rtn, bits: 8}}\n")
    return [
        ((*GPTQ, *calib, "--ignore", r"layers\.0\."), "the full-precision linears differ between decoder layers"),
        ((*INT4, "--format", "gptq", "--ignore", r"layers\.1\.mlp"), "modules_in_block_to_quantize"),
        ((*GPTQ, *calib, "--ignore", r"mlp\.dwn_proj$"), r"ignore pattern 'mlp\.dwn_proj$' matches no module"),
        (("--recipe", lm_head), "does not quantize the lm_head"),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_refused_before_any_work(tiny_model_dir, tmp_path, command, case):
    flags, needle = refusals(tmp_path)[case]
    out = ("-o", tmp_path / "q")
    assert_one_line_error(run(command, tiny_model_dir, *flags, *out), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "tiny"]  # no output, no work directory


def test_a_mixed_layout_gptq_holds_is_written(tiny_model_dir, tmp_path):
    """The same linears ignored in every layer: one gptq config (modules_in_block_to_quantize) holds it."""
    result = run("quantize", tiny_model_dir, *INT4, "--format", "gptq", "--ignore", r"mlp\.down_proj$",
                 "-o", tmp_path / "q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_splitting_what_vllm_fuses_warns_in_every_format(tiny_model_dir, tmp_path, fmt, caplog):
    result = run("quantize", tiny_model_dir, *INT4, "--format", fmt, "--ignore", r"self_attn\.q_proj",
                 "-o", tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert "vLLM will refuse this checkpoint" in caplog.text and "self_attn.q_proj/k_proj/v_proj" in caplog.text


@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_a_calibration_source_that_cannot_be_read_is_refused_by_plan_too(tiny_model_dir, tmp_path, command):
    out = ("-o", tmp_path / "q")
    assert_one_line_error(run(command, tiny_model_dir, *GPTQ, "--calib", tmp_path / "missing.txt", *out),
                          "is neither a known dataset", "missing.txt")
    (tmp_path / "calib.docx").write_text("text")
    assert_one_line_error(run(command, tiny_model_dir, *GPTQ, "--calib", tmp_path / "calib.docx", *out),
                          "unsupported calibration source file type '.docx'")
    assert not (tmp_path / "q").exists()
