"""Every method x format through `quantkit check`: what each runtime that serves the file adds to quantkit's numbers.

    QUANTKIT_GPTQMODEL_PYTHON=$(.ci/gptqmodel-venv.sh | tail -n 1) \\
        .venv/bin/python bench/bench_check.py ../shared/models/tiny-llama2-mha [--windows 4 --seq-len 256]

For each case it runs `quantkit quantize MODEL ... -o WORK/CASE` (calibrated methods on MODEL/train.txt, 128 x 256
tokens) and `quantkit check WORK/CASE --base MODEL --dataset MODEL/test.txt --json`, then prints one Markdown table:
per case and runtime, its dtype, KL against quantkit's fp32 model (and what it adds beyond its dtype's noise floor,
the "quantkit bfloat16 (noise floor)" row), KL and top-1 against the base, and what the runtime applied.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CALIB = ["--calib", "{model}/train.txt", "--n-samples", "128", "--seq-len", "256"]
CASES: dict[str, list[str]] = {
    "int4 g128 / compressed-tensors": ["--method", "int4", "--group-size", "128", "--format", "compressed-tensors"],
    "int4 g128 / gptq": ["--method", "int4", "--group-size", "128", "--format", "gptq"],
    "rtn w4 g128 sym / compressed-tensors": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym"],
    "rtn w4 g128 sym / gptq": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--format", "gptq"],
    "rtn w8 per-channel asym / gptq": ["--method", "rtn", "--bits", "8", "--group-size", "-1", "--asym",
                                       "--format", "gptq"],
    "gptq w4 g128 / gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", *CALIB],
    "gptq w4 g128 / compressed-tensors": ["--method", "gptq", "--bits", "4", "--group-size", "128", *CALIB,
                                          "--format", "compressed-tensors"],
    "gptq w4 g128 act-order / gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order", *CALIB],
    "gptq w3 g128 / gptq": ["--method", "gptq", "--bits", "3", "--group-size", "128", *CALIB],
    "bnb-nf4 / bnb": ["--method", "bnb-nf4"],
    "bnb-fp4 / bnb": ["--method", "bnb-fp4"],
    "bnb-int8 / bnb": ["--method", "bnb-int8"],
}


def quantkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("quantkit")), *args], capture_output=True, text=True)


def applied(row: dict) -> str:
    if "arithmetic" in row:
        return row["arithmetic"]
    a = row.get("applied")
    if not a:
        return row.get("message", "")
    kernels = ", ".join(f"{n} {cls}" for cls, n in a["kernels"].items())
    return f"{a['quantized']}/{a['linears']} quantized ({kernels}), act-order in {a['act_order_modules']}"


def table_rows(case: str, report: dict) -> list[str]:
    lines = []
    for row in report["rows"]:
        vq, vb = row.get("vs_quantkit") or {}, row.get("vs_base") or {}
        kl = (f"{vq['kl_mean']:.2e}" + (f" (+{vq['added_kl']:.1e})" if "added_kl" in vq else "")) if vq else ("reference" if row["runtime"] == "quantkit"
                                                                        else row["status"])
        base = f"{vb['kl_mean']:.3e}" if vb else ""
        top1 = f"{100 * vb['top1']:.2f}" if vb else ""
        verdict = {True: "ok", False: "FAILS", None: ""}[row["passed"]]
        lines.append(f"| {case} | {row['runtime']} | {row.get('dtype', '')} | {kl} | {base} | {top1} | "
                     f"{applied(row)} | {verdict} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--windows", default="4")
    ap.add_argument("--seq-len", default="256")
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-check-"))
    print(f"load average {os.getloadavg()[0]:.2f}; GPTQModel: {os.environ.get('QUANTKIT_GPTQMODEL_PYTHON', 'not set')}",
          file=sys.stderr)
    lines = ["| case | runtime | dtype | KL vs quantkit (added) | KL vs base | top-1 vs base (%) | applied | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, (case, flags) in enumerate(CASES.items()):
        if a.cases not in case:
            continue
        out = work / f"case{i}"
        q = quantkit("quantize", str(a.model), *[f.format(model=a.model) for f in flags], "-o", str(out))
        if q.returncode:
            lines.append(f"| {case} | quantize failed: {q.stderr.strip().splitlines()[-1]} | | | | | | |")
            continue
        c = quantkit("check", str(out), "--base", str(a.model), "--dataset", str(a.model / "test.txt"),
                     "--seq-len", a.seq_len, "--windows", a.windows, "--json")
        if "{" not in c.stdout:
            lines.append(f"| {case} | check failed: {(c.stderr.strip().splitlines() or ['?'])[-1]} | | | | | | |")
            continue
        report = json.JSONDecoder().raw_decode(c.stdout[c.stdout.index("{"):])[0]
        lines += table_rows(case, report)
        print(f"{case}: exit {c.returncode}", file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
