"""Atomic writes, the one home for them: a file or a directory appears complete, or not at all.

Everything quantkit writes goes through `atomic_file` (reports, caches, saved log-probs; `atomic_new_file` for a
model that is one file) or `atomic_dir` (model directories): the content is written under a hidden temporary name in the
destination's own directory (so the final rename never crosses a filesystem), flushed to disk, and
`os.replace`d into place. On any exception, on Ctrl-C and on SIGTERM (what schedulers and `kill`
send; turned into `Terminated` while a write is open) the temporary is removed and an existing
destination is left as it was. SIGKILL cannot be caught: temporaries are named for their process
(`.NAME.quantkit-PID-XXXX.tmp`), and the next write of NAME removes those whose process is gone. Running out of space (ENOSPC, EDQUOT) is a `DiskFull` QuantkitError: one
line with what was written and what is free, not an OSError traceback.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; disk quota exceeded


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def human_bytes(n: int) -> str:
    """Bytes for a message: '3.9 GB', or '4.2 MB' below 0.1 GB (decimal units, as disk sizes are sold)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def mount_point(path: Path) -> Path:
    """The mount point holding `path` (an existing path): where a message says space is free."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent: what shutil.disk_usage can measure for a directory not made yet."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# errno -> (what happened, the fix) for a write that failed: the one home of these messages.
WRITE_ERRORS = {
    errno.EROFS: ("read-only file system", "choose a location on a writable filesystem"),
    errno.EACCES: ("permission denied", "fix the directory's permissions or write elsewhere"),
    errno.EPERM: ("operation not permitted", "fix the directory's permissions or write elsewhere"),
    errno.ENOENT: ("no such file or directory", "create the directory first or fix the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
    errno.EISDIR: ("is a directory", "give a file name"),
    errno.ENAMETOOLONG: ("file name too long", f"choose a shorter name (quantkit writes a temporary named "
                                               f".NAME.quantkit-PID-XXXXXXXX.tmp beside it)"),
}


def write_error(path: str | os.PathLike, e: OSError) -> QuantkitError:
    """One line for an OSError met while writing `path`: the path it names, what happened and the fix.

    A full disk is DiskFull (with the space free); any other errno gets its strerror and "write elsewhere"."""
    if is_disk_full(e):
        return DiskFull(path, 0)
    what, fix = WRITE_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "write elsewhere"))
    path, named = Path(path), Path(os.fsdecode(e.filename)) if e.filename is not None else None
    ours = named is None or named == path or path in named.parents or named.parent == path.parent  # or a temporary
    return QuantkitError(f"{path if ours else named}: cannot write there: {what}"
                         f"{'' if ours else f' (while writing {path})'}: {fix}")


def os_error_line(e: OSError) -> str:
    """One line for an OSError that reached the command line outside the writers (which raise write_error's)."""
    if is_disk_full(e):
        return f"{e.filename or 'writing'}: {e.strerror}: free space or write elsewhere"
    what, fix = WRITE_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "check the path"))
    return f"{os.fsdecode(e.filename) if e.filename is not None else type(e).__name__}: {what}: {fix}"


