"""`quantkit check`: does each runtime that serves an export compute what quantkit computes?

The same token windows run through quantkit's own model of OUT in fp32 (exact: dequantized weights, fp32 matmul),
through BASE (normally the fp16 original), through quantkit's int4 kernel where the file has 4-bit linears it fits,
and through every runtime that serves OUT's format:

    compressed-tensors  transformers (dequantized at load where asymmetric: llm-compressor#1618)
    bnb                 transformers (bitsandbytes' modules)
    gptq                GPTQModel (`GPTQModel.load`), and transformers through optimum + gptqmodel
    gguf                llama.cpp (llama-cpp-python), which also tokenizes the first window's text: it must give
                        the base tokenizer's ids (a .gguf carries its own vocabulary)

Each external runtime runs in a subprocess (`runtime_worker.py`, standalone: GPTQModel lives in its own
virtualenv, never a dependency of quantkit; its interpreter comes from QUANTKIT_GPTQMODEL_PYTHON), in the dtype
it serves (`SERVED_DTYPE`: GPTQ kernels on CPU compute in bf16) unless `dtype` says otherwise. Per runtime the
report gives KL(quantkit || runtime) per token (mean, max), top-1 agreement and max |dlogit| against quantkit's
model, the same KL and top-1 against BASE, and what the runtime applied (how many decoder linears are quantized
modules in it and their classes, how many keep an act-order g_idx, the lm_head's class). A runtime that is not
installed is reported with how to install it; one that refuses the file or crashes, with its own message.

What a runtime *adds* is its mean KL against quantkit's fp32 model beyond the noise floor of its dtype: the KL of
quantkit's own model of OUT computed in that dtype (dequantized weights rounded to it, its matmuls): rounding to
bf16 alone moves a peaked model's logits by about 1e-4 nats, as much as the default tolerance. `failed(report)`
is true when a runtime refused or crashed, or added more than `tolerance` nats.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quantkit.formats.reader import load_model
from quantkit.model.tokenizer import load_tokenizer
from quantkit.dtypes import SHORT_NAMES
from quantkit.errors import QuantkitError
from quantkit.eval.data import EvalData
from quantkit.eval.evaluate import check_same_tokenizer, ids_difference
from quantkit.eval.finite import check_numbers
from quantkit.formats.gguf import is_gguf
from quantkit.formats.reader import model_config, open_checkpoint
from quantkit.quant.linear import AffineLinear, arithmetic, int4_kernels

WORKER = Path(__file__).with_name("runtime_worker.py")
RUNTIMES = {"compressed-tensors": ("transformers",), "bnb": ("transformers",), "gptq": ("gptqmodel", "transformers"),
            "gguf": ("llama.cpp",)}
SERVED_DTYPE = {("gptq", "gptqmodel"): "bfloat16", ("gptq", "transformers"): "bfloat16"}  # default: float32
PYTHON_ENV = {"gptq": "QUANTKIT_GPTQMODEL_PYTHON",  # the interpreter of a format's runtimes, when not this one
              "gguf": "QUANTKIT_LLAMACPP_PYTHON"}
RUNTIME_PACKAGE = {"gptq": "gptqmodel", "gguf": "llama_cpp"}  # found beside quantkit when the variable is not set
INSTALL = {"transformers": "pip install transformers accelerate compressed-tensors bitsandbytes",
           "gptqmodel": "install GPTQModel in its own virtualenv (README, 'Checking the runtimes') and set "
                        "QUANTKIT_GPTQMODEL_PYTHON to its python",
           "llama.cpp": "pip install the llama-cpp-python wheel that .ci/llamacpp-wheel.sh builds (README, 'Checking "
                        "the runtimes'), or set QUANTKIT_LLAMACPP_PYTHON to a python that has it"}


@dataclass
class CheckOptions:
    tolerance: float = 1e-4  # nats of mean KL a runtime may add against quantkit's model
    windows: int = 4  # how many of the dataset's windows run (each runtime's logits are kept: windows x seq x vocab)
    runtime_dtype: str | None = None  # fp32 | bf16 | fp16 for every external runtime [default: the dtype each serves]
    timeout_s: float = 1800  # per runtime, load included
    progress: bool = True


def run_check(out, base, data: EvalData, options: CheckOptions | None = None) -> dict:
    """The check report of the quantized directory `out` against `base` on `data`'s first windows (see above)."""
    options = options or CheckOptions()
    fmt = quantized_format(out)
    runtime_python(fmt)  # a runtime interpreter that does not exist is refused before the work
    if fmt != "gguf":  # a GGUF's vocabulary is checked by llama.cpp's tokenization of the text (external)
        check_same_tokenizer(load_tokenizer(out), load_tokenizer(base), str(out), str(base))
    vocab, base_vocab = model_config(out).vocab_size, open_checkpoint(base).config.vocab_size
    if vocab != base_vocab:
        raise QuantkitError(f"{out} has a vocabulary of {vocab}, the base {base} {base_vocab}: check a model against "
                            f"the one it was quantized from")
    ids = window_ids(data, options.windows)
    model = load_model(out, dtype="fp32")
    reference = logits_of(model, ids, f"quantkit's model of {out}", options.progress)
    base_model = load_model(base, dtype="fp32")
    base_logits = logits_of(base_model, ids, f"the base {base}", options.progress)
    del base_model
    rows = [{"runtime": "quantkit", "status": "ok", "arithmetic": arithmetic(model), "dtype": "float32",
             "logits": reference}]
    if any(isinstance(m, AffineLinear) and m._int4_kernel_fits() for m in model.modules()):
        with int4_kernels(model):
            rows.append({"runtime": "quantkit int4 kernel", "status": "ok", "arithmetic": arithmetic(model),
                         "dtype": "bfloat16", "logits": logits_of(model, ids, "quantkit's int4 kernel",
                                                                    options.progress)})
    del model
    base_tokenizer = load_tokenizer(base)
    text = base_tokenizer.decode(ids[0].tolist()) if fmt == "gguf" else None
    external_rows = [external(runtime, fmt, out, ids, options, text) for runtime in RUNTIMES.get(fmt, ())]
    for row in external_rows:
        if text is not None and row["status"] == "ok":
            tokenizer_problem(row, base_tokenizer.encode(text, bos=True))
    dtypes = sorted({row["dtype"] for row in rows[1:] + external_rows} - {"float32"})
    rows += [floor_row(out, ids, dtype, options.progress) for dtype in dtypes] + external_rows
    floors = {row["dtype"]: row for row in rows if row.get("floor")}
    for row in sorted(rows, key=lambda r: not r.get("floor")):  # the floors first: the other rows subtract them
        score(row, reference, base_logits, floors, options.tolerance)
    return {"model": str(out), "base": str(base), "format": fmt, "dataset": data.describe(), "windows": len(ids),
            "seq_len": ids.shape[1], "tolerance": options.tolerance, "rows": rows}


