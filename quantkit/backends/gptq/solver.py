"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): pure tensor math, no modules, no I/O.

Given a layer's weight W (N out, K in) and the Hessian of its reconstruction loss, H = 2 X X^T over
calibration inputs X (K, tokens), quantize W one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian (Algorithm 1 of the
paper). As in the reference implementation (IST-DASLab/gptq, gptq.py `fasterquant`): lazy batches of
`block_size` columns, dead inputs zeroed, dampening of the diagonal, optional act-order (columns in
order of decreasing H_ii) and static groups (qparams fixed from the unquantized weight).

qparams come from quantkit.quant.affine (torchao's choose_qparams_affine), and a column is rounded with
torchao's quantize_affine formula, so with H = I GPTQ is exactly round-to-nearest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from quantkit.quant.affine import AffineWeight, choose_qparams, resolve_group_size
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


class HessianAccumulator:
    """GPTQ's H = 2/n sum_i x_i x_i^T (K, K) over the inputs of one linear, in fp32, never all X at once: the
    running mean of the reference gptq.py's add_batch, operation for operation (so quantkit's Hessians, and GPTQ's
    results, are the reference's bit for bit). Statistics add up: accumulators of disjoint samples `merge` into
    the one of all of them, n-weighted, to float rounding. A sum normalised at the end (llm-compressor's way) is the
    same to float rounding, but GPTQ's error feedback turns one flipped rounding into many: 10% of the grid values of
    tiny-llama2-mha w4g128 differ; so torchrun's ranks feed one accumulator rank after rank instead
    (quantkit/run/calibrator.py `chained`), one process's sums.
    """

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor):
        """One batch of the linear's inputs (..., K)."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
        tokens = x.shape[0]
        self.H *= self.n / (self.n + tokens)  # keep it a mean as samples arrive
        self.n += tokens
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.T, x)

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Add another accumulator's samples (the same linear's, other tokens): H = (n1 H1 + n2 H2) / (n1 + n2),
        in place; returns self."""
        n = self.n + other.n
        if n:
            self.H.mul_(self.n / n).add_(other.H, alpha=other.n / n)
        self.n = n
        return self


