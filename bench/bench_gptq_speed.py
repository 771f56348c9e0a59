"""Seconds to GPTQ one Llama-2-7B linear on CPU: quantkit vs a literal port of the paper's Algorithm 1.

Shapes: a 4096x4096 linear (q/k/v/o/gate/up-sized Hessian, 4096-dim) and down_proj, W (4096, 11008)
with an 11008-dim Hessian; 4 bits, group 128, asymmetric, damp 0.01, with and without act-order.
W is random (std 0.02); H = 2 X X^T / n from X (in_features, n tokens) drawn from a low-rank +
noise model (correlated inputs with a spread-out Hessian diagonal), fp32.

The baseline, `paper_gptq`, is Algorithm 1 of Frantar et al. 2022 (arXiv:2210.17323) written
plainly: H^-1 by torch.linalg.inv then its upper Cholesky factor, lazy-batch blocks of B = 128,
per-column quantize / error / rank-1 update directly on slices of W, then the block update
W[:, i+B:] -= E @ Hinv[i:i+B, i+B:]; min-max asymmetric group qparams recomputed at each group start
as the reference code does; act-order permutes columns by decreasing diag(H). Both are checked to
reach the same output error ||(W - Q) X|| / ||W X|| (computed from H, since ||dW X||^2 = n/2 tr(dW H dW^T)).

Every variant is timed in the same run (repeats interleaved, median reported); the phase table
splits each method's time into the inverse-Hessian factor, the per-column loop, the lazy block
updates and the rest (for quantkit: its output-error computation and packing, timed by wrapping
quantkit.backends.gptq.solver's helpers; its block updates by replaying the same matmul-and-subtract standalone).
Usage:

    python bench/bench_gptq_speed.py [--tokens 8192] [--repeats 3] [--repeats-large 2] [--shapes 4096x4096 4096x11008]
    python bench/bench_gptq_speed.py --profile --shapes 4096x4096   # torch.profiler op tables instead
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager

import torch

import quantkit.backends.gptq.solver as qgptq
from quantkit.quant.affine import quantize_weight

BITS, GROUP, DAMP, BLOCK = 4, 128, 0.01, 128


# ---- the baseline: Algorithm 1, literally -----------------------------------------------------------


def minmax_qparams(w: torch.Tensor, maxq: int):
    """The reference Quantizer.find_params (asymmetric, per row): range widened to include 0."""
    xmin = torch.clamp(w.min(1).values, max=0)
    xmax = torch.clamp(w.max(1).values, min=0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero], xmax[both_zero] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


@torch.no_grad()
def paper_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = BITS, group_size: int = GROUP, act_order: bool = False,
               damp: float = DAMP, B: int = BLOCK, phases: dict | None = None) -> torch.Tensor:
    """GPTQ Algorithm 1 (lazy batches, inverse-Hessian Cholesky); returns the dequantized weight (N, K)."""
    t0 = time.perf_counter()
    W, H = W.clone().float(), H.clone().float()
    N, K = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    t1 = time.perf_counter()
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # Cholesky of the inverse Hessian
    t2 = time.perf_counter()
    Q = torch.zeros_like(W)
    loop = update = 0.0
    for i in range(0, K, B):
        end = min(i + B, K)
        E = torch.zeros(N, end - i)
        ta = time.perf_counter()
        for j in range(i, end):
            if j % group_size == 0:
                scale, zero = minmax_qparams(W[:, j:j + group_size], maxq)
            q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
            Q[:, j] = scale * (q - zero)
            E[:, j - i] = (W[:, j] - Q[:, j]) / Hinv[j, j]
            W[:, j:end] -= E[:, j - i, None] * Hinv[j, j:end]  # intra-block update (rank 1)
        tb = time.perf_counter()
        W[:, end:] -= E @ Hinv[i:end, end:]  # lazy block update
        loop += tb - ta
        update += time.perf_counter() - tb
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    if phases is not None:
        total = time.perf_counter() - t0
        phases.update({"inverse + Cholesky": t2 - t1, "column loop": loop, "block updates": update,
                       "other": total - (t2 - t1) - loop - update})
    return Q


# ---- quantkit, with its phases timed from outside -----------------------------------------------------


@contextmanager
def timed_helpers(phases: dict):
    """Wrap quantkit.backends.gptq.solver's helpers (looked up at call time) to time them; restores them after."""
    names = {"inverse_hessian_cholesky": "inverse + Cholesky", "_relative_error": "output-error report",
             "_affine_weight": "packing"}
    saved = {n: getattr(qgptq, n) for n in names}

    def wrap(fn, label):
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start
        return inner

    for n, label in names.items():
        setattr(qgptq, n, wrap(saved[n], label))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(qgptq, n, fn)