def floor_row(out, ids: torch.Tensor, dtype: str, progress: bool) -> dict:
    """quantkit's model of `out` in `dtype` with dequantized weights: what that arithmetic alone moves the logits."""
    model = load_model(out, dtype=dtype)
    with int4_kernels(model, enabled=False):
        return {"runtime": f"quantkit {dtype} (noise floor)", "status": "ok", "floor": True, "dtype": dtype,
                "arithmetic": arithmetic(model), "logits": logits_of(model, ids, f"quantkit in {dtype}", progress)}


def score(row: dict, reference: torch.Tensor, base_logits: torch.Tensor, floors: dict, tolerance: float) -> None:
    """Fill a row's comparisons in place: against quantkit's fp32 model (KL beyond its dtype's noise floor) and the
    base; `passed` False when the runtime did not run its file or added more than `tolerance`."""
    logits = row.pop("logits", None)
    if logits is not None:
        row["vs_base"] = compare(base_logits, logits)
        if logits is not reference:
            vs = row["vs_quantkit"] = compare(reference, logits)
            if not row.get("floor"):
                floor = 0.0 if row["dtype"] == "float32" else floors[row["dtype"]]["vs_quantkit"]["kl_mean"]
                vs.update(floor_kl=floor, added_kl=max(0.0, vs["kl_mean"] - floor))
        check_numbers({k: v for k, v in row.items() if k.startswith("vs_")}, row["runtime"], "check")
    if row["status"] == "not installed" or row.get("floor") or row["runtime"] == "quantkit":
        row["passed"] = None
    else:
        row["passed"] = row["status"] == "ok" and row["vs_quantkit"]["added_kl"] <= tolerance