def name_max(directory: Path) -> int:
    """The longest file name (bytes) the filesystem of an existing `directory` takes (255 where it cannot say)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable(path: str | os.PathLike, make_parents: bool = False):
    """Refuse, before any work, a destination quantkit could not write: a QuantkitError (write_error's line).

    The nearest existing parent (`make_parents`: the parents are created; else the parent itself must exist)
    must take a new file, tried with an anonymous temporary file that is never linked in; every name still to
    be created, and the temporary beside `path` that atomic writes use, must fit the filesystem's name length.
    """
    path = Path(path).absolute()
    where = nearest_existing(path.parent) if make_parents else path.parent
    if not where.is_dir():
        raise write_error(path, OSError(errno.ENOTDIR if where.exists() else errno.ENOENT,
                                        os.strerror(errno.ENOTDIR if where.exists() else errno.ENOENT), str(where)))
    longest = name_max(where)
    for name in [*path.relative_to(where).parts[:-1], temporary_for(path).name]:
        if len(os.fsencode(name)) > longest:
            raise write_error(path, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path)))
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise write_error(path, OSError(e.errno, e.strerror, str(where))) from None


class DiskFull(QuantkitError):
    """No space left on the device (or over quota) while writing `path`, after `written` bytes: one line with
    the space free there and, when the writer can estimate it, the space the whole output needs."""

    def __init__(self, path: str | os.PathLike, written: int, needed: int | None = None,
                 fix: str = "free space or write it elsewhere"):
        self.path, self.written, self.needed = Path(path), written, needed
        where = nearest_existing(self.path.parent)
        need = f"about {human_bytes(needed)} needed, " if needed else ""
        super().__init__(f"{path}: no space left on device after writing {human_bytes(written)} ({need}"
                         f"{human_bytes(shutil.disk_usage(where).free)} free on {mount_point(where)}): {fix}")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (what a failed write had put there)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class Terminated(BaseException):
    """SIGTERM arrived while quantkit was writing: raised so that cleanup runs, then exit 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()  # no message: whoever stops the work says what it left (the CLI: one line)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into a `Terminated` exception inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield  # None: a handler installed from C, which Python could not restore: leave it alone
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fsync_dir(path: Path):
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_for(path: Path) -> Path:
    """A new hidden temporary name beside `path`, naming this process: `.NAME.quantkit-PID-XXXXXXXX.tmp`."""
    return path.with_name(f".{path.name}.quantkit-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries for `path` that a killed quantkit process left (SIGKILL, a power loss): those
    whose process no longer runs. Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.quantkit-(\d+)-[0-9a-f]+\.tmp")
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.quantkit-*.tmp")
             if (m := pattern.fullmatch(p.name)) and not psutil.pid_exists(int(m[1]))]
    for p in stale:
        log.warning("%s: removed %s, left by an earlier quantkit run that was killed (process %s)", path, p.name,
                    pattern.fullmatch(p.name)[1])
        _remove(p)
    return stale


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends normally, it replaces `path` atomically.

    The caller writes the temporary however it likes (open, safetensors.save_file, a ShardWriter).
    """
    path = Path(path)
    tmp = temporary_for(path)
    try:
        remove_stale_temporaries(path)
        # O_EXCL: never reuse someone else's file; 0o666 lets the umask decide, as a plain open() would (mkstemp: 0600)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with terminate_as_exception():
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
    except OSError as e:
        raise (DiskFull(path, _size(tmp)) if is_disk_full(e) else write_error(path, e)) from None
    finally:
        tmp.unlink(missing_ok=True)  # after a successful replace there is nothing left to remove
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str):
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, keep=()):
    """Refuse an existing `out` unless overwrite, always an `out` that is, or holds, one of `keep` (the source), and
    one that cannot be written (check_writable: read-only, no permission, a name too long)."""
    out = Path(out)
    parent = nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise QuantkitError(f"{out}: {parent} is a file, not a directory: choose an output inside a directory")
    for path in keep:
        if path is not None and (out.resolve() == Path(path).resolve() or out.resolve() in Path(path).resolve().parents):
            raise QuantkitError(f"{out}: is (or holds) the source {path}, which writing there would destroy: "
                                f"choose another output")
    if out.exists() and not overwrite:
        raise QuantkitError(f"{out}: already exists: choose another output or pass --force to replace it")
    check_writable(out, make_parents=True)


@contextlib.contextmanager
def atomic_new_file(out: str | os.PathLike, overwrite: bool = False, keep=()) -> Iterator[Path]:
    """atomic_file for an output that is one file (a .gguf model): refused before anything is written as
    check_output_dir refuses a directory (an existing `out` unless overwrite, the source, an unwritable place), its
    parents made; an existing `out` is replaced only once the new file is complete."""
    out = Path(out)
    check_output_dir(out, overwrite, keep)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    with atomic_file(out) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, keep=()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`, renamed into place when the block ends normally.

    An existing `out` is refused unless overwrite=True; then it is replaced only once the new one is
    complete, so a failure never leaves a half-written directory nor loses the old one. An `out` that
    is or holds one of the `keep` paths (the source being read) is always refused.
    """
    out = Path(out)
    check_output_dir(out, overwrite, keep)
    tmp = temporary_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp.mkdir(0o777)  # the umask decides, as for a plain mkdir (mkdtemp's 0700 would make the output private)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        with terminate_as_exception():
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            _replace_dir(tmp, out)
    except OSError as e:
        raise (DiskFull(out, _size(tmp)) if is_disk_full(e) else write_error(out, e)) from None
    finally:
        if tmp.exists():
            _remove(tmp)
    fsync_dir(out.parent)


def _replace_dir(tmp: Path, out: Path):
    """Move tmp to out; an existing out is moved aside first and removed only after the move."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        _remove(old)