def quantkit_gptq(W, H, act_order, phases=None) -> qgptq.GPTQResult:
    if phases is None:
        r = qgptq.gptq_quantize(W, H, BITS, GROUP, act_order=act_order, damp=DAMP, block_size=BLOCK)
    else:
        start = time.perf_counter()
        with timed_helpers(phases):
            r = qgptq.gptq_quantize(W, H, BITS, GROUP, act_order=act_order, damp=DAMP, block_size=BLOCK)
        phases["total"] = time.perf_counter() - start
    return r


@torch.no_grad()
def block_update_replay(N: int, K: int, B: int = BLOCK) -> float:
    """Seconds of quantkit's `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]` over all blocks, on random data."""
    W, Hinv, Err1 = torch.randn(N, K), torch.randn(K, K).triu_(), torch.randn(N, B)
    start = time.perf_counter()
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W[:, i2:] -= Err1[:, : i2 - i1] @ Hinv[i1:i2, i2:]
    return time.perf_counter() - start


# ---- data and scoring ---------------------------------------------------------------------------------


def make_problem(N: int, K: int, tokens: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Low-rank + noise inputs, with per-feature scales so that diag(H) is spread (act-order matters).
    A = torch.randn(K, rank, generator=g) / math.sqrt(rank)
    feature_scale = torch.exp(0.75 * torch.randn(K, 1, generator=g))
    X = feature_scale * (3 * A @ torch.randn(rank, tokens, generator=g) + torch.randn(K, tokens, generator=g))
    H = (2 / tokens) * (X @ X.T)
    W = 0.02 * torch.randn(N, K, generator=g)
    return W, H.float()


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, reference: float) -> float:
    """||(W - Q) X|| / ||W X||, through H = 2 X X^T / n; reference = tr(W H W^T)."""
    dW = Q - W
    return math.sqrt(((dW @ H) * dW).sum().item() / reference)


