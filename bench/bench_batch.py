"""Calibration batch size: GPTQ w4 g128 (fp32, staged forward) of a model in memory at several --batch-size values.

Each size runs quantize_calibrated on the same calibration windows, in one process, the sizes taking turns each
round; the best time of the rounds is reported per size with the load average. The batch only splits the windows
(a batch of b windows of T tokens is one (b*T, hidden) matmul per linear); results differ across sizes by float
summation order only (the Hessian's running mean is updated once a batch).

    python bench/bench_batch.py --model ../shared/models/tiny-llama2-mha --n-samples 128 --seq-len 256 \
        --batch-sizes 1,2,4,8,16,32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import quantkit
from quantkit.backends.gptq import GPTQConfig
from quantkit.run.calibrator import quantize_calibrated


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/tiny-llama2-mha")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    vocab = quantkit.load_tokenizer(args.model).vocab_size
    tokens = torch.randint(0, vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[int, list[float]] = {b: [] for b in sizes}
    loads = []
    for _ in range(args.rounds):
        for b in sizes:
            model = quantkit.load(args.model, dtype="fp32")
            start = time.perf_counter()
            quantize_calibrated(model, GPTQConfig(bits=4, group_size=128), tokens, batch_size=b, progress=False)
            times[b].append(round(time.perf_counter() - start, 2))
            loads.append(os.getloadavg()[0])
    best = {b: min(t) for b, t in times.items()}
    fastest = min(best.values())
    print(json.dumps({"model": args.model, "tokens": [args.n_samples, args.seq_len], "threads": torch.get_num_threads(),
                      "load": [round(min(loads), 2), round(max(loads), 2)], "seconds": times,
                      "best_s": best, "vs_fastest": {b: round(t / fastest, 2) for b, t in best.items()}}))


if __name__ == "__main__":
    main()
