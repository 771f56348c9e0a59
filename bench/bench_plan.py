"""`quantkit plan` against real `quantkit quantize` runs: output size, peak RSS and wall time.

Builds a random fp16 checkpoint (default hidden 1024, 4 layers), plans and runs each method in a fresh
subprocess (peak RSS from getrusage(RUSAGE_CHILDREN)), and prints planned vs measured.
Usage: python bench/bench_plan.py [--hidden 1024] [--layers 4] [--n-samples 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_rss import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
METHODS = {"int4": ["--method", "int4", "--group-size", "128"], "rtn": ["--method", "rtn", "--bits", "4"],
           "bnb-nf4": ["--method", "bnb-nf4"], "gptq": ["--method", "gptq", "--group-size", "128"]}


def measured_run(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS bytes, wall seconds) of a command run in its own helper process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    rss, seconds = out.stdout.split()
    return int(rss) * 1024, float(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    cli = [sys.executable, "-m", "quantkit.cli"]
    calib = ["--calib", str(REPO / "demo" / "model" / "train.txt"), "--n-samples", str(args.n_samples),
             "--seq-len", str(args.seq_len)]
    print(f"hidden {args.hidden}, {args.layers} layers, fp16; gptq: {args.n_samples} x {args.seq_len} tokens")
    print("| method | output MB plan / real | peak RSS MB plan / real | time s plan / real (quantize wall) | plan took s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        make_checkpoint(src, args.layers, args.hidden, tokenizer_dir=REPO / "demo" / "model")
        for method in args.methods:
            flags = METHODS[method] + (calib if method == "gptq" else [])
            start = time.perf_counter()
            plan = json.loads(subprocess.run([*cli, "plan", str(src), *flags, "--json"], check=True,
                                             capture_output=True, text=True).stdout)
            took = time.perf_counter() - start
            out = Path(tmp) / f"q-{method}"
            rss, seconds = measured_run([*cli, "quantize", str(src), *flags, "-o", str(out)])
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            print(f"| {method} | {plan['output_bytes'] / 1e6:.2f} / {size / 1e6:.2f} | {plan['peak_ram'] / 1e6:.0f} / "
                  f"{rss / 1e6:.0f} | {plan['seconds']:.1f} / {seconds:.1f} | {took:.1f} |")


if __name__ == "__main__":
    main()
