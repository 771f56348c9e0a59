"""Where a model directory comes from: a local path, or a hub id fetched through huggingface_hub; and the one rule
for the files a directory (or its index) names: inside the directory, or inside a hub cache snapshot's blobs."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from quantkit.errors import QuantkitError
from quantkit.model.config import printable, shown


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; a hub id ('meta-llama/Llama-2-7b-hf') through huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise QuantkitError(f"{path}: is a file, not a model directory: pass the directory holding config.json")
    text = str(path_or_id)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is None:
        raise QuantkitError(f"{path}: no such model directory: pass a directory holding config.json")
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QuantkitError(f"{repo_id}: no such directory, and huggingface_hub is not installed to fetch it "
                            f"from the hub: pass a local directory") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth and not-found errors all mean the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"{repo_id}: no such directory, and the Hugging Face hub could not provide it "
                            f"({reason}): download it elsewhere and pass a local directory") from None


HUB_SHARED_BLOBS_MARKER = ".huggingface-shared-blobs"  # huggingface_hub's cache-wide blob store (Xet files)


def confined_path(model_dir: Path, entry: str, source: Path) -> Path:
    """model_dir / entry, refused (before anything is opened) if it, or a symlink it goes through, leaves the
    model directory; a hub cache snapshot's symlinks into its repo's blobs/ are allowed."""
    parts = PurePosixPath(entry).parts
    if PurePosixPath(entry).is_absolute() or Path(entry).is_absolute() or ".." in parts or "\\" in entry:
        raise QuantkitError(f"{source}: weight file {shown(entry)} is outside the model directory {model_dir}: "
                            f"an index may name files inside it only")
    path = model_dir / entry
    try:
        real, roots = path.resolve(), allowed_roots(model_dir)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise QuantkitError(f"{printable(str(path))}: cannot be resolved ({type(e).__name__}): a symlink loop? "
                            f"replace it with the file") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise QuantkitError(f"{printable(str(path))}: leads through a symlink to {printable(str(real))}, "
                            f"outside the model directory {model_dir}: copy the file into the directory")
    return path

def allowed_roots(model_dir: Path) -> list[Path]:
    """The model directory, and for a hub cache snapshot (models--org--name/snapshots/REV) that repo's
    blobs/ (and the cache-wide shared blob store those may link into)."""
    real = model_dir.resolve()
    roots = [real]
    repo = real.parent.parent
    if real.parent.name == "snapshots" and repo.name.startswith("models--"):
        roots.append((repo / "blobs").resolve())
        shared = repo.parent / "blobs"
        if (shared / HUB_SHARED_BLOBS_MARKER).is_file():
            roots.append(shared.resolve())
    return roots
