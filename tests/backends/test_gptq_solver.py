"""GPTQ math on toy linears with hand-built Hessians (llm-compressor style)."""

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from quantkit.quant.affine import quantize_weight
from quantkit.errors import QuantkitError
from quantkit.backends.gptq.solver import HessianAccumulator, gptq_quantize, inverse_hessian_cholesky
from quantkit.quant.linear import AffineLinear, act_order_permutation

BITS, GROUPS = (2, 3, 4, 8), (32, 64, 128, -1)


def correlated_inputs(K=256, tokens=2048, rank=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=g) @ torch.randn(rank, K, generator=g) + 0.1 * torch.randn(tokens, K, generator=g)


def hessian(X):
    acc = HessianAccumulator(X.shape[1])
    for batch in X.split(300):  # streamed, as the pipeline feeds it
        acc.add(batch)
    return acc.H


W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))


def test_streamed_hessian_is_2_xtx_over_n():
    X = correlated_inputs()
    torch.testing.assert_close(hessian(X), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


def test_the_hessian_is_the_references_running_mean_bit_for_bit():
    """gptq.py's add_batch keeps H a running mean (H *= n / (n + t); H += x' x'^T, x' = sqrt(2 / (n + t)) x)."""
    X = correlated_inputs(tokens=4096)
    H, n = torch.zeros(256, 256), 0
    for batch in X.split(300):
        H *= n / (n + batch.shape[0])
        n += batch.shape[0]
        scaled = batch * math.sqrt(2 / n)
        H.addmm_(scaled.T, scaled)
    assert torch.equal(hessian(X), H)


def test_accumulators_of_disjoint_samples_merge_into_the_whole():
    X = correlated_inputs(tokens=3000)
    parts = [HessianAccumulator(256) for _ in range(3)]
    for i, batch in enumerate(X.split(300)):
        parts[i % 3].add(batch)  # round robin: each part sees other samples, as ranks would
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n == 3000
    torch.testing.assert_close(merged.H, hessian(X), rtol=1e-5, atol=1e-5 * hessian(X).abs().max().item())
    empty = HessianAccumulator(256)
    assert torch.equal(empty.merge(merged).H, merged.H) and empty.n == 3000  # merging into an empty one copies it


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_identity_hessian_is_exactly_rtn(bits, group_size, symmetric):
    got = gptq_quantize(W, torch.eye(256), bits, group_size, symmetric).weight
    want = quantize_weight(W, bits, group_size, symmetric)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_beats_rtn_on_correlated_inputs(bits, group_size, act_order, static_groups):
    X = correlated_inputs()
    result = gptq_quantize(W, hessian(X), bits, group_size, act_order=act_order, static_groups=static_groups)
    gptq_error = (X @ (W - result.weight.dequantize()).T).norm()
    rtn_error = (X @ (W - quantize_weight(W, bits, group_size, False).dequantize()).T).norm()
    assert gptq_error < rtn_error
    # The reported relative error is ||(W - Q) X|| / ||W X|| computed from H.
    assert result.relative_error == pytest.approx((gptq_error / (X @ W.T).norm()).item(), rel=1e-3)


@pytest.mark.parametrize("group_size", [32, 64])
def test_act_order_g_idx_is_consistent_with_the_saved_layout(group_size):
    X = correlated_inputs() * torch.linspace(0.1, 3, 256)  # distinct Hessian diagonal: a real permutation
    result = gptq_quantize(W, hessian(X), 4, group_size, act_order=True)
    w = result.weight
    assert w.g_idx is not None and sorted(torch.bincount(w.g_idx).tolist()) == [group_size] * (256 // group_size)
    # Column c is in group g_idx[c]; the groups follow the order of decreasing H_ii.
    order = torch.argsort(torch.diag(hessian(X)), descending=True)
    assert torch.equal(w.g_idx[order], (torch.arange(256) // group_size).int())
    # The runtime module runs it on the int4 kernel by permuting the input, and agrees with dequantize.
    module = AffineLinear(w, dtype=torch.bfloat16)
    assert module.use_int4_kernel and act_order_permutation(w.g_idx, group_size) is not None
    x = torch.randn(3, 256)
    ref = x @ w.dequantize().T
    assert (module(x.bfloat16()).float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_static_groups_need_no_g_idx():
    X = correlated_inputs() * torch.linspace(0.1, 3, 256)
    w = gptq_quantize(W, hessian(X), 4, 64, act_order=True, static_groups=True).weight
    assert w.g_idx is None and w.scale.shape == (64, 4)


@pytest.mark.parametrize("dead", [[], [5], [0, 7, 200, 255]], ids=["none", "one", "four"])
def test_dead_inputs_are_zeroed_and_counted(dead):
    X = correlated_inputs()
    X[:, dead] = 0  # inputs that are never active
    result = gptq_quantize(W, hessian(X), 4, 64)
    assert result.dead_inputs == len(dead)
    w = result.weight
    for c in dead:  # quantized from 0: within one step of it
        assert (w.dequantize()[:, c].abs() <= w.scale[:, c // 64]).all()


def test_singular_hessian_retries_with_more_damping(caplog):
    H = -torch.eye(256)  # not positive definite at the default dampening
    H[0, 0] = 1000.0
    with caplog.at_level(logging.WARNING, logger="quantkit.backends.gptq.solver"):
        gptq_quantize(W, H, 4, 64, damp=0.01)
    assert "retrying with damp=0.1" in caplog.text


def test_hopeless_hessian_is_a_clear_error_and_no_retry_is_announced_after_the_last(caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit.backends.gptq.solver"):
        with pytest.raises(QuantkitError, match=r"^down_proj: the Hessian of its calibration inputs is not positive "
                                                r"definite even with damp=1000 \(100000x the requested 0.01\): the "
                                                r"inputs are degenerate .*more calibration samples \(--n-samples\), "
                                                r"longer windows \(--seq-len\) or a larger --damp$"):
            gptq_quantize(W, -torch.eye(256), 4, 64, name="down_proj")
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 5 and retries[-1].endswith("retrying with damp=1000")  # the 6th try is the last, silent


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_hessian_never_reaches_the_cholesky(bad, monkeypatch):
    import quantkit.backends.gptq.solver as solver

    monkeypatch.setattr(solver, "inverse_hessian_cholesky", lambda *a, **k: pytest.fail("dampened a non-finite H"))
    H = hessian(correlated_inputs())
    H[3, 3] = bad
    with pytest.raises(QuantkitError, match="^q_proj: the Hessian of its calibration inputs has NaN or Inf values: "
                                            "the inputs overflowed"):
        gptq_quantize(W, H, 4, 64, name="q_proj")


def test_mse_clipping_search_does_not_hurt():
    X = correlated_inputs()
    plain = gptq_quantize(W, hessian(X), 3, 64).relative_error
    assert gptq_quantize(W, hessian(X), 3, 64, mse=True).relative_error <= plain * 1.05


def direct_relative_error(W, Wq, H):
    dW = Wq - W
    return math.sqrt(((dW @ H) * dW).sum().item() / ((W @ H) * W).sum().item())


@pytest.mark.parametrize("case", ["plain", "act-order", "static", "dead inputs", "sym mse", "damp 0.1"])
def test_the_output_error_from_gptqs_losses_is_the_direct_one(case):
    """tr(dW H dW^T) = 2 sum(losses) - lambda ||dW||^2: the report needs no K x K product for its numerator."""
    X = correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    options = {"act-order": dict(act_order=True), "static": dict(act_order=True, static_groups=True),
               "sym mse": dict(symmetric=True, mse=True), "damp 0.1": dict(damp=0.1)}.get(case, {})
    if case == "dead inputs":
        H[:, 5:9] = 0
        H[5:9, :] = 0
    result = gptq_quantize(W, H, 3, 64, **options)
    Wq = result.weight.dequantize(torch.float32)
    if case == "dead inputs":
        assert result.dead_inputs == 4 and bool((Wq[:, 5:9] == 0).all())
    assert result.relative_error == pytest.approx(direct_relative_error(W, Wq, H), rel=1e-4)


GRID_CASES = {"plain": {}, "act-order": dict(act_order=True), "static": dict(act_order=True, static_groups=True),
              "sym mse": dict(symmetric=True, mse=True), "3 bits g32": dict(bits=3, group_size=32),
              "per channel": dict(group_size=-1), "block 32": dict(block_size=32), "dead inputs": dict(dead=True)}
GRID_DIGESTS = Path(__file__).parents[1] / "data" / "gptq_grid_digests.json"


def grid_digest(case: dict) -> str:
    """sha256 of the grid values, scales, zero points and g_idx GPTQ gives on a test Hessian (K = 512: 4 blocks)."""
    case = dict(case)
    X = correlated_inputs(K=512, tokens=4096, rank=64, seed=3)
    if case.pop("dead", False):
        X[:, [0, 100, 511]] = 0
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(4)) * 0.02
    kwargs = dict(bits=4, group_size=64) | case
    weight = gptq_quantize(w, hessian(X), **kwargs).weight
    digest = hashlib.sha256()
    for t in (weight.q, weight.scale, weight.zero, weight.g_idx):
        if t is not None:
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", GRID_CASES)
def test_the_grid_values_are_todays(case, one_thread):
    """The column loop's speed-ups and the in-place inverse keep GPTQ's results bit for bit: digests recorded with
    the solver before them (QUANTKIT_UPDATE_DIGESTS=1 re-records, deliberately, when the arithmetic must change)."""
    digest = grid_digest(GRID_CASES[case])
    recorded = json.loads(GRID_DIGESTS.read_text()) if GRID_DIGESTS.exists() else {}
    if os.environ.get("QUANTKIT_UPDATE_DIGESTS"):
        recorded[case] = digest
        GRID_DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    assert digest == recorded.get(case)


def test_the_inverse_is_computed_in_one_workspace_and_leaves_h_alone():
    """In place, the same bits as the out-of-place route (cholesky, cholesky_inverse, cholesky upper)."""
    H = hessian(correlated_inputs())
    before = H.clone()
    U, dampening = inverse_hessian_cholesky(H, 0.01)
    assert torch.equal(H, before)
    damped = H.clone()
    damped.diagonal().add_(0.01 * torch.mean(torch.diag(H)).item())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(U, expected)
    assert dampening == pytest.approx(0.01 * torch.diag(H).mean().item())


@pytest.mark.parametrize("case", ["plain", "act-order", "dead inputs"])
def test_the_callers_hessian_is_not_changed(case):
    X = correlated_inputs()
    if case == "dead inputs":
        X[:, [3, 9]] = 0
    H = hessian(X)
    before = H.clone()
    gptq_quantize(W, H, 4, 64, act_order=case == "act-order")
    assert torch.equal(H, before)
