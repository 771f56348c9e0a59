"""The sha256 manifest of a written directory: the one home for it.

Every directory quantkit writes (quantize, save_quantized, save_model) ends with `quantkit_manifest.json`:
{"format": "quantkit-manifest", "version": 1, "files": {relative path: {"size": bytes, "sha256": hex}}} for
every file in the directory but itself and hidden ones (a name starting with "."), sorted. It is written last,
inside the atomic directory before the rename, so a manifest means the directory was complete when written.

`manifest_problems` says every way a directory differs from its manifest (for `quantkit verify`);
`check_intact` raises on the first (for loading). Hidden files (`.DS_Store`, huggingface_hub's `.cache/`)
are neither listed nor checked: the OS and download tools put them there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.io.files import write_text

MANIFEST_FILE = "quantkit_manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "quantkit-manifest", 1
CHUNK = 16 << 20  # bytes hashed at a time: memory stays flat whatever the file size
READ_SUFFIXES = (".safetensors", ".json", ".bin", ".model")  # what loaders read: an unlisted one changes the model
FIX = ("the file is damaged or was changed after quantkit wrote it: copy or quantize it again (changed on "
       f"purpose? then delete {MANIFEST_FILE})")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(directory: Path) -> Iterator[str]:
    """Relative POSIX paths of the files a manifest covers: all but itself and hidden ones, sorted."""
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if rel.as_posix() == MANIFEST_FILE or any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            yield rel.as_posix()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write `directory`/quantkit_manifest.json for the files in it now; call it after the last other file."""
    directory = Path(directory)
    files = {rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
             for rel in _listed_files(directory)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return directory / MANIFEST_FILE


def read_manifest(directory: str | os.PathLike) -> dict[str, dict] | None:
    """relative path -> {"size", "sha256"} from the directory's manifest; None if it has none."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise QuantkitError(f"{path}: not valid JSON ({type(e).__name__}): {FIX}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("files"), dict)):
        raise QuantkitError(f"{path}: not a {MANIFEST_FORMAT} version {MANIFEST_VERSION}: {FIX}")
    files = manifest["files"]
    for rel, entry in files.items():
        if (not isinstance(entry, dict) or type(entry.get("size")) is not int or not isinstance(entry.get("sha256"), str)
                or Path(rel).is_absolute() or ".." in Path(rel).parts):
            raise QuantkitError(f"{path}: entry {json.dumps(rel)} is not a file inside the directory with its "
                                f"size and sha256: {FIX}")
    return files


def manifest_problems(directory: str | os.PathLike, hashes: bool = True,
                      files: dict[str, dict] | None = None) -> list[tuple[str, str]]:
    """Every way `directory` differs from its manifest (`files`, read if not given) as (relative path, one-line
    message naming the file): missing, another size, another sha256 (if `hashes`), or not listed."""
    directory = Path(directory)
    files = read_manifest(directory) if files is None else files
    if files is None:
        return []
    problems = []
    for rel, entry in sorted(files.items()):
        problem = _file_problem(directory / rel, entry, hashes)
        if problem is not None:
            problems.append((rel, f"{directory / rel}: {problem}"))
    problems += [(rel, f"{directory / rel}: not listed in {MANIFEST_FILE}: it was added after quantkit wrote the "
                       f"directory: remove it (added on purpose? then delete {MANIFEST_FILE})") for rel in _listed_files(directory) if rel not in files]
    return problems


def _file_problem(path: Path, entry: dict, hashes: bool) -> str | None:
    if not path.is_file():
        return f"listed in {MANIFEST_FILE} but missing: {FIX}"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{size} bytes, but {MANIFEST_FILE} says {entry['size']} (truncated, or changed): {FIX}"
    if hashes and sha256_file(path) != entry["sha256"]:
        return f"sha256 differs from {MANIFEST_FILE}: {FIX}"
    return None


def check_intact(directory: str | os.PathLike, hashes: bool = True):
    """Raise a one-line QuantkitError for the first file that differs from the manifest (no manifest: nothing
    to check). What loading needs, not all `quantkit verify` reports: a listed file that was deleted is left
    to the loaders (a missing shard or config.json is their error; a deleted tokenizer.model is not the
    weights'), and an unlisted file counts only if a loader reads it (weights, JSON, tokenizer.model)."""
    directory = Path(directory)
    files = read_manifest(directory)
    if files is None:
        return
    problems = [message for rel, message in manifest_problems(directory, hashes, files)
                if (directory / rel).exists() and (rel in files or rel.endswith(READ_SUFFIXES))]
    if problems:
        more = f" ({len(problems) - 1} more: run quantkit verify {directory})" if len(problems) > 1 else ""
        raise QuantkitError(problems[0] + more)