def failed(report: dict) -> bool:
    return any(row["passed"] is False for row in report["rows"])


def tokenizer_problem(row: dict, expected: list[int]) -> None:
    """A runtime that tokenizes the first window's text otherwise than the base's tokenizer: refused, with the first
    difference (a GGUF whose vocabulary is not its base's, or a runtime that reads it otherwise)."""
    got = row["applied"].pop("tokens")
    difference = ids_difference(got, expected)
    if difference is None:
        row["applied"]["tokenizer"] = f"same {len(got)} ids as the base's tokenizer"
        return
    row.update(status="refused",
               message=f"tokenizes the first window's text otherwise than the base's tokenizer: {difference}")


def quantized_format(out) -> str:
    if is_gguf(out):
        return "gguf"
    ckpt = open_checkpoint(out)
    if not ckpt.quantization_config:
        raise QuantkitError(f"{out}: not a quantized directory (its config.json has no quantization_config): check "
                            f"compares the runtimes that serve a quantized export; give a directory quantize wrote")
    return ckpt.format.name


def window_ids(data: EvalData, windows: int) -> torch.Tensor:
    """(W, T) token ids of the first `windows` windows."""
    if windows < 1:
        raise QuantkitError(f"--windows {windows}: give at least 1")
    chosen = data.windows[:windows]
    return torch.stack([data.ids[w.start: w.end] for w in chosen if w.end - w.start == data.seq_len])


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, label: str, progress: bool) -> torch.Tensor:
    """(W, T, vocab) fp32 logits, one window at a time."""
    rows = [model(row[None])[0].float() for row in tqdm(ids, desc=label, unit="window", disable=not progress)]
    return torch.stack(rows)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """KL(reference || logits) per token in nats (mean, max, in float64), top-1 agreement, max |dlogit|."""
    kls, top1 = [], []
    for ref, got in zip(reference, logits):  # one window at a time: float64 (T, vocab)
        p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0))
        top1.append(ref.argmax(-1) == got.argmax(-1))
    kl, same = torch.cat(kls), torch.cat(top1)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1": same.double().mean().item(),
            "max_dlogit": (reference - logits).abs().max().item()}


def external(runtime: str, fmt: str, out, ids: torch.Tensor, options: CheckOptions, text: str | None = None) -> dict:
    """One external runtime's row: its logits (popped by run_check) and what it applied, or why it did not run.
    text: for llama.cpp, what it tokenizes (applied["tokens"])."""
    name = runtime if runtime != "transformers" or fmt != "gptq" else "transformers + gptqmodel"
    dtype = SHORT_NAMES[options.runtime_dtype] if options.runtime_dtype else SERVED_DTYPE.get((fmt, runtime), "float32")
    row = {"runtime": name, "dtype": dtype}
    python = runtime_python(fmt)
    if python is None:
        return {**row, "status": "not installed", "message": f"{PYTHON_ENV[fmt]} is not set: {INSTALL[runtime]}"}
    with tempfile.TemporaryDirectory(prefix="quantkit-check-") as tmp:
        tokens, logits = Path(tmp) / "tokens.safetensors", Path(tmp) / "logits.safetensors"
        save_file({"ids": ids.contiguous()}, tokens)
        args = [runtime, os.path.abspath(out), os.fspath(tokens), os.fspath(logits), dtype]
        if text is not None:
            (Path(tmp) / "text.txt").write_text(text, encoding="utf-8")
            args.append(os.fspath(Path(tmp) / "text.txt"))
        result = run_worker(python, args, name, options, cwd=tmp)  # GPTQModel writes logs/ into its working directory
        if "missing" in result:
            return {**row, "status": "not installed",
                    "message": f"{result['missing']} is not installed for {python}: {INSTALL[runtime]}"}
        if "error" in result:
            return {**row, "status": "refused", "message": result["error"]}
        return {**row, "status": "ok", "applied": result, "logits": load_file(logits)["logits"]}


