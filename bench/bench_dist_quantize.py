"""Data-parallel GPTQ calibration (issue 28): `quantkit quantize --method gptq` in one process against `torchrun
--nproc-per-node N` at equal total threads (1 process x N threads against N processes x 1 thread), alternating, each
run timed as a whole process (start-up, reading, calibration, solving, writing: what a user waits for), with the
phases each reports (rank 0's); and whether the outputs are the same (byte for byte at equal threads per process;
here the thread counts differ, so the fraction of equal 4-bit grid values is given too).

    python bench/bench_dist_quantize.py MODEL [--n-samples 32 --seq-len 256 --nproc 2 --repeats 2]
    python bench/bench_dist_quantize.py --llama7b-layers 2 [--n-samples 16 --seq-len 512]

--llama7b-layers L: a model of L random decoder layers of Llama-2-7B's shape (hidden 4096, intermediate 11008, 32
heads; fp16; the demo model's tokenizer), calibrated on the demo model's test.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def llama7b_layers(path: Path, layers: int):
    """L decoder layers of Llama-2-7B's shape, random fp16 weights (std 0.02, norms 1), the demo tokenizer."""
    from quantkit.model import LlamaConfig, LlamaForCausalLM, save_model

    config = LlamaConfig(vocab_size=4096, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, torch_dtype="float16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    save_model(model.half(), path, tokenizer_dir=ROOT / "demo" / "model")


def timed(cmd: list[str], threads: int) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return seconds, json.loads(done.stdout[done.stdout.index("{"):])


def grid_agreement(a: Path, b: Path) -> tuple[bool, float]:
    """Whether the two outputs' tensors are equal, and the fraction of equal 4-bit grid values (GPTQ qweight)."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same = total = 0
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    for name in (n for n in x if n.endswith(".qweight")):
        p, q = ((t.unsqueeze(-1) >> shifts) & 15 for t in (x[name], y[name]))
        same, total = same + int((p == q).sum()), total + p.numel()
    return all(torch.equal(x[n], y[n]) for n in x), same / max(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--llama7b-layers", type=int, default=0)
    parser.add_argument("--calib")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as tmp:
        model = Path(tmp) / "model" if a.llama7b_layers else Path(a.model)
        if a.llama7b_layers:
            llama7b_layers(model, a.llama7b_layers)
        calib = a.calib or str(ROOT / "demo" / "model" / "test.txt")
        args = ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", calib,
                "--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len), "--json", "--force"]
        one_cmd = [sys.executable, "-m", "quantkit", *args, "-o", f"{tmp}/one"]
        many_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
                    "-m", "quantkit", *args, "-o", f"{tmp}/many"]
        ones, manys = [], []
        for _ in range(a.repeats):  # alternating, so that the machine's load falls on both alike
            seconds, one = timed(one_cmd, a.nproc)
            ones.append(seconds)
            seconds, many = timed(many_cmd, 1)
            manys.append(seconds)
        equal, grid = grid_agreement(Path(tmp) / "one", Path(tmp) / "many")
    print(f"load average {os.getloadavg()[0]:.2f}; {'Llama-2-7B-shape layers: ' + str(a.llama7b_layers) if a.llama7b_layers else a.model}; "
          f"gptq w4 g128 on {a.n_samples} x {a.seq_len} tokens")
    print(f"1 process x {a.nproc} threads: {statistics.median(ones):.1f} s (runs {', '.join(f'{s:.1f}' for s in ones)}); "
          f"phases {one['phases']}")
    print(f"{a.nproc} processes x 1 thread: {statistics.median(manys):.1f} s (runs "
          f"{', '.join(f'{s:.1f}' for s in manys)}); phases (rank 0) {many['phases']}")
    print(f"speed-up {statistics.median(ones) / statistics.median(manys):.2f}x; tensors equal: {'yes' if equal else 'no'}; "
          f"4-bit grid values equal: {grid:.4%} (thread counts differ: 2 vs 1 a process)")


if __name__ == "__main__":
    main()
