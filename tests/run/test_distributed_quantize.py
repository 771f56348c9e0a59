"""Data-parallel calibration under torchrun (quantkit/run/calibrator.py, quantkit/dist.py): 2 gloo processes on the
CPU write a single process's output byte for byte (one thread a process), rank 0 alone writes; an error on one rank
ends both with one line; a killed rank ends the run and --resume continues it (refused with another number of
ranks); what cannot be shared out is refused before any work."""

import json
import signal
import time

import pytest
import torch

from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import run, torchrun, torchrun_errors, torchrun_rank

pytestmark = pytest.mark.slow  # torchrun processes: `make test-fast` leaves them out
SEQ_LEN = 64


def files(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """10 windows of the demo model's text as a token file: in batches of 4, rank 0 gets 8 samples and rank 1 two."""
    from quantkit.model.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("calib") / "tokens.pt"
    ids = load_tokenizer(DEMO_MODEL).encode((DEMO_MODEL / "test.txt").read_text())
    torch.save(torch.tensor(ids[:10 * SEQ_LEN]).reshape(10, SEQ_LEN), path)
    return ("--calib", path, "--n-samples", 10, "--seq-len", SEQ_LEN, "--calib-batch-size", 4)


@pytest.mark.parametrize("flags", [("--bits", 4, "--group-size", 32),
                                   ("--bits", 4, "--group-size", 32, "--act-order"),
                                   ("--bits", 8, "--group-size", 64, "--sym", "--offload-activations")],
                         ids=["g32", "act-order", "w8-offload"])
def test_two_ranks_write_a_single_process_output(tmp_path, calib, flags):
    """The observers are fed rank after rank in one process's order and each linear is solved on one rank: the same
    Hessians, so the same bytes (the stronger form of 'weights identical in >= 99.9% of positions')."""
    args = ("quantize", DEMO_MODEL, "--method", "gptq", *flags, *calib)
    one = torchrun(*args, "-o", tmp_path / "one", nproc=1)  # one process at one thread: the same float sums
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*args, "-o", tmp_path / "two", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # rank 0 alone prints: one document
    assert summary["output"] == str(tmp_path / "two") and summary["layers"] == 4
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no work directory left


def test_an_error_on_one_rank_ends_every_rank_with_one_line(tmp_path, calib):
    """A token only rank 1's samples hold has a NaN embedding: rank 1's activations are not finite, rank 0's are;
    both ranks stop, rank 0 says it once, nothing is written."""
    tokens = torch.load(calib[1])
    token = next(t for t in tokens[8:].unique().tolist() if t not in set(tokens[:8].unique().tolist()))
    model = random_model(tiny_config())
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    save_model(model, tmp_path / "nan", tokenizer_dir=DEMO_MODEL)
    result = torchrun("quantize", tmp_path / "nan", "--method", "gptq", "--group-size", 32, *calib,
                      "-o", tmp_path / "out")
    assert result.returncode != 0
    errors = torchrun_errors(result)
    assert len(errors) == 1 and "not finite" in errors[0], result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_a_killed_rank_ends_the_run_and_resume_continues(tmp_path, calib):
    """SIGKILL to rank 1 once a layer is done: the run ends (non-zero) and keeps its finished layers; --resume in one
    process is refused (the number of ranks changed), under torchrun it finishes: a single process's output."""
    args = ("quantize", DEMO_MODEL, "--method", "gptq", "--bits", 4, "--group-size", 32, "--calib",
            DEMO_MODEL / "test.txt", "--n-samples", 32, "--seq-len", 256)
    state = tmp_path / ".two.quantkit-work" / "state.json"
    proc = torchrun(*args, "-o", tmp_path / "two", popen=True, dist_timeout=60)
    try:
        victim = torchrun_rank(proc, 1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (state.exists() and json.loads(state.read_text())["layers"]):
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    done = len(json.loads(state.read_text())["layers"])
    assert 1 <= done < 4 and not (tmp_path / "two").exists()
    refused = run(*args, "-o", tmp_path / "two", "--resume")
    assert refused.exit_code == 1 and "the number of torchrun ranks" in refused.output, refused.output
    resumed = torchrun(*args, "-o", tmp_path / "two", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = torchrun(*args, "-o", tmp_path / "one", nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert files(tmp_path / "one") == files(tmp_path / "two")


@pytest.mark.parametrize("args, needle", [
    (("quantize", DEMO_MODEL, "--method", "rtn"), "uncalibrated methods have no calibration samples to share out"),
    (("quantize", DEMO_MODEL, "--method", "awq", "--n-samples", 8), "method awq: its activation-aware search"),
    (("quantize", DEMO_MODEL, "--method", "gptq", "--awq", "--n-samples", 8), "method gptq: its activation-aware"),
    (("quantize", DEMO_MODEL, "--method", "gptq", "--n-samples", 8, "--calib-batch-size", 8),
     "fewer calibration batches than the 2 torchrun ranks"),
    (("generate", DEMO_MODEL, "Hello"), "quantkit generate runs in one process"),
])
def test_what_cannot_be_shared_out_is_refused_before_any_work(tmp_path, args, needle):
    """One line (rank 0's), exit non-zero, nothing written."""
    calibrated = args[0] == "quantize" and args[3] != "rtn"
    output = ("-o", tmp_path / "out") if args[0] == "quantize" else ()
    result = torchrun(*args, *output, *(("--calib", DEMO_MODEL / "test.txt") if calibrated else ()))
    assert result.returncode != 0
    errors = torchrun_errors(result)
    assert len(errors) == 1 and needle in errors[0], result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_is_said_once(tmp_path):
    result = torchrun("quantize", DEMO_MODEL, "--method", "rtn", "--calib", DEMO_MODEL / "test.txt",
                      "-o", tmp_path / "out")
    assert result.returncode != 0
    errors = torchrun_errors(result)
    assert len(errors) == 1 and "--calib applies to calibrated methods" in errors[0], result.stderr
