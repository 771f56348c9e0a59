"""A full disk (ENOSPC, EDQUOT) while writing is one line naming the output and the space, never a traceback,
and leaves no temporary behind and an existing output as it was."""

from __future__ import annotations

import errno
import re

import pytest

import quantkit
from quantkit.errors import QuantkitError
from quantkit.io.files import DiskFull, atomic_dir, write_text
from quantkit.model import save_model
from quantkit.io.shards import ShardWriter
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import assert_one_line_error, run, without_progress




def fill_disk_after(monkeypatch, n_tensors: int, code: int = errno.ENOSPC):
    """ShardWriter.add writes `n_tensors` tensors, then the disk is full (as the spool file's write would say)."""
    calls = {"n": 0}
    real_add = ShardWriter.add

    def add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > n_tensors:
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded",
                          str(self.out_dir / ".spool-0"))
        return real_add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


QUANTIZE = ("--method", "rtn", "--bits", 4, "--group-size", 32)


@pytest.mark.parametrize("n_tensors, layer_done", [(1, False), (40, True)])  # non-layer tensors; a layer done
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_quantize_disk_full_is_one_line(tiny_model_dir, tmp_path, monkeypatch, n_tensors, layer_done, code):
    fill_disk_after(monkeypatch, n_tensors, code)
    out = tmp_path / "q"
    result = without_progress(run("quantize", tiny_model_dir, *QUANTIZE, "-o", out))
    assert_one_line_error(result, f"{out}: no space left on device after writing ", "(about ", " needed, ",
                          " free on /", "choose another output (-o)")
    assert "Traceback" not in result.output and not out.exists()
    # a finished layer is kept in the work directory for --resume (quantkit.run.workdir); nothing else is left
    kept = [".q.quantkit-work"] if layer_done else []
    assert leftovers(tmp_path, "q") == kept and ("--resume continues" in result.output) == bool(kept)


@pytest.mark.parametrize("n_tensors", [1, 40])  # before any layer, after one
def test_estimate_is_the_planners_output_size(tiny_model_dir, tmp_path, monkeypatch, n_tensors):
    """The estimate is about what the finished output takes (plus one shard being closed), however far the run got:
    the output size of quantkit.run.sizing, the planner's."""
    done = quantkit.quantize_checkpoint(tiny_model_dir, quantkit.backends.QuantConfig.from_dict(
        {"method": "rtn", "bits": 4, "group_size": 32}), tmp_path / "full", progress=False)
    fill_disk_after(monkeypatch, n_tensors)
    with pytest.raises(DiskFull) as caught:
        quantkit.quantize_checkpoint(tiny_model_dir, quantkit.backends.QuantConfig.from_dict(
            {"method": "rtn", "bits": 4, "group_size": 32}), tmp_path / "q", progress=False)
    assert done.bytes_after <= caught.value.needed <= 2.2 * done.bytes_after
    assert 0 < caught.value.written < done.bytes_after


def test_existing_output_is_left_untouched_with_force(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("the old output")
    fill_disk_after(monkeypatch, 40)
    result = without_progress(run("quantize", tiny_model_dir, *QUANTIZE, "-o", out, "--force"))
    assert_one_line_error(result, f"{out}: no space left on device")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "the old output"
    assert leftovers(tmp_path, "q") == [".q.quantkit-work"]  # the finished layer, kept for --resume


def test_saved_logits_disk_full(tiny_model_dir, tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text()[:1500])
    fill_disk_after(monkeypatch, 6)
    qkl = tmp_path / "base.qkl"
    result = without_progress(run("eval", tiny_model_dir, "--dataset", text, "--seq-len", 32, "--no-speed",
                                  "--save-logits", qkl))
    assert_one_line_error(result, f"{qkl}: no space left on device after writing ", "about ", "--top-k")
    assert not qkl.exists() and not leftovers(tmp_path, "base.qkl")


@pytest.mark.parametrize("target", ["file", "dir"])
def test_atomic_writes_turn_disk_full_into_one_line(tmp_path, monkeypatch, target):
    """Reports (atomic_file) and model directories (atomic_dir, save_model): fsync is where a full disk shows
    up last (delayed allocation); the temporary is removed and the old content kept."""
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("quantkit.io.files.fsync_file", full)
    dest = tmp_path / ("report.json" if target == "file" else "model")
    if target == "file":
        dest.write_text("old")
        with pytest.raises(QuantkitError, match=rf"^{re.escape(str(dest))}: no space left on device after writing "
                                                rf"3\.0 MB \(\d+\.\d [MG]B free on /.*\): free space"):
            write_text(dest, "x" * 3_000_000)
        assert dest.read_text() == "old"
    else:
        with pytest.raises(DiskFull, match=r": free space or write it elsewhere$"):
            save_model(random_model(tiny_config()), dest, tokenizer_dir=DEMO_MODEL)
        assert not dest.exists()
    assert not leftovers(tmp_path, dest.name)


def test_other_os_errors_are_not_disk_full(tmp_path):
    with pytest.raises(QuantkitError, match="out: cannot write there: permission denied") as raised:
        with atomic_dir(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert not isinstance(raised.value, DiskFull)
    assert not leftovers(tmp_path, "out")


def test_eval_report_disk_full_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text((DEMO_MODEL / "test.txt").read_text()[:600])

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("quantkit.io.files.fsync_file", full)
    report = tmp_path / "r.json"
    result = without_progress(run("eval", tiny_model_dir, "--dataset", text, "--seq-len", 32, "--no-speed",
                                  "--report", report))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "perplexity" in result.output  # the results are printed before the report fails
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {report}: no space left on device after writing ")
    assert result.output.rstrip().endswith(errors[0])
    assert not report.exists()
