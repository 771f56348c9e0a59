"""quantkit.io.files: a file or a directory appears complete or not at all; failures and SIGTERM leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import quantkit.io.files
from quantkit.errors import QuantkitError
from quantkit.io.files import Terminated, atomic_dir, atomic_file, write_text

def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# -- atomic_file / write_text ---------------------------------------------------------------------------


def test_atomic_file_replaces_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert path.read_text() == "old", "the destination is untouched until the block ends"
    assert path.read_text() == "new" and listing(tmp_path) == ["out.txt"]


def test_atomic_file_creates_a_new_file(tmp_path):
    with atomic_file(str(tmp_path / "new.bin")) as tmp:  # a str path works too
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01" and listing(tmp_path) == ["new.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt(), Terminated("signal 15")])
def test_atomic_file_failure_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise error
    assert path.read_text() == "old" and listing(tmp_path) == ["out.txt"]


def test_atomic_file_failure_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert listing(tmp_path) == []


def test_write_text(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    write_text(path, "é new\n")
    assert path.read_text(encoding="utf-8") == "é new\n" and listing(tmp_path) == ["report.md"]


def test_write_text_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_text(path, b"not text")  # fails inside the block, after the temporary exists
    assert path.read_text() == "old" and listing(tmp_path) == ["report.md"]


def test_atomic_file_into_a_missing_directory(tmp_path):
    with pytest.raises(QuantkitError, match="missing/out.txt: cannot write there: no such file or directory"):
        write_text(tmp_path / "missing" / "out.txt", "x")
    assert listing(tmp_path) == []


def test_write_text_gets_the_umask_mode(tmp_path, umask_022):
    write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    os.umask(0o077)
    write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    write_text(tmp_path / "a.txt", "x")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d"):
            raise RuntimeError
    assert signal.getsignal(signal.SIGTERM) is before


# -- atomic_dir -----------------------------------------------------------------------------------------


def test_atomic_dir_creates(tmp_path, umask_022):
    out = tmp_path / "parent" / "model"  # a missing parent is created
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".model.") and tmp.name.endswith(".tmp")
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        assert not out.exists()
    assert listing(out) == ["config.json", "sub"] and (out / "sub" / "w.bin").read_bytes() == b"w"
    assert listing(out.parent) == ["model"]
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_refuses_an_existing_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuantkitError, match="already exists: choose another output or pass --force"):
        with atomic_dir(out):
            pytest.fail("the block must not run")
    assert listing(out) == ["keep.txt"] and listing(tmp_path) == ["model"]


def test_atomic_dir_overwrite_replaces(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert listing(out) == ["old.txt"], "the old directory stays until the new one is complete"
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["model"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_dir_failure_leaves_nothing(tmp_path, overwrite):
    out = tmp_path / "model"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == (["model"] if overwrite else [])  # no .model.*.tmp beside it
    if overwrite:
        assert listing(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"


# -- SIGTERM: a killed writer leaves nothing half-written ----------------------------------------------

# quantkit.io.files needs only quantkit.errors: the package is stubbed so that the child skips quantkit/__init__'s torch
# import (seconds) and is inside the block within a fraction of a second.
WRITER = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    package = types.ModuleType("quantkit")
    package.__path__ = [sys.argv[4]]
    sys.modules["quantkit"] = package
    from quantkit.io.files import atomic_dir, atomic_file
    kind, target, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with (atomic_dir(target, overwrite=True) if kind == "dir" else atomic_file(target)) as tmp:
        (tmp / "part.bin" if kind == "dir" else tmp).write_bytes(b"half")
        ready.touch()
        time.sleep(30)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigterm_leaves_nothing_behind(tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    target, ready = work / "out", tmp_path / "ready"
    if kind == "dir":
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_text("old")
    package = Path(quantkit.io.files.__file__).parent
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), str(ready), str(package)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the writer never got into the block"
            time.sleep(0.01)
        assert len(listing(work)) == 2, "the temporary exists beside the target while writing"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "finished" not in out
    assert "Terminated" in err, err  # raised inside the block, so the cleanup ran
    assert listing(work) == ["out"], "no temporary left beside the target"
    if kind == "dir":
        assert listing(target) == ["old.txt"] and (target / "old.txt").read_text() == "old"
    else:
        assert target.read_text() == "old"
