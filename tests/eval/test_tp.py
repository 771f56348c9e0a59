"""The pretraining_tp comparison: the fp16/bf16 noise floor of dense and quantized models."""

from __future__ import annotations

import pytest

import quantkit
from quantkit.eval import text_data
from quantkit.eval.report import noise_floor
from quantkit.eval.tp import choose_tps, subset, tp_comparison
from quantkit.backends.int4 import Int4Config
from quantkit.errors import QuantkitError
from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, peaked_model, tiny_config

TEXT = (DEMO_MODEL / "test.txt").read_text(encoding="utf-8")[:1200]
ROW_KEYS = {"dtype", "tp", "max_abs_dlogit", "kl_mean", "kl_p99", "top1", "ppl"}


@pytest.fixture(scope="module")
def data(tokenizer_file):
    return text_data(quantkit.load_tokenizer(tokenizer_file), TEXT, seq_len=32)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_model(peaked_model(), tmp_path_factory.mktemp("dense") / "m", tokenizer_dir=DEMO_MODEL)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    """int4 with groups of 32: o_proj has 64 input columns, so tp 2 slices hold whole groups and tp 4 cannot."""
    model = quantkit.quantize(peaked_model(), Int4Config(group_size=32))
    return quantkit.save_quantized(model, tmp_path_factory.mktemp("int4") / "m", tokenizer_dir=DEMO_MODEL)


@pytest.fixture(scope="module")
def dense_section(dense_dir, data):
    return tp_comparison(dense_dir, data, max_windows=2, progress=False)


def test_dense_model_rows(dense_section):
    rows = dense_section["rows"]
    assert [(r["dtype"], r["tp"]) for r in rows] == [(d, tp) for d in ("fp16", "bf16") for tp in (1, 2, 4, 8)]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert all(0 <= r["top1"] <= 1 and r["kl_mean"] >= 0 and r["kl_p99"] >= 0 and r["ppl"] > 1 for r in rows)
    assert all(r["max_abs_dlogit"] > 0 for r in rows)  # half precision always moves something
    assert dense_section["unsupported"] == []
    assert dense_section["reference"] == "fp32, pretraining_tp=1, 2 windows of 32"


def test_fp16_is_much_closer_than_bf16(dense_section):
    # 10 mantissa bits against 7: on this model fp16 reads ~7e-7 nats and bf16 ~4e-5
    by_dtype = {d: [r for r in dense_section["rows"] if r["dtype"] == d] for d in ("fp16", "bf16")}
    assert max(r["kl_mean"] for r in by_dtype["fp16"]) < min(r["kl_mean"] for r in by_dtype["bf16"]) / 10
    assert max(r["max_abs_dlogit"] for r in by_dtype["fp16"]) < min(r["max_abs_dlogit"] for r in by_dtype["bf16"])


def test_fp32_at_tp_1_is_the_reference_itself(dense_dir, data):
    section = tp_comparison(dense_dir, data, tps=[2], dtypes=("fp32",), max_windows=2, progress=False)
    same, split = section["rows"]
    assert (same["tp"], same["max_abs_dlogit"], same["kl_mean"], same["top1"]) == (1, 0.0, 0.0, 1.0)
    # slicing o_proj/down_proj into column parts changes the order of the fp32 sums, a little
    assert split["tp"] == 2 and 0 < split["max_abs_dlogit"] < 1e-4


def test_quantized_model_reports_unsliceable_tps(int4_dir, data):
    section = tp_comparison(int4_dir, data, max_windows=2, progress=False)
    assert [(r["dtype"], r["tp"]) for r in section["rows"]] == [("fp16", 1), ("fp16", 2), ("bf16", 1), ("bf16", 2)]
    assert [u["tp"] for u in section["unsupported"]] == [4, 8]  # once each, not once per dtype
    reason = section["unsupported"][0]["reason"]
    assert "o_proj" in reason and "group size 32" in reason and "16" in reason
    assert all(0 <= r["top1"] <= 1 and r["kl_mean"] >= 0 for r in section["rows"])


def test_quantized_model_explicit_tps(int4_dir, data):
    section = tp_comparison(int4_dir, data, tps=[2, 4], dtypes=("fp16",), max_windows=1, progress=False)
    assert [r["tp"] for r in section["rows"]] == [1, 2]
    assert [u["tp"] for u in section["unsupported"]] == [4]


@pytest.mark.parametrize("tp", [3, 5])
def test_a_tp_that_does_not_divide(dense_dir, data, tp):
    with pytest.raises(QuantkitError, match=f"--tp {tp} does not divide .*hidden_size=64"):
        tp_comparison(dense_dir, data, tps=[tp], max_windows=1, progress=False)


@pytest.mark.parametrize("overrides,requested,expected", [
    ({}, None, [2, 4, 8]),
    ({}, [], [2, 4, 8]),
    ({"vocab_size": 4100}, None, [2, 4]),  # 4100 = 4 * 1025
    ({"vocab_size": 4097}, None, []),
    ({}, [8, 2, 2, 1], [2, 8]),  # tp 1 is the reference's own row, not a comparison
])
def test_choose_tps(overrides, requested, expected):
    assert choose_tps(tiny_config(**overrides), requested) == expected


def test_subset_fits_the_reference_budget(data, monkeypatch):
    assert len(subset(data, None, 4096).windows) == len(data.windows)  # a few windows are far below 1 GiB
    monkeypatch.setattr("quantkit.eval.tp.REFERENCE_BUDGET", 2 * 32 * 4096 * 4)  # room for two windows of fp32 logits
    assert subset(data, None, 4096).windows == data.windows[:2]
    assert subset(data, 1, 4096).windows == data.windows[:1]


def test_noise_floor():
    rows = [{"tp": 1, "kl_mean": 9.0}, {"tp": 2, "kl_mean": 1e-5}, {"tp": 4, "kl_mean": 3e-5},
            {"tp": 8, "kl_mean": 2e-5}]
    assert noise_floor({"rows": rows}) == 3e-5  # the tp = 1 rows are not the tp noise
    assert noise_floor({"rows": rows[:1]}) is None
    assert noise_floor(None) is None and noise_floor({}) is None


def test_noise_floor_of_a_real_section(dense_section):
    expected = max(r["kl_mean"] for r in dense_section["rows"] if r["tp"] > 1)
    assert noise_floor(dense_section) == expected > 0
