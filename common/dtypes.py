"""The one table of dtypes: short names ("bf16"), torch dtypes and bytes per element.

Configs, result rows, cost models and kernel tables all name dtypes; they all read them here so
"bf16", "bfloat16" and torch.bfloat16 mean the same thing everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "FLOAT_DTYPES", "as_dtype", "dtype_bytes", "short_name"]

# short name -> torch dtype (the names result rows, configs and kernel tables use)
DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPES.values())

# other spellings of the same dtypes
_ALIASES = {
    "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32", "float": "fp32",
    "float64": "fp64", "double": "fp64",
}  # fmt: skip
# names with a size but no torch dtype of their own here (cost models of tensor-core formats)
_EXTRA_BYTES = {"tf32": 4, "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _key(name: str) -> str:
    key = name.lower().removeprefix("torch.")
    return _ALIASES.get(key, key)


def as_dtype(dtype: torch.dtype | str, arg: str = "dtype") -> torch.dtype:
    """torch.bfloat16, "bf16", "bfloat16" or "torch.bfloat16" -> torch.bfloat16 (ValueError naming
    ``arg`` otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and _key(dtype) in DTYPES:
        return DTYPES[_key(dtype)]
    raise ValueError(f"{arg}: expected a torch dtype or one of {sorted(DTYPES)} (or its torch name), got {dtype!r}")


def short_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 (or any spelling of it) -> "bf16"."""
    dtype = as_dtype(dtype)
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).removeprefix("torch.")  # pragma: no cover - as_dtype only returns table dtypes


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a name ("bf16", "fp32", "tf32", "fp8", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(dtype, str):
        key = _key(dtype)
        if key in DTYPES:
            return DTYPES[key].itemsize
        if key in _EXTRA_BYTES:
            return _EXTRA_BYTES[key]
    known = sorted([*DTYPES, *_ALIASES, *_EXTRA_BYTES])
    raise ValueError(f"dtype: expected a torch dtype or one of {known}, got {dtype!r}")
