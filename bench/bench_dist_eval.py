"""Data-parallel evaluation (issue 28): `quantkit eval` in one process against `torchrun --nproc-per-node N` at equal
total threads (1 process x N threads against N processes x 1 thread), alternating, each run timed as a whole process
(start-up, loading and the decode-speed measurement included, as a user waits for it); the numbers of both, which
differ only by the rounding of matmuls split over another number of threads.

    python bench/bench_dist_eval.py MODEL QUANTIZED [--dataset MODEL/test.txt --seq-len 256 --nproc 2 --repeats 3]
    python bench/bench_dist_eval.py --llama7b-layers 2 [--seq-len 256]

--llama7b-layers L: MODEL is L random decoder layers of Llama-2-7B's shape (bench_dist_quantize.llama7b_layers) and
QUANTIZED its RTN w4 g128 (quantized here first), on the demo model's test.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_dist_quantize import ROOT, llama7b_layers, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("quantized", nargs="?")
    parser.add_argument("--llama7b-layers", type=int, default=0)
    parser.add_argument("--dataset")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    if a.llama7b_layers:
        with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as tmp:
            a.model, a.quantized = f"{tmp}/model", f"{tmp}/rtn"
            a.dataset = a.dataset or str(ROOT / "demo" / "model" / "test.txt")
            llama7b_layers(Path(a.model), a.llama7b_layers)
            subprocess.run([sys.executable, "-m", "quantkit", "quantize", a.model, "--method", "rtn", "--bits", "4",
                            "--group-size", "128", "-o", a.quantized], check=True, capture_output=True)
            return compare(a)
    compare(a)


def compare(a):
    args = ["eval", a.quantized, "--base", a.model, "--dataset", a.dataset or str(Path(a.model) / "test.txt"),
            "--seq-len", str(a.seq_len), "--dtype", "fp32", "--json"]
    one_cmd = [sys.executable, "-m", "quantkit", *args]
    many_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
                "-m", "quantkit", *args]
    ones, manys = [], []
    for _ in range(a.repeats):  # alternating, so that the machine's load falls on both alike
        seconds, one = timed(one_cmd, a.nproc)
        ones.append(seconds)
        seconds, many = timed(many_cmd, 1)
        manys.append(seconds)
        same = [(m["perplexity"], m["fidelity"]) for m in one["models"]] == \
               [(m["perplexity"], m["fidelity"]) for m in many["models"]]
        kl = (one["models"][0]["fidelity"]["kl"]["mean"], many["models"][0]["fidelity"]["kl"]["mean"])
        ppl = (one["models"][0]["perplexity"]["ppl"], many["models"][0]["perplexity"]["ppl"])
    print(f"load average {os.getloadavg()[0]:.2f}; {one['dataset']['n_windows']} windows of {a.seq_len}")
    print(f"1 process x {a.nproc} threads: {statistics.median(ones):.1f} s (runs {', '.join(f'{s:.1f}' for s in ones)})")
    print(f"{a.nproc} processes x 1 thread: {statistics.median(manys):.1f} s (runs "
          f"{', '.join(f'{s:.1f}' for s in manys)})")
    print(f"speed-up {statistics.median(ones) / statistics.median(manys):.2f}x; numbers identical: "
          f"{'yes' if same else 'no'} (mean KL {kl[0]:.6e} / {kl[1]:.6e}, perplexity {ppl[0]:.6f} / {ppl[1]:.6f}: "
          f"matmul reductions round by the thread count, {a.nproc} against 1)")


if __name__ == "__main__":
    main()
