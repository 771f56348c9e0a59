"""The dtype vocabulary: every spelling parses, names round-trip, bad names say the choices."""

import pytest
import torch

from quantkit.dtypes import CHOICES, dtype_name, parse_dtype, short_name
from quantkit.errors import QuantkitError


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
                                         ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                                         ("fp32", torch.float32), (torch.float32, torch.float32), (None, None)])
def test_parse(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("short", CHOICES)
def test_names_round_trip(short):
    dtype = parse_dtype(short)
    assert short_name(dtype) == short and parse_dtype(dtype_name(dtype)) is dtype


def test_unknown_names_the_option_and_the_choices():
    with pytest.raises(QuantkitError, match=r"unknown --dtype 'fp8': use one of fp32, fp16, bf16"):
        parse_dtype("fp8", "--dtype")