def runtime_python(fmt: str) -> str | None:
    """The interpreter holding the format's runtimes: the one its environment variable names, else this one where
    the runtime is importable here (GPTQModel or llama-cpp-python installed beside quantkit), else None (not
    installed)."""
    variable = PYTHON_ENV.get(fmt)
    if variable is None:
        return sys.executable
    python = os.environ.get(variable)
    if python and not os.access(python, os.X_OK):
        raise QuantkitError(f"{variable}={python}: no such interpreter: point it at the python of the virtualenv "
                            f"that holds {RUNTIME_PACKAGE[fmt]}, or unset it")
    if python:
        return python
    return sys.executable if importlib.util.find_spec(RUNTIME_PACKAGE[fmt]) is not None else None


def run_worker(python: str, args: list[str], name: str, options: CheckOptions, cwd: str) -> dict:
    """The worker's last stdout line (JSON); a crash or a timeout becomes {"error": ...} naming the runtime."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))}
    try:
        done = subprocess.run([python, "-I", os.fspath(WORKER), *args], capture_output=True, text=True, env=env,
                              timeout=options.timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"{name} did not finish in {options.timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"{name} crashed (exit status {done.returncode}): {tail}"}
    return result


def to_text(report: dict) -> str:
    """The report as a table, one row per runtime, then the runtimes' messages and the verdict."""
    lines = [f"{report['model']} ({report['format']}) against quantkit's fp32 model and the base {report['base']}: "
             f"{report['windows']} windows of {report['seq_len']} tokens of {report['dataset']['name']}",
             f"{'runtime':32} {'status':13} {'dtype':9} {'KL vs quantkit':>14} {'added':>9} {'KL max':>9} "
             f"{'top-1':>7} {'max|dlogit|':>11} {'KL vs base':>10} {'top-1 base':>10}  applied"]
    for row in report["rows"]:
        vq, vb = row.get("vs_quantkit") or {}, row.get("vs_base") or {}
        lines.append(f"{row['runtime']:32} {row['status']:13} {row.get('dtype', ''):9} "
                     f"{_num(vq.get('kl_mean')):>14} {_num(vq.get('added_kl')):>9} {_num(vq.get('kl_max')):>9} "
                     f"{_pct(vq.get('top1')):>7} {_num(vq.get('max_dlogit')):>11} {_num(vb.get('kl_mean')):>10} "
                     f"{_pct(vb.get('top1')):>10}  {_applied(row)}")
    lines += [f"{row['runtime']}: {row['message']}" for row in report["rows"] if row.get("message")]
    bad = [row["runtime"] for row in report["rows"] if row["passed"] is False]
    verdict = (f"FAILED: {', '.join(bad)}" if bad else "every runtime that ran is within the tolerance")
    lines.append(f"{verdict} (tolerance: {report['tolerance']:g} nats of mean KL added beyond the noise floor of the "
                 f"runtime's dtype)")
    return "\n".join(lines)


def _applied(row: dict) -> str:
    if "arithmetic" in row:
        return row["arithmetic"]
    a = row.get("applied")
    if not a:
        return ""
    kernels = ", ".join(f"{n} {cls}" for cls, n in a["kernels"].items())
    return (f"{a['version']}: {a['quantized']} of {a['linears']} decoder linears quantized ({kernels}); "
            f"act-order g_idx in {a['act_order_modules']}; lm_head {a['lm_head']}"
            f"{'; ' + a['tokenizer'] if 'tokenizer' in a else ''}")


def _num(x) -> str:
    return "" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}%"
