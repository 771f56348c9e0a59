"""Every write quantkit does turns an OS error into one line naming the path and the fix, exit 1, checked before the
work where it can be; a command whose results are ready prints them before it says a file could not be written."""

import errno
import os
import subprocess

import pytest

from quantkit.errors import QuantkitError
from quantkit.io.files import atomic_file, check_writable, write_error
from tests.conftest import DEMO_MODEL
from tests.helpers import assert_one_line_error, run


@pytest.fixture
def read_only(tmp_path):
    """A directory quantkit cannot write: a read-only tmpfs where this process may mount one (root, as in CI
    containers), else a directory without write permission (not root)."""
    where = tmp_path / "ro"
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without CAP_SYS_ADMIN: no read-only filesystem to try (test_write_error_* still run)")
        where.chmod(0o555)
    yield where
    if mounted:
        subprocess.run(["umount", str(where)], check=True)
    else:
        where.chmod(0o755)


NEEDLES = ("cannot write there", "read-only file system" if os.geteuid() == 0 else "permission denied")
EVAL = ("--dataset", DEMO_MODEL / "test.txt", "--seq-len", 64)


@pytest.mark.parametrize("where", ["out", "sub/dir/out"])
@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_an_output_on_a_read_only_filesystem_is_one_line(tiny_model_dir, read_only, command, where):
    result = run(command, tiny_model_dir, "--method", "int4", "--group-size", 32, "-o", read_only / where)
    assert_one_line_error(result, str(read_only), *NEEDLES)


def test_save_logits_on_a_read_only_filesystem_is_refused_before_the_model_runs(tiny_model_dir, read_only,
                                                                                 monkeypatch):
    import quantkit.eval.base_logits as base_logits

    monkeypatch.setattr(base_logits, "window_logprobs", None)  # never reached: refused first
    result = run("eval", tiny_model_dir, *EVAL, "--save-logits", read_only / "base.qkl")
    assert_one_line_error(result, read_only / "base.qkl", *NEEDLES)


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_report_on_a_read_only_filesystem_is_refused_before_the_work(tiny_model_dir, read_only, command):
    models = (tiny_model_dir, tiny_model_dir) if command == "compare" else (tiny_model_dir,)
    result = run(command, *models, *EVAL, "--report", read_only / "r.html")
    assert_one_line_error(result, read_only / "r.html", *NEEDLES)


def test_results_are_printed_before_a_report_that_cannot_be_written(tiny_model_dir, read_only, tmp_path, monkeypatch):
    """A write that fails after the work (the filesystem went read-only mid-run): the table is on stdout, the
    other report is written, then one error line, exit 1."""
    import quantkit.eval.report as report

    monkeypatch.setattr(report, "check_writable", lambda path: None)  # as if it was writable when the run began
    result = run("eval", tiny_model_dir, *EVAL, "--report", read_only / "r.json", "--report", tmp_path / "ok.md")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(read_only / "r.json") in errors[0] and "Traceback" not in result.output
    assert "perplexity" in result.output.lower() and (tmp_path / "ok.md").is_file()
    assert result.output.index("report written to") < result.output.index("Error:")


@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_a_name_too_long_for_the_temporary_is_refused_up_front(tiny_model_dir, tmp_path, command):
    name = "q" * 240  # fits the 255-byte limit, but not with the temporary's 30 more characters
    result = run(command, tiny_model_dir, "--method", "int4", "--group-size", 32, "-o", tmp_path / name)
    assert_one_line_error(result, "file name too long", "choose a shorter name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_save_logits_into_a_missing_directory_is_one_line(tiny_model_dir, tmp_path):
    result = run("eval", tiny_model_dir, *EVAL, "--save-logits", tmp_path / "nodir" / "base.qkl")
    assert_one_line_error(result, tmp_path / "nodir", "no such file or directory", "create the directory first")


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                          (errno.EPERM, "not permitted"), (errno.ENOENT, "create the directory"),
                                          (errno.ENAMETOOLONG, "choose a shorter name"), (errno.EIO, "write elsewhere")])
def test_write_error_names_the_path_and_the_fix(tmp_path, code, needle):
    e = write_error(tmp_path / "out", OSError(code, os.strerror(code), str(tmp_path / ".out.quantkit-1-ab.tmp")))
    assert isinstance(e, QuantkitError) and str(e).startswith(f"{tmp_path / 'out'}: cannot write there")  # not the temp
    assert needle in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EIO])
def test_write_error_in_the_middle_of_an_atomic_write_leaves_nothing(tmp_path, monkeypatch, code):
    def fail(*args):
        raise OSError(code, os.strerror(code), args[0])

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(QuantkitError, match="cannot write there"):
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_accepts_a_writable_place_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b" / "out", make_parents=True)
    check_writable(tmp_path / "file.txt")
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_anywhere_in_a_command_is_one_line(tiny_model_dir, monkeypatch):
    import quantkit.cli.model

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tiny_model_dir / "model.safetensors"))

    monkeypatch.setattr(quantkit.cli.model, "load_model", fail)
    assert_one_line_error(run("generate", tiny_model_dir, "Hi"), "model.safetensors", "Input/output error")
