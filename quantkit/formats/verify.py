"""`quantkit verify DIR`: is a model directory exactly what was written, and does it make sense?

Three checks, every problem reported (not only the first), each one line naming the file and, where there is
one, the tensor:

(a) the manifest (quantkit_manifest.json, see quantkit.io.manifest): every listed file present with its size and
    sha256, and no unlisted file (hidden ones, such as .DS_Store, excepted). A directory without one (another
    tool's, or quantkit's before manifests) is a warning: (b) and (c) still run.
(b) every tensor's shape and dtype against config.json and the format: open_checkpoint validates the dense
    tensors from the headers; each quantized module's tensors are checked by its format.
(c) the quantization parameters: finite positive scales, symmetric zero points at 2^(bits-1), no stray bits in
    packed words, act-order group maps that use every group as often as the plain map does; bitsandbytes'
    absmax and maps finite.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import is_gguf, verify_gguf
from quantkit.formats.reader import QuantizedCheckpoint, open_checkpoint
from quantkit.io.manifest import MANIFEST_FILE, manifest_problems, read_manifest
from quantkit.model.hub import resolve_model_dir
from quantkit.model.layout import checkpoint_shapes

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    directory: str
    manifest: bool  # whether the directory has a manifest (else files were not checked, only tensors)
    files: int = 0  # files checked against the manifest
    tensors: int = 0  # tensors whose headers (and, for quantized modules, values) were checked
    problems: list[str] = field(default_factory=list)  # one line each, naming the file (and tensor)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The one line `quantkit verify` prints when nothing is wrong."""
        files = f"{self.files} files, " if self.manifest else f"no {MANIFEST_FILE} (file checksums not checked), "
        return f"{self.directory}: {files}{self.tensors} tensors verified"

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def verify_dir(path: str | os.PathLike) -> VerifyReport:
    """Check a model directory (dense or quantized) against its manifest, its config.json and its format; or a .gguf
    file against its own header (quantkit.formats.gguf.verify_gguf: GGUF has no checksums)."""
    if is_gguf(path):
        tensors, problems = verify_gguf(Path(path))
        return VerifyReport(str(path), manifest=False, tensors=tensors, problems=problems)
    directory = resolve_model_dir(path)
    report = VerifyReport(str(directory), manifest=(directory / MANIFEST_FILE).is_file())
    _check_files(directory, report)
    try:
        ckpt = open_checkpoint(directory)  # dense shapes and dtypes from the headers; a truncated file stops here
    except QuantkitError as e:
        if not any(str(e).startswith(p) for p in report.problems):  # not a manifest problem said already
            report.problems.append(str(e))
        report.problems.append(f"{directory}: the tensors could not be checked until the problem above is fixed")
        return report
    report.tensors = len(ckpt.weight_map)
    report.problems += _module_problems(ckpt)
    return report


def _check_files(directory, report: VerifyReport):
    if not report.manifest:
        report.warnings.append(f"{directory}: no {MANIFEST_FILE} (written by another tool, or by quantkit before "
                               f"manifests): the files' checksums cannot be checked, only the tensors")
        return
    try:
        files = read_manifest(directory)
    except QuantkitError as e:
        report.problems.append(str(e))
        return
    report.files = len(files)
    report.problems += [message for _, message in manifest_problems(directory, hashes=True, files=files)]


def _module_problems(ckpt: QuantizedCheckpoint) -> list[str]:
    """Every quantized module's problems, each prefixed with the file(s) holding it."""
    if not ckpt.quantized_modules:
        return []
    shapes = checkpoint_shapes(ckpt.config)
    problems = []
    for name in sorted(ckpt.quantized_modules):
        tensors = ckpt.module_tensors(name)
        found = ckpt.format.check_module_tensors(name, tensors, ckpt.quantization_config, shapes[f"{name}.weight"])
        problems += [f"{ckpt.module_files(name)}: {p}" for p in found]
    log.info("%s: checked %d quantized modules", ckpt.dir, len(ckpt.quantized_modules))
    return problems
