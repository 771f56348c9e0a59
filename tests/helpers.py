"""Helpers shared by the test modules (which never import one another; fixtures live in the conftest files): the
command line in-process and what a one-line error looks like, toy linears and backends, affine weights and the
reference decoders of the formats, files and digests, a toy tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

from quantkit.backends import BACKENDS, QuantConfig
from quantkit.backends.bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from quantkit.entry import command_line
from quantkit.quant.affine import AffineWeight, quantize_weight

PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: '... 3/15 [00:01<00:04, ...]'


def run(*args):
    """`quantkit ARGS` in-process (every command, `plan` included; stderr is mixed into `.output`). `.lines`: the
    output's non-empty lines without tqdm's progress bars."""
    result = CliRunner().invoke(command_line(), [str(a) for a in args])
    result.lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip() and not PROGRESS.search(line)]
    return result


def torchrun(*args, nproc: int = 2, timeout: int = 300, popen: bool = False, dist_timeout: int = 120):
    """`torchrun --standalone --nproc-per-node N -m quantkit ARGS` (one thread per rank: a single process's numbers
    at one thread); `popen`: started, not waited for (a subprocess.Popen with stdout and stderr piped)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTKIT_DIST_TIMEOUT_S": str(dist_timeout)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "quantkit", *map(str, args)]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def torchrun_rank(proc, rank: int, wait: float = 120):
    """The psutil.Process of rank `rank` of a `torchrun(..., popen=True)` once every rank has started (its RANK)."""
    import time

    import psutil

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "quantkit" in " ".join(p.cmdline())}
        if len(ranks) >= 2 and str(rank) in ranks:
            return ranks[str(rank)]
        time.sleep(0.2)
    raise AssertionError(f"torchrun never started rank {rank}")


def torchrun_errors(result) -> list[str]:
    """The `Error: ...` lines of a torchrun(...) run, stdout and stderr (every rank's)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error:")]


def without_progress(result):
    """The result with tqdm's progress bars (stderr, closed before the error) taken out of its output."""
    lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip() and not PROGRESS.search(line)]
    return SimpleNamespace(exit_code=result.exit_code, output="\n".join(lines))


def assert_one_line_error(result, *needles):
    """Exit 1 and an output of exactly one line, `Error: ...`, holding every needle."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def one_line_error(result, *needles) -> str:
    """Exit 1 and exactly one `Error: ...` line holding every needle, among other output (warnings), no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    return BACKENDS.for_config(config).handler(linear, config, "toy")


def toy_linear(out_features: int, in_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    return linear.eval()


LINEAR_SHAPES = [(128, 256), (256, 128)]  # (out_features, in_features)


BNB_CONFIGS = [BnbInt8Config(threshold=0.0), BnbInt8Config(threshold=6.0)] + [
    cls(double_quant=dq, blocksize=bs) for cls in (BnbNF4Config, BnbFP4Config) for dq in (True, False)
    for bs in (64, 128)]


def decompress_with_compressed_tensors(path) -> dict[str, torch.Tensor]:
    """The dense state dict compressed-tensors makes of an export: its own matching picks each module's
    scheme (apply_quantization_config on a transformers Llama), its own compressor decompresses."""
    import transformers
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    apply_quantization_config(skeleton, QuantizationConfig.model_validate(config["quantization_config"]))
    tensors = load_file(path / "model.safetensors")
    dense = {}
    for name, module in skeleton.named_modules():
        own = {k.removeprefix(name + "."): t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            own = PackedQuantizationCompressor.decompress(own, scheme)
            own = {k: v for k, v in own.items() if k in ("weight", "bias")}
        dense.update({f"{name}.{k}": v for k, v in own.items()})
    return dense


@dataclass
class GPTQLike:
    """A stand-in for the coming GPTQ backend's config: the attributes the formats read."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True

    def describe(self) -> str:
        return f"gptq(bits={self.bits}, desc_act={self.desc_act}, static_groups={self.static_groups})"


def relative(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensor names -> the module-relative keys load_module takes."""
    return {key.removeprefix(name + "."): t for key, t in tensors.items()}


def assert_same_affine(a: AffineWeight, b: AffineWeight):
    assert (a.bits, a.group_size, a.symmetric) == (b.bits, b.group_size, b.symmetric)
    for field in ("q", "scale", "zero"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field
    assert (a.g_idx is None) == (b.g_idx is None)
    assert a.g_idx is None or torch.equal(a.g_idx, b.g_idx)


def make_affine(n: int, k: int, bits: int, group_size: int, symmetric: bool, act_order: bool = False,
                seed: int = 0) -> AffineWeight:
    """A quantized random (N, K) weight. With act_order its groups are random sets of group_size columns,
    as GPTQ's desc_act makes them: g_idx is a permutation of column // group_size."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    perm = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    a = quantize_weight(w[:, perm], bits, group_size, symmetric)  # contiguous groups in the permuted order
    inv = torch.argsort(perm)  # original column j sits at permuted position inv[j]
    g_idx = (torch.arange(k) // a.group_size)[inv].to(torch.int32) if act_order else None
    return AffineWeight(q=a.q[:, inv].contiguous(), scale=a.scale, zero=a.zero, bits=bits, group_size=a.group_size,
                        symmetric=symmetric, g_idx=g_idx)


def unpack_columns(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 (W, C) packed down each column -> (count, C): value i takes bits [i*b, i*b + b) of the column's
    stream, word w holding stream bits [32w, 32w + 32), least significant first."""
    u = words.to(torch.int64) & 0xFFFFFFFF  # the words as unsigned 32-bit
    out = torch.zeros(count, words.shape[1], dtype=torch.int64)
    for i in range(count):
        word, shift = divmod(i * bits, 32)
        value = u[word] >> shift
        if shift + bits > 32:  # straddles into the next word (3 bits)
            value = value | (u[word + 1] << (32 - shift))
        out[i] = value & (2**bits - 1)
    return out


def file_tensors(model_dir):
    """Every tensor stored under model_dir, by name, as read back from the files."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


METHODS = {"int4": ("--method", "int4", "--group-size", 32),
           "rtn-gptq-format": ("--method", "rtn", "--bits", 3, "--group-size", 32, "--format", "gptq"),
           "gptq": ("--method", "gptq", "--bits", 4, "--group-size", 32, "--n-samples", 8, "--seq-len", 32),
           "awq": ("--method", "awq", "--bits", 4, "--group-size", 32, "--n-samples", 8, "--seq-len", 32),
           "gptq-awq": ("--method", "gptq", "--awq", "--bits", 4, "--group-size", 32, "--n-samples", 8, "--seq-len", 32)}
# flags of a resumable run, by name; the calibrated ones take --calib (method_args)
CALIBRATED = ("gptq", "awq", "gptq-awq")


def method_args(method: str, tokens: Path) -> tuple:
    return METHODS[method] + (("--calib", tokens) if method in CALIBRATED else ())


LAYERS = 6


class ToyTokenizer:
    """Characters as ids, BOS = 1: every token's position is visible in the text."""

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [3 + (ord(c) % 60) for c in text]

    def check_ids(self, ids, vocab_size):  # quantkit.model.Tokenizer's: every id here is below 64
        assert int(max(ids)) < vocab_size
