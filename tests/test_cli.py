"""End-to-end CLI tests with click's CliRunner: each command once, and bad input gives one line and exit 1."""

import json

import pytest
import torch

from quantkit.io.manifest import MANIFEST_FILE
from quantkit.model import save_model
from tests.conftest import REPO, random_model, tiny_config
from tests.helpers import assert_one_line_error, run


def test_generate(tiny_model_dir):
    result = run("generate", tiny_model_dir, "Hello", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Hello") and len(result.output) > len("Hello\n")


def test_generate_chat_sampling(tiny_model_dir):
    args = ("generate", tiny_model_dir, "Hi", "--chat", "--system", "Be brief.", "--temperature", 0.7,
            "--top-p", 0.9, "--seed", 1, "--max-new-tokens", 4)
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert run(*args).output == first.output  # seeded


def test_eval_json(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Some ordinary English text for the window. " * 20)
    result = run("eval", tiny_model_dir, "--dataset", text, "--seq-len", 64, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    dataset, ppl = report["dataset"], report["models"][0]["perplexity"]
    assert dataset["seq_len"] == 64 and dataset["n_tokens"] == dataset["n_windows"] * 63 == ppl["n_tokens"]
    assert ppl["ppl"] > 1 and ppl["ppl_stderr"] > 0


def test_cli_missing_directory(tmp_path):
    assert_one_line_error(run("generate", tmp_path / "nope", "x"), tmp_path / "nope", "no such model directory")


def test_cli_missing_config(tiny_model_dir):
    (tiny_model_dir / "config.json").unlink()
    assert_one_line_error(run("generate", tiny_model_dir, "x"), tiny_model_dir / "config.json")


@pytest.fixture
def tiny_model_dir(tiny_model_dir):
    """conftest's, without quantkit's manifest: the tests here edit its files (tests/formats/test_verify.py: with it)."""
    (tiny_model_dir / MANIFEST_FILE).unlink()
    return tiny_model_dir


def test_cli_non_llama_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    assert_one_line_error(run("generate", tiny_model_dir, "x"), tiny_model_dir / "config.json", "'bert'")


def test_cli_missing_shard(tmp_path, tokenizer_file):
    out = save_model(random_model(tiny_config()), tmp_path / "m", max_shard_size="60KB",
                     tokenizer_dir=tokenizer_file.parent)
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.unlink()
    assert_one_line_error(run("generate", out, "x"), victim, "missing")


def test_cli_corrupt_safetensors(tiny_model_dir):
    path = tiny_model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert_one_line_error(run("generate", tiny_model_dir, "x"), path, "truncated or corrupt")


def test_cli_shape_mismatch(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    assert_one_line_error(run("generate", tiny_model_dir, "x"), tiny_model_dir / "config.json",
                          "hidden_size is 128 but the stored tensors imply 64")


def test_cli_missing_tokenizer(tiny_model_dir):
    (tiny_model_dir / "tokenizer.model").unlink()
    assert_one_line_error(run("generate", tiny_model_dir, "x"), tiny_model_dir / "tokenizer.model")


def test_cli_eval_text_too_short(tiny_model_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("tiny")
    assert_one_line_error(run("eval", tiny_model_dir, "--dataset", text, "--seq-len", 256), "--seq-len")


@pytest.mark.parametrize("flag, value, needle", [("--top-p", 0, "top_p=0.0"), ("--temperature", -1, "temperature")])
def test_cli_bad_sampling_flags(tiny_model_dir, flag, value, needle):
    assert_one_line_error(run("generate", tiny_model_dir, "x", flag, value), needle)


# -- quantize and backends -------------------------------------------------------------------------


def test_quantize_end_to_end(kernel_model_dir, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", kernel_model_dir, "--method", "int4", "--group-size", 32, "-o", out)
    assert result.exit_code == 0, result.output
    assert "MB ->" in result.output and "bits per weight (decoder linears, scales included)" in result.output
    assert run("generate", out, "Hi", "--max-new-tokens", 3).exit_code == 0


def test_quantize_json_and_recipe(kernel_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {method: int4, group_size: 32}\n"
                      "rules:\n  - {pattern: 'down_proj$', config: {method: rtn, bits: 8, group_size: -1}}\n")
    result = run("quantize", kernel_model_dir, "--recipe", recipe, "--ignore", "layers\\.0\\.", "-o", tmp_path / "q",
                 "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["format"] == "compressed-tensors" and summary["layers"] == 2
    assert summary["recipe"]["ignore"] == ["layers\\.0\\."] and summary["bytes_after"] < summary["bytes_before"]


def test_backends_lists_usability():
    result = run("backends", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.output)}
    assert rows["int4"]["usable"] and rows["int4"]["formats"][0] == "compressed-tensors"
    assert not rows["rtn"]["calibration"]


def test_cli_quantize_output_exists(kernel_model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    assert_one_line_error(run("quantize", kernel_model_dir, "--method", "int4", "-o", tmp_path / "q"),
                          tmp_path / "q", "--force")


def test_cli_quantize_unknown_method(kernel_model_dir, tmp_path):
    assert_one_line_error(run("quantize", kernel_model_dir, "--method", "int3", "-o", tmp_path / "q"),
                          "unknown method 'int3'", "int4")


def test_cli_quantize_unsupported_bits(kernel_model_dir, tmp_path):
    assert_one_line_error(run("quantize", kernel_model_dir, "--method", "rtn", "--bits", 5, "-o", tmp_path / "q"),
                          "--bits 5 is not supported")


def test_cli_quantize_option_for_another_method(kernel_model_dir, tmp_path):
    result = run("quantize", kernel_model_dir, "--method", "int4", "--bits", 8, "-o", tmp_path / "q")
    assert result.exit_code == 2 and "--bits does not apply to --method int4" in result.output


def test_quantize_any_config_field_with_dash_o(kernel_model_dir, tmp_path):
    result = run("quantize", kernel_model_dir, "--method", "rtn", "-O", "bits=3", "-O", "group_size=32",
                 "-O", "symmetric=true", "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["recipe"]["default"] == {"method": "rtn", "version": 1, "bits": 3, "group_size": 32, "symmetric": True}


@pytest.mark.parametrize("args, needle", [
    (("-O", "nonsense=1"), "rtn: unknown option(s) nonsense"),
    (("-O", "bits=5"), "--bits 5 is not supported"),
    (("-O", "bits"), "write KEY=VALUE"),
    (("-O", "bits=3", "--bits", "4"), "bits given twice"),
    (("-O", "bits=3", "-O", "bits=8"), "bits given twice"),
    (("-O", "bits=4.0"), "bits=4.0: bits is an integer"),
    (("-O", "group_size=none"), "group_size is an integer"),
    (("-O", "symmetric=maybe"), "symmetric=maybe: symmetric is true or false"),
    (("-O", "method=gptq"), "the method is --method's"),
])
def test_cli_dash_o_errors_name_the_key(kernel_model_dir, tmp_path, args, needle):
    result = run("quantize", kernel_model_dir, "--method", "rtn", *args, "-o", tmp_path / "q")
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / "q").exists()


def test_backends_json_lists_each_methods_options():
    rows = {r["method"]: r for r in json.loads(run("backends", "--json").output)}
    assert rows["gptq"]["options"]["damp_percent"] == 0.01 and rows["int4"]["options"] == {"group_size": 128}


def test_quantize_gptq_with_a_local_calibration_file(kernel_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    calib = tmp_path / "calib.txt"
    calib.write_text((REPO / "demo" / "model" / "train.txt").read_text()[:60000])
    result = run("quantize", kernel_model_dir, "--method", "gptq", "--bits", 4, "--group-size", 32, "--act-order",
                 "--calib", calib, "--n-samples", 4, "--seq-len", 64, "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["format"] == "gptq" and len(summary["errors"]) == 14
    assert all(0 < e["relative_error"] < 1 for e in summary["errors"])
    assert run("generate", tmp_path / "q", "Hi", "--max-new-tokens", 3).exit_code == 0


def test_cli_gptq_without_calibration(kernel_model_dir, tmp_path):
    assert_one_line_error(run("quantize", kernel_model_dir, "--method", "gptq", "-o", tmp_path / "q"),
                          "needs calibration data: pass --calib")


def test_cli_gptq_offline_hub_dataset(kernel_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    result = run("quantize", kernel_model_dir, "--method", "gptq", "--calib", "wikitext2", "-o", tmp_path / "q")
    assert_one_line_error(result, "wikitext2", "pass a local file")
    assert not (tmp_path / "q").exists()


# ---- token ids beyond a vocabulary, added tokens ---------------------------------------------------


def emitting_model(vocab_size: int, token: int):
    """A tiny random model whose greedy next token is always `token`.

    Layers add nothing (o_proj, down_proj zero), so the final hidden state is the normed embedding, whose
    dimension 0 is positive for every token; only lm_head row `token` reads that dimension."""
    model = random_model(tiny_config(vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 1.0
    return model


def emitting_dir(tmp_path, vocab_size: int, token: int, added: dict | None = None):
    out = tmp_path / f"emits-{token}"
    save_model(emitting_model(vocab_size, token), out, tokenizer_dir=REPO / "demo" / "model")
    if added is not None:
        (out / "added_tokens.json").write_text(json.dumps(added))
        (out / MANIFEST_FILE).unlink()  # a fine-tune's directory, edited after saving
    return out


@pytest.mark.parametrize("chat", [False, True])
def test_generate_prints_an_added_pad_token_as_transformers_decodes_it(tmp_path, chat):
    """The fine-tune layout: vocab_size 4097 and added_tokens.json {"<pad>": 4096} beside 4096 pieces."""
    import transformers

    model_dir = emitting_dir(tmp_path, 4097, 4096, {"<pad>": 4096})
    result = run("generate", model_dir, "Hello", "--max-new-tokens", 3, *(["--chat"] if chat else []))
    assert result.exit_code == 0, result.output
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert theirs.decode([4096] * 3, skip_special_tokens=True) == "<pad>" * 3
    assert result.output == ("" if chat else "Hello") + "<pad>" * 3 + "\n"


def test_generate_with_a_vocab_padded_beyond_the_tokenizer(tmp_path, caplog):
    """vocab_size 4160 (a multiple of 64) over 4096 pieces: the ids no token has print nothing, warned once."""
    result = run("generate", emitting_dir(tmp_path, 4160, 4150), "Hello", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert result.output == "Hello\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "token id" in r.getMessage()]
    assert len(warnings) == 1 and "token id 4150" in warnings[0]


def test_generate_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    model_dir = tmp_path / "small-vocab"
    save_model(random_model(tiny_config(vocab_size=300)), model_dir, tokenizer_dir=REPO / "demo" / "model")
    import quantkit

    high = max(quantkit.load_tokenizer(model_dir).encode("Hello world"))
    assert high >= 300
    result = run("generate", model_dir, "Hello world", "--max-new-tokens", 2)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {model_dir / 'tokenizer.model'}: gives token id {high}, but the model's "
                                     f"config.json has vocab_size 300 (this tokenizer has 4096 ids): use the "
                                     f"tokenizer the model was trained with")
