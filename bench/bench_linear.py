"""Linear layer speed on CPU at Llama-2-7B shapes: int4 (aten tinygemm CPU kernel) vs fp16 vs fp32.

Times are interleaved in one run and reported as ratios, which survive a noisy shared machine
better than absolute numbers. Usage: python bench/bench_linear.py [--repeats 50] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quantkit.quant.affine import quantize_weight
from quantkit.quant.linear import AffineLinear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down


def median_time(fn, x, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| out x in | batch | fp32 ms | fp16 ms | int4 g128 ms | fp16 / int4 | fp32 / int4 |")
    print("|---|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features) * 0.02
        fp32 = torch.nn.Linear(in_features, out_features, bias=False)
        fp32.weight.data = w
        fp16 = torch.nn.Linear(in_features, out_features, bias=False).half()
        fp16.weight.data = w.half()
        int4 = AffineLinear(quantize_weight(w.half(), 4, 128, symmetric=False), dtype=torch.float16)
        for batch in (1, 16):
            x = torch.randn(batch, in_features)
            t32 = median_time(fp32, x, args.repeats)
            t16 = median_time(fp16, x.half(), args.repeats)
            t4 = median_time(int4, x.half(), args.repeats)
            print(f"| {out_features}x{in_features} | {batch} | {t32 * 1e3:.2f} | {t16 * 1e3:.2f} | {t4 * 1e3:.2f} | "
                  f"{t16 / t4:.2f}x | {t32 / t4:.2f}x |")


if __name__ == "__main__":
    main()
