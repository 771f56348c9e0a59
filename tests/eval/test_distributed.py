"""Data-parallel evaluation under torchrun (quantkit/dist.py, eval's EvalData.shard and gather): 2 gloo processes on
the CPU give exactly a single process's numbers, rank 0 alone prints (one JSON document), and an error on one rank
ends every rank with rank 0's one-line message."""

import json

import pytest
import torch

from quantkit.model import save_model
from quantkit.model.tokenizer import load_tokenizer
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import run, torchrun, torchrun_errors, torchrun_rank

SEQ_LEN = 64
pytestmark = pytest.mark.slow  # torchrun processes (about a minute): `make test-fast` leaves them out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    text = root / "text.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text()[:6000])
    for name, flags in {"rtn": ("--bits", 4, "--group-size", 32, "--sym"), "rtn8": ("--bits", 8, "--group-size", 64)}.items():
        result = run("quantize", DEMO_MODEL, "--method", "rtn", *flags, "-o", root / name)
        assert result.exit_code == 0, result.output
    return {"root": root, "text": text, "data": ("--dataset", text, "--seq-len", SEQ_LEN)}


def numbers(report: dict) -> list:
    """Every model's measured numbers (not its decode speed, which only rank 0 measures, nor the time stamp)."""
    return [(m["name"], m["perplexity"], m["fidelity"]) for m in report["models"]] + [report["dataset"]]


@pytest.mark.parametrize("command", ["eval", "compare", "eval-perplexity"])
def test_two_ranks_give_a_single_process_numbers(setup, command):
    root, data = setup["root"], setup["data"]
    args = {"eval": ("eval", root / "rtn", "--base", DEMO_MODEL),
            "compare": ("compare", DEMO_MODEL, root / "rtn", root / "rtn8"),
            "eval-perplexity": ("eval", root / "rtn")}[command]
    one = run(*args, *data, "--json")
    assert one.exit_code == 0, one.output
    two = torchrun(*args, *data, "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)  # rank 0 alone prints: one JSON document
    assert numbers(report) == numbers(json.loads(one.output[one.output.index("{"):]))
    assert report["models"][0]["tokens_per_s"] > 0


def test_an_error_on_one_rank_ends_every_rank_with_one_line(setup, tmp_path):
    """A NaN embedding row of a token only rank 1's windows hold: rank 1 fails, rank 0 says so once, exit 1."""
    tokenizer = load_tokenizer(DEMO_MODEL)
    ids = tokenizer.encode(setup["text"].read_text())
    windows = [set(ids[i:i + SEQ_LEN]) for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)]
    rank0 = set().union(*windows[0::2])
    token = next(t for t in sorted(windows[1]) if t not in rank0)
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    save_model(model, tmp_path / "nan", tokenizer_dir=DEMO_MODEL)
    result = torchrun("eval", tmp_path / "nan", *setup["data"])
    assert result.returncode != 0
    errors = torchrun_errors(result)
    assert len(errors) == 1 and "NaN" in errors[0] and "window 1" in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("flags", [("--tp", 2), ("--sensitivity", "layer", "--method", "rtn")])
def test_what_runs_in_one_process_is_refused_under_torchrun(setup, flags):
    result = torchrun("eval", setup["root"] / "rtn", "--base", DEMO_MODEL, *setup["data"], *flags)
    assert result.returncode != 0
    errors = torchrun_errors(result)
    assert len(errors) == 1 and "run(s) in one process: run without torchrun (it has 2 ranks)" in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("base", [True, False])
def test_save_logits_with_two_ranks_writes_one_file_a_single_process_would(setup, tmp_path, base):
    """Each rank writes its windows, rank 0 joins them: the same tensors and metadata (but the decode speed) as a
    single process's file, no part left behind; and it serves as --base-logits with the same numbers."""
    from safetensors import safe_open
    base_flags = ("--base", DEMO_MODEL) if base else ()
    one = run("eval", setup["root"] / "rtn", *base_flags, *setup["data"], "--save-logits", tmp_path / "one.qkl")
    assert one.exit_code == 0, one.output
    two = torchrun("eval", setup["root"] / "rtn", *base_flags, *setup["data"], "--save-logits", tmp_path / "two.qkl")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.qkl", "two.qkl"], list(tmp_path.iterdir())
    with safe_open(tmp_path / "one.qkl", "pt") as a, safe_open(tmp_path / "two.qkl", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        meta_a, meta_b = a.metadata(), b.metadata()
    assert {k: v for k, v in meta_a.items() if k != "model"} == {k: v for k, v in meta_b.items() if k != "model"}
    against = [run("eval", setup["root"] / "rtn8", *setup["data"], "--base-logits", tmp_path / f, "--json")
               for f in ("one.qkl", "two.qkl")]
    assert numbers(json.loads(against[0].output[against[0].output.index("{"):])) == \
        numbers(json.loads(against[1].output[against[1].output.index("{"):]))


def test_a_killed_rank_ends_the_run(setup, tmp_path):
    """SIGKILL to rank 1 mid-evaluation: torchrun ends rank 0 too (SIGTERM: one line, nothing written) well within
    the timeout, and exits non-zero; no process is left waiting in a collective."""
    import signal
    import time

    text = tmp_path / "long.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text() * 2)
    args = ["eval", setup["root"] / "rtn", "--base", DEMO_MODEL, "--dataset", text, "--seq-len", 32,
            "--report", tmp_path / "r.json"]
    proc = torchrun(*args, popen=True, dist_timeout=60)
    try:
        victim = torchrun_rank(proc, 1)
        time.sleep(6)  # into the evaluation (both models loaded)
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not (tmp_path / "r.json").exists()
