"""Prove a refactor leaves every exported tensor byte-identical.

Runs `python -m quantkit.cli quantize MODEL ... -o OUT --force` for each method x format case below
(same interpreter, inherited environment, cwd = a temporary directory so that only PYTHONPATH or the
installed package decides which quantkit runs) and records, per case, every tensor of every
*.safetensors file in OUT: name -> sha256 of its raw bytes, dtype, shape. The sha256 of the other
files (config.json, quantize_config.json, quantkit_errors.json) and each shard's __metadata__ are
recorded too, for information only: they may legitimately change; the tensors may not.

Baseline from the pre-refactor commit (a pristine worktree, imported through PYTHONPATH):

    git worktree add /tmp/qk-base ab623e9          # REPO: this checkout
    cd /tmp/qk-base && PYTHONPATH=/tmp/qk-base $REPO/.venv/bin/python $REPO/bench/check_exports.py \\
        --model $REPO/../shared/models/tiny-llama2-mha --write /tmp/export-baseline.json

Check the refactored tree (from the repo root, without PYTHONPATH: the editable install):

    .venv/bin/python bench/check_exports.py --model $REPO/../shared/models/tiny-llama2-mha \\
        --compare /tmp/export-baseline.json [--cases REGEX]

--compare prints a per-case table and exits 1 on any differing, missing or extra tensor (or a
failed case), 0 otherwise. Every quantize runs with OMP_NUM_THREADS=1 (GPTQ's float reductions
depend on torch's thread count: 1 vs 2 threads changes most GPTQ tensors) and a fresh QUANTKIT_CACHE
(calibration is tokenized anew each run). Compare on the machine that wrote the baseline (CPU kernels
may differ across instruction sets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib", "{model}/train.txt", "--n-samples", "16", "--seq-len", "128"]
RECIPE = """\
default: {method: int4, group_size: 128}
rules:
  - {pattern: 'mlp\\.down_proj$', config: {method: rtn, bits: 8, group_size: -1}}