def profile_tables(W, H, rows: int = 18):
    """torch.profiler op tables (self CPU time) of one quantkit run and one baseline run, act-order off."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("quantkit", lambda: qgptq.gptq_quantize(W, H, BITS, GROUP, damp=DAMP, block_size=BLOCK)),
                     ("paper Alg. 1", lambda: paper_gptq(W, H))):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
        print(f"\n{name}, {W.shape[0]}x{W.shape[1]}, act-order off (profiler overhead included)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x11008"], help="OUTxIN")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens behind H")
    parser.add_argument("--rank", type=int, default=256, help="rank of the correlated part of X")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, Hessians up to 4096")
    parser.add_argument("--repeats-large", type=int, default=2, help="timed repeats, larger Hessians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler op tables of both methods on the first shape")
    args = parser.parse_args()
    if args.profile:
        N, K = map(int, args.shapes[0].split("x"))
        profile_tables(*make_problem(N, K, args.tokens, args.rank, args.seed))
        return
    torch.manual_seed(args.seed)
    variants = {"paper Alg. 1": paper_gptq, "quantkit": None}
    rows, phase_rows, err_rows = [], [], []
    start_all = time.perf_counter()
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        W, H = make_problem(N, K, args.tokens, args.rank, args.seed)
        repeats = args.repeats if K <= 4096 else args.repeats_large
        reference = ((W @ H) * W).sum().item()  # ||W X||^2 * 2 / n
        for act_order in (False, True):
            times = {v: [] for v in variants}
            phases = {v: {} for v in variants}
            outputs = {}  # dequantized weights of the last repeat (quantkit's dequantized after timing)
            for rep in range(repeats):
                for v in variants:  # interleaved, so drift on the shared machine hits both alike
                    ph = {} if rep == repeats - 1 else None  # phases from the last repeat
                    start = time.perf_counter()
                    if v == "quantkit":
                        outputs[v] = quantkit_gptq(W, H, act_order, ph)
                    else:
                        outputs[v] = paper_gptq(W, H, act_order=act_order, phases=ph)
                    times[v].append(time.perf_counter() - start)
                    if v == "quantkit":
                        outputs[v] = outputs[v].weight.dequantize(torch.float32)
                    if ph is not None:
                        phases[v] = ph
            med = {v: statistics.median(t) for v, t in times.items()}
            label = f"{shape}, act-order {'on' if act_order else 'off'}"
            rows.append((label, repeats, med["paper Alg. 1"], med["quantkit"], times))
            errs = {v: output_error(W, q, H, reference) for v, q in outputs.items()}
            same = torch.isclose(outputs["quantkit"], outputs["paper Alg. 1"], rtol=1e-3, atol=1e-6).float().mean()
            err_rows.append((label, errs["paper Alg. 1"], errs["quantkit"], same.item()))
            qk = phases["quantkit"]
            qk_update = block_update_replay(N, K)
            known = sum(qk.get(k, 0.0) for k in ("inverse + Cholesky", "output-error report", "packing"))
            qk_phases = {"inverse + Cholesky": qk.get("inverse + Cholesky", 0.0),
                         "column loop (+ setup)": qk["total"] - known - qk_update,
                         "block updates (replayed)": qk_update,
                         "output-error report": qk.get("output-error report", 0.0),
                         "packing": qk.get("packing", 0.0)}
            phase_rows.append((label, phases["paper Alg. 1"], qk_phases))
            print(f"  done {label}: {med} ({time.perf_counter() - start_all:.0f} s so far)", flush=True)
        rtn = quantize_weight(W, BITS, GROUP, False).dequantize(torch.float32)
        err_rows.append((f"{shape}, RTN (no GPTQ), for scale", output_error(W, rtn, H, reference), None, None))
        del W, H

    print(f"\n4 bits, group {GROUP}, asymmetric, damp {DAMP}, block {BLOCK}; H from {args.tokens} tokens "
          f"(rank {args.rank} + noise); {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("\n| linear (out x in), act-order | repeats | paper Alg. 1 s | quantkit s | quantkit / paper | all runs (paper; quantkit) |")
    print("|---|---|---|---|---|---|")
    for label, repeats, base, ours, times in rows:
        runs = "; ".join(" ".join(f"{t:.1f}" for t in ts) for ts in times.values())
        print(f"| {label} | {repeats} | {base:.2f} | {ours:.2f} | {ours / base:.2f}x | {runs} |")
    print("\nOutput error ||(W - Q) X|| / ||W X||")
    print("\n| linear, act-order | paper Alg. 1 | quantkit | quantkit / paper | weights equal |")
    print("|---|---|---|---|---|")
    for label, base, ours, same in err_rows:
        if ours is None:
            print(f"| {label} | {base:.5f} | - | - | - |")
        else:
            print(f"| {label} | {base:.5f} | {ours:.5f} | {ours / base:.4f} | {100 * same:.2f}% |")
    print("\nPhases, seconds (last repeat)")
    print("\n| linear, act-order | method | inverse + Cholesky | column loop | block updates | other |")
    print("|---|---|---|---|---|---|")
    for label, base, ours in phase_rows:
        print(f"| {label} | paper Alg. 1 | {base['inverse + Cholesky']:.2f} | {base['column loop']:.2f} | "
              f"{base['block updates']:.2f} | {base['other']:.2f} |")
        print(f"| {label} | quantkit | {ours['inverse + Cholesky']:.2f} | {ours['column loop (+ setup)']:.2f} | "
              f"{ours['block updates (replayed)']:.2f} | output-error report {ours['output-error report']:.2f}, "
              f"packing {ours['packing']:.2f} |")
    print(f"\ntotal {time.perf_counter() - start_all:.0f} s")


if __name__ == "__main__":
    main()
