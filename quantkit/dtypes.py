"""The dtype vocabulary, the one home for it: parsing user and config.json names, naming dtypes back.

Three spellings meet here: the short names users type (`fp16`, `bf16`, `fp32`), the names
config.json and transformers use (`float16`, `bfloat16`, `float32`), and safetensors' header codes
(`F16`, `BF16`, ...). Nothing else in quantkit spells a dtype.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

# config.json / transformers name -> torch dtype, for the float dtypes a model computes in.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # what users type
ALIASES: dict[str, str] = {**SHORT_NAMES, "half": "float16", "float": "float32"}
CHOICES = tuple(SHORT_NAMES)  # the CLI's --dtype choices

# safetensors header codes (its format spec), for the writer and for sizing files from headers alone.
FLOAT_DTYPES = tuple(DTYPES.values())

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.uint16: "U16",
    torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2"}
ST_ITEMSIZE: dict[str, int] = {code: dtype.itemsize for dtype, code in ST_DTYPES.items()}  # "F16" -> 2
ST_CODES: dict[str, torch.dtype] = {code: dtype for dtype, code in ST_DTYPES.items()}  # "BF16" -> torch.bfloat16


def overflow_hint(dtype: torch.dtype) -> str:
    """The likely cause of inf/NaN in a model computing in `dtype`, and the fix (for one-line errors)."""
    if dtype == torch.float16:
        return (f"likely an fp16 overflow (logits or activations beyond {torch.finfo(dtype).max:g}, as with a "
                f"bf16-trained model run in fp16): run it with --dtype bf16 or --dtype fp32")
    if dtype == torch.bfloat16:
        return "its weights or activations hold inf/NaN in bf16: try --dtype fp32, or check the checkpoint's tensors"
    return (f"its weights or activations hold inf/NaN even in {dtype_name(dtype)}: the checkpoint's tensors are "
            f"damaged or out of range (check them)")


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """'fp16' / 'float16' / 'torch.float16' / torch.float16 -> torch.float16; None stays None.

    Raises QuantkitError naming `what` (e.g. '--dtype', 'config.json torch_dtype') for other names.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    key = ALIASES.get(name, str(name).removeprefix("torch."))
    if key not in DTYPES:
        raise QuantkitError(f"unknown {what} {name!r}: use one of {', '.join(CHOICES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16': config.json's and transformers' spelling (any torch dtype)."""
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype | str) -> str:
    """torch.float16 or 'float16' -> 'fp16': the spelling users type."""
    name = dtype_name(parse_dtype(dtype))
    return next(short for short, full in SHORT_NAMES.items() if full == name)