ignore: ['layers\\.0\\.self_attn']
"""

CASES: dict[str, list[str]] = {
    "int4-g128-ct": ["--method", "int4", "--group-size", "128", "--format", "compressed-tensors"],
    "int4-g128-gptq": ["--method", "int4", "--group-size", "128", "--format", "gptq"],
    "int4-g64-gptq": ["--method", "int4", "--group-size", "64", "--format", "gptq"],
    "rtn-b4-g128-sym-ct": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--format", "compressed-tensors"],
    "rtn-b4-g128-sym-gptq": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--format", "gptq"],
    "rtn-b3-g128-asym-gptq": ["--method", "rtn", "--bits", "3", "--group-size", "128", "--asym", "--format", "gptq"],
    "rtn-b8-perchannel-asym-ct": ["--method", "rtn", "--bits", "8", "--group-size", "-1", "--asym",
                                  "--format", "compressed-tensors"],
    "gptq-b4-g128-gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--format", "gptq", *CALIB],
    "gptq-b4-g128-ct": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--format", "compressed-tensors", *CALIB],
    "gptq-b4-g128-actorder-gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order",
                                   "--format", "gptq", *CALIB],
    "gptq-b4-g128-actorder-static-ct": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order",
                                        "--static-groups", "--format", "compressed-tensors", *CALIB],
    "gptq-b3-g64-sym-mse-gptq": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--mse",
                                 "--format", "gptq", *CALIB],
    "bnb-int8": ["--method", "bnb-int8", "--format", "bnb"],
    "bnb-nf4": ["--method", "bnb-nf4", "--format", "bnb"],
    "bnb-fp4": ["--method", "bnb-fp4", "--format", "bnb"],
    "bnb-nf4-nodq-b128": ["--method", "bnb-nf4", "--no-double-quant", "--blocksize", "128", "--format", "bnb"],
    "recipe-ct": ["--recipe", "{tmp}/recipe.yaml", "--format", "compressed-tensors"],
    "int4-ignore-layer1-ct": ["--method", "int4", "--group-size", "128", "--ignore", r"layers\.1\.",
                              "--format", "compressed-tensors"],
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(name -> {sha256, dtype, shape}, __metadata__) from the raw header and bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {name: {"sha256": sha256(data[base + t["data_offsets"][0]:base + t["data_offsets"][1]]),
                      "dtype": t["dtype"], "shape": t["shape"]} for name, t in header.items()}
    return tensors, metadata


def record_output(out: Path) -> dict:
    tensors, info = {}, {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(f.relative_to(out))
        if f.suffix == ".safetensors":
            shard, metadata = read_safetensors(f)
            clash = set(shard) & set(tensors)
            if clash:
                raise SystemExit(f"{rel}: tensors also in another shard: {sorted(clash)[:5]}")
            tensors.update(shard)
            info[rel] = {"metadata": metadata}
        else:
            info[rel] = {"sha256": sha256(f.read_bytes())}
    return {"tensors": tensors, "files": info}


def run_cases(model: Path, pattern: str) -> tuple[dict, dict]:
    """Quantize every selected case; returns (case -> record or {"error": ...}, run info)."""
    selected = {k: v for k, v in CASES.items() if re.search(pattern, k)}
    if not selected:
        raise SystemExit(f"no case matches {pattern!r}; cases: {', '.join(CASES)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="check_exports_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", QUANTKIT_CACHE=f"{tmp}/cache")
        (Path(tmp) / "recipe.yaml").write_text(RECIPE)
        probe = [sys.executable, "-c", "import quantkit; print(quantkit.__file__)"]
        where = subprocess.run(probe, cwd=tmp, env=env, capture_output=True, text=True, check=True).stdout.strip()
        print(f"quantkit from {where}; model {model}; {len(selected)} cases", file=sys.stderr)
        info = {"quantkit": where, "model": str(model), "python": sys.executable}
        start = time.perf_counter()
        for i, (name, args) in enumerate(selected.items(), 1):
            args = [a.format(model=model, tmp=tmp) for a in args]
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(model), *args, "-o", str(out), "--force"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                results[name] = {"error": "\n".join(tail)}
                print(f"[{i}/{len(selected)}] {name}: FAILED (exit {proc.returncode})\n    " + "\n    ".join(tail),
                      file=sys.stderr)
                continue
            results[name] = {"args": args, **record_output(out)}
            print(f"[{i}/{len(selected)}] {name}: {len(results[name]['tensors'])} tensors, "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        info["seconds"] = round(time.perf_counter() - start, 1)
        print(f"done in {info['seconds']} s", file=sys.stderr)
    return results, info


def compare_case(base: dict | None, new: dict) -> tuple[bool, str]:
    if base is None:
        return False, "not in baseline"
    if "error" in new:
        return False, f"FAILED: {new['error'].splitlines()[-1]}"
    b, n = base["tensors"], new["tensors"]
    missing, extra = sorted(set(b) - set(n)), sorted(set(n) - set(b))
    differ = sorted(k for k in set(b) & set(n) if b[k] != n[k])
    problems = [f"{label} {len(names)}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for label, names in (("differ", differ), ("missing", missing), ("extra", extra)) if names]
    notes = [f for f in sorted(set(base["files"]) | set(new["files"])) if base["files"].get(f) != new["files"].get(f)]
    text = "; ".join(problems) if problems else "identical"
    if notes:
        text += f"  (info files changed: {', '.join(notes)})"
    return not problems, text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "../shared/models/tiny-llama2-mha")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="FILE.json", help="Record the exports to FILE.json.")
    mode.add_argument("--compare", type=Path, metavar="FILE.json", help="Compare the exports with FILE.json.")
    p.add_argument("--cases", default="", metavar="REGEX", help="Only the cases whose name matches (re.search).")
    a = p.parse_args()
    model = a.model.resolve()

    if a.write:
        results, info = run_cases(model, a.cases)
        ok = {k: v for k, v in results.items() if "error" not in v}
        a.write.write_text(json.dumps({"info": info, "cases": ok}, indent=1) + "\n")
        print(f"wrote {len(ok)} cases to {a.write}" + (f"; FAILED: {', '.join(sorted(set(results) - set(ok)))}"
                                                       if len(ok) < len(results) else ""))
        return 0 if len(ok) == len(results) else 1

    baseline = json.loads(a.compare.read_text())["cases"]
    results, info = run_cases(model, a.cases)
    width = max(map(len, results))
    print(f"{'case':<{width}}  tensors  result")
    all_ok = True
    for name, new in results.items():
        ok, text = compare_case(baseline.get(name), new)
        all_ok &= ok
        print(f"{name:<{width}}  {len(new.get('tensors', {})):>7}  {text}")
    skipped = sorted(k for k in baseline if k not in results and re.search(a.cases, k))
    if skipped:
        all_ok = False
        print(f"in the baseline but not run: {', '.join(skipped)}")
    print("ALL IDENTICAL" if all_ok else "DIFFERENCES FOUND", f"({info['seconds']} s, quantkit from {info['quantkit']})")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
