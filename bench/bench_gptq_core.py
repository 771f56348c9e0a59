"""GPTQ's core on one linear: what a larger lazy block and a torch.compile'd column step would buy.

W random (std 0.02), H = 2 X X^T / n from a rank-K/2 + noise model with per-feature scales (as bench_gptq_speed.py),
w4 g128 asymmetric, damp 0.01, 2 threads. Variants, taking turns each round, best of the rounds:
  block 128       quantkit's gptq_quantize as it is (the reference's lazy block)
  block 256/512   gptq_quantize(block_size=...): the lazy update in fewer, larger matmuls (another float order)
  compiled step   the per-column step (quantize, scaled error, rank-1 update of the block) as one torch.compile'd
                  function (inductor, dynamic shapes), first-call compile time reported apart
Each variant's relative output error and the share of its grid values equal to block 128's are reported.

    python bench/bench_gptq_core.py --shapes 4096x4096,256x768 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from quantkit.backends.gptq import solver


def hessian(K: int, n: int = 8192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K // 2, generator=g) @ torch.randn(K // 2, K, generator=g) + 0.1 * torch.randn(n, K, generator=g)
    X *= torch.rand(K, generator=g) * 2
    return 2 * X.T @ X / n


def column_step(W1, Hinv1, Q1, Err1, i: int, scale, zero, inverse, maxq: int):
    """One column of GPTQ's block loop, as gptq_quantize writes it."""
    w = W1[:, i:i + 1]
    q = torch.clamp(torch.round(w * inverse) + zero, 0, maxq)
    Q1[:, i:i + 1] = q
    err = (w - (q - zero) * scale) / Hinv1[i, i]
    Err1[:, i:i + 1] = err
    W1[:, i:] -= err @ Hinv1[i:i + 1, i:]


def compiled_gptq(W, H, step, bits=4, g=128, block=128, damp=0.01):
    """gptq_quantize's loop (no act-order, no static groups) with `step` for the column step: grid values (N, K)."""
    N, K = W.shape
    maxq = 2**bits - 1
    W = W.float().clone()
    Hinv, _ = solver.inverse_hessian_cholesky(H, damp)
    Q = torch.zeros(N, K)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % g == 0:
                end = min(j + g, K)
                later = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:j, i2:end]
                scale, zero = solver.group_qparams(torch.cat([W1[:, i:], later], 1)[:, : end - j], bits, False, False)
                inverse = 1.0 / scale
            step(W1, Hinv1, Q1, Err1, i, scale, zero, inverse, maxq)
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.to(torch.uint8)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,256x768")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    compiled = torch.compile(column_step, dynamic=True)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        H, W = hessian(K), torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.02
        start = time.perf_counter()
        compiled_gptq(W, H, compiled)  # compiles (once per dynamic shape family)
        compile_s = time.perf_counter() - start
        variants = {"block 128": lambda: solver.gptq_quantize(W, H, 4, 128),
                    "block 256": lambda: solver.gptq_quantize(W, H, 4, 128, block_size=256),
                    "block 512": lambda: solver.gptq_quantize(W, H, 4, 128, block_size=512),
                    "compiled step": lambda: compiled_gptq(W, H, compiled),
                    "eager step": lambda: compiled_gptq(W, H, column_step)}
        times, grids, errors = {v: [] for v in variants}, {}, {}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
                grids[name] = result if isinstance(result, torch.Tensor) else result.weight.q
                if not isinstance(result, torch.Tensor):
                    errors[name] = result.relative_error
        base = grids["block 128"]
        print(json.dumps({"shape": shape, "load": os.getloadavg()[0], "compile_s": round(compile_s, 1),
                          "best_s": {v: round(min(t), 3) for v, t in times.items()},
                          "vs_block_128": {v: round(min(t) / min(times["block 128"]), 2) for v, t in times.items()},
                          "grid_equal_pct": {v: round(100 * (q == base).float().mean().item(), 3)
                                             for v, q in grids.items()},
                          "relative_error": errors}), flush=True)


if __name__ == "__main__":
    main()