def quantize_columns(w: torch.Tensor, inverse: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Unsigned integer grid values of w (N, c) for per-row qparams (N, 1), given 1 / scale: torchao's rounding
    formula, round(w * (1 / scale)) + zero, clamped (the reciprocal is the caller's, once a group)."""
    return torch.clamp(torch.round(w * inverse) + zero, 0, maxq)


def mse_qparams(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, max_shrink: float = 0.8,
                norm: float = 2.4):
    """Per-row qparams (N, 1) minimising sum |w - dequant(quant(w))|^norm over shrunk clipping ranges.

    The reference's `Quantizer(mse=True)` search: ranges p * [min, max] for p = 1, 0.99, ... 0.21.
    """
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best = torch.full((w.shape[0], 1), float("inf"), device=w.device)
    scale, zero = choose_qparams(w, bits, w.shape[1], symmetric)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = choose_qparams(torch.minimum(torch.maximum(w, p * lo), p * hi), bits, w.shape[1], symmetric)
        err = ((quantize_columns(w, 1.0 / s, z, 2**bits - 1) - z) * s - w).abs_().pow_(norm).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool, mse: bool):
    """qparams (N, 1) for one group of columns w (N, g)."""
    return mse_qparams(w, bits, symmetric) if mse else choose_qparams(w, bits, w.shape[1], symmetric)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, name: str = "weight", perm: torch.Tensor | None = None,
                             dead: torch.Tensor | None = None, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """(U, lambda): the upper Cholesky factor U of (H' + lambda I)^-1, lambda = damp * mean(diag H'); damp grows
    10x on failure. H' is H (K, K) with its rows and columns in `perm`'s order (act-order) and the diagonal of the
    `dead` inputs (bool, K) set to 1 (the reference's fix for inputs never seen); H itself is not changed.

    One K x K workspace: H' is gathered into U, dampened, factored, inverted and factored again in place (LAPACK's
    potrf / potri do so natively; the same values as out-of-place calls, bit for bit). At 70B's down_proj
    (K = 28672) each fp32 K x K matrix is 3.3 GB. H must be finite (gptq_quantize checks it first: a non-finite H
    is an overflow, which no dampening fixes).
    """
    U = torch.empty_like(H)
    info = torch.empty((), dtype=torch.int32, device=H.device)

    def gather():  # H' into U: row blocks, so that no second K x K matrix is needed
        if perm is None:
            U.copy_(H)
        else:
            for r in range(0, H.shape[0], 1024):
                U[r:r + 1024] = H[perm[r:r + 1024, None], perm]
        if dead is not None:
            U.diagonal()[dead if perm is None else dead[perm]] = 1

    gather()
    mean_diag = torch.mean(torch.diag(U)).item()
    first = damp
    for attempt in range(max_tries):
        if attempt:
            gather()
        U.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(U, out=(U, info))  # L, lower
        if info == 0:
            torch.cholesky_inverse(U, out=U)  # (L L^T)^-1
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if info == 0:
                return U, damp * mean_diag
        if attempt == max_tries - 1:
            break
        log.warning("%s: Hessian not positive definite with damp=%g; retrying with damp=%g", name, damp, damp * 10)
        damp *= 10
    raise QuantkitError(f"{name}: the Hessian of its calibration inputs is not positive definite even with "
                        f"damp={damp:g} ({damp / first:g}x the requested {first:g}): the inputs are degenerate "
                        f"(too few distinct tokens for {H.shape[0]} input channels): use more calibration samples "
                        f"(--n-samples), longer windows (--seq-len) or a larger --damp")


@dataclass
class GPTQResult:
    weight: AffineWeight
    loss: float  # the reference's sum of (w - q)^2 / Hinv_ii^2 / 2
    relative_error: float  # ||(W - Q) X|| / ||W X|| from H: sqrt(tr(dW H dW^T) / tr(W H W^T))
    dead_inputs: int = 0  # input channels that were zero on every calibration token: their columns are set to 0


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
                  act_order: bool = False, static_groups: bool = False, damp: float = 0.01, block_size: int = 128,
                  mse: bool = False, name: str = "weight") -> GPTQResult:
    """GPTQ of W (N, K) given H (K, K). This is Algorithm 1 with lazy batch updates, kept in one piece."""
    N, K = W.shape
    g = resolve_group_size(group_size, K, name)
    maxq = 2**bits - 1
    W0, H0 = W.float(), H.float()  # the caller's: the output error is measured against them
    if not torch.isfinite(H0).all():  # an overflow upstream: no dampening can fix it, so never try
        raise QuantkitError(f"{name}: the Hessian of its calibration inputs has NaN or Inf values: the inputs "
                            f"overflowed (in a 16-bit calibration dtype: use float32) or the weights are damaged")
    W = W0.clone()
    dead = torch.diag(H0) == 0  # inputs that were always zero: any value works, choose 0
    W[:, dead] = 0

    # Static groups: qparams of every group from the unquantized weight, in the original column order.
    static = [group_qparams(W[:, c:c + g], bits, symmetric, mse) for c in range(0, K, g)] if static_groups else None
    static_inverse = [1.0 / s for s, _ in static] if static else None

    perm = torch.argsort(torch.diag(H0).masked_fill(dead, 1), descending=True) if act_order else None
    Hinv, dampening = inverse_hessian_cholesky(H0, damp, name, perm=perm, dead=dead if dead.any() else None)
    if act_order:
        W = W[:, perm]
    else:
        perm = torch.arange(K, device=W.device)

    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)  # grid values, permuted order
    groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # qparams (N, 1) of each group as it is reached
    losses = torch.zeros(N, device=W.device)
    scale = zero = inverse = None
    order = perm.tolist()  # original column of each permuted one (static groups look theirs up)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)  # the block's grid values and scaled errors
        for i in range(i2 - i1):
            j = i1 + i  # column in permuted order
            if static is not None:
                scale, zero = static[order[j] // g]
                inverse = static_inverse[order[j] // g]
            elif j % g == 0:
                # qparams of the group from the *current* weights: this block's updated columns, and
                # the later columns with this block's pending lazy update applied.
                end = min(j + g, K)
                later = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:j, i2:end]
                scale, zero = group_qparams(torch.cat([W1[:, i:], later], 1)[:, : end - j], bits, symmetric, mse)
                inverse = 1.0 / scale  # torchao's w * (1 / scale), once a group instead of once a column
                groups.append((scale, zero))
            w = W1[:, i:i + 1]  # (N, 1)
            q = quantize_columns(w, inverse, zero, maxq)
            Q1[:, i:i + 1] = q
            torch.div(w - (q - zero) * scale, Hinv1[i, i], out=Err1[:, i:i + 1])  # (w - dequant(q)) / Hinv_ii
            W1[:, i:] -= Err1[:, i:i + 1] @ Hinv1[i:i + 1, i:]  # spread the error over the block's later columns
        Q[:, i1:i2] = Q1
        losses += Err1.square().sum(1) / 2  # the reference's (w - q)^2 / Hinv_ii^2 / 2, to float rounding
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of everything after the block

    del Hinv, W
    weight = _affine_weight(Q[:, torch.argsort(perm)] if act_order else Q, static or groups, perm, bits, g, symmetric,
                            scattered=act_order and not static_groups)
    loss = losses.sum().item()
    dW = weight.dequantize(torch.float32) - W0
    dW[:, dead] = 0  # GPTQ zeroed them; H0 has no weight there
    error = _relative_error(2 * loss - dampening * float((dW * dW).sum()), W0, H0)
    return GPTQResult(weight, loss, error, dead_inputs=int(dead.sum()))


def _affine_weight(q, groups, perm, bits, g, symmetric, scattered: bool) -> AffineWeight:
    """Canonical weight from grid values in the original order and each group's qparams.

    Without act-order (or with static groups) group k is columns [k*g, (k+1)*g). With act-order,
    group k is the k-th run of g columns in quantization order: g_idx[perm[j]] = j // g.
    """
    scale = torch.cat([s for s, _ in groups], 1)  # (N, G)
    zero = torch.cat([z for _, z in groups], 1).to(torch.int32)
    g_idx = None
    if scattered:
        g_idx = torch.empty_like(perm, dtype=torch.int32)
        g_idx[perm] = (torch.arange(perm.numel(), device=perm.device) // g).to(torch.int32)
    return AffineWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=g, symmetric=symmetric, g_idx=g_idx)


def _relative_error(squared_error: float, W: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X|| / ||W X|| = sqrt(tr(dW H dW^T) / tr(W H W^T)), H = 2 X X^T / n as given.

    The numerator comes from GPTQ's own losses, with no K x K product: their sum is half of tr(dW H' dW^T) for the
    dampened H' = H + lambda I (Frantar et al. 2022, eq. 2-3), so tr(dW H dW^T) = 2 sum(losses) - lambda ||dW||^2
    (the same to float rounding: ~1e-5 relative, tested)."""
    den = ((W @ H) * W).sum().item()
    return math.sqrt(max(squared_error, 0.0) / den) if den > 0 else 0.0
