"""Helpers shared by the Triton kernels: availability, interpreter detection, head-dim splitting, and
the description of every shipped kernel configuration (what `stdit inspect` compiles ahead of time).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch


# Triton decides between interpreted and compiled kernels when @triton.jit runs, i.e. when this
# package's kernel modules are imported (stdit.kernels imports them up front). Read the switch once,
# here, so the backend's answers cannot drift from how its kernels actually run.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when our kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def triton_takes(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether the triton backend takes this dtype and head dim (None: unknown, assume yes)."""
    return (dtype is None or dtype in TL_DTYPES) and (head_dim is None or 16 <= head_dim <= 128)


def triton_availability(device: torch.device) -> str | None:
    """None when our Triton kernels can run on ``device``; otherwise why not and what to do."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install 'triton>=3.6')"
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set; unset it to run the Triton kernels on the GPU"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return (
            "Triton has no CPU backend; set TRITON_INTERPRET=1 to run the kernels through the "
            "interpreter (correctness only, slow), or use a CUDA device"
        )
    return f"device type {device.type!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"


def split_head_dim(D: int) -> tuple[int, int]:
    """Split head dim D into two power-of-two chunks (D0, D1) for tl.dot, with D1 = 0 when D is a
    power of two.

    D0 is the largest power of two <= D (at least 16); D1 covers the remainder, rounded up to a power
    of two (at least 16, the smallest tl.dot operand) and masked past D. D = 72 runs as 64 + 16
    (8 masked columns): 80/72 = 1.11x the MMA work, where power-of-two padding would run it as 128
    (1.78x). D = 96 is 64 + 32 (exact), 80 is 64 + 16 (exact), 48 is 32 + 16 (exact).
    """
    if D < 16 or D > 128:
        raise ValueError(f"head dim D: expected 16 <= D <= 128 for the triton backend, got {D}")
    d0 = 1 << (D.bit_length() - 1)
    rest = D - d0
    if rest == 0:
        return d0, 0
    d1 = max(16, 1 << (rest - 1).bit_length())
    return d0, d1


# Head dims whose configurations `stdit inspect` compiles: one per head-dim class and the STDiT ones.
SHIPPED_HEAD_DIMS = (32, 64, 72, 80, 96, 128)
HEAD_CLASSES = (32, 64, 80, 96, 128)


def head_class(D: int) -> int:
    """The tile-table class of head dim D: the smallest class >= its padded width D0 + D1."""
    width = sum(split_head_dim(D))
    return next(c for c in HEAD_CLASSES if c >= width)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact ("ieee") dot products so fp32 results stay fp32-accurate on GPUs too
    (the GPU default would be tf32); 16-bit inputs use the tensor cores' native precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Tests set this: every buffer a kernel is meant to fill completely starts NaN-filled, so an element a
# kernel forgot to write shows up as NaN instead of as whatever memory held.
poison_outputs = False


def new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized buffer (NaN-filled when ``poison_outputs``) that a kernel writes in full."""
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if poison_outputs:
        t.fill_(float("nan"))
    return t


TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelBuild:
    """One shipped kernel configuration, as `stdit inspect` compiles it ahead of time.

    ``signature`` maps every argument of ``fn`` to a Triton type string ("*bf16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives the value of every constexpr argument. ``num_warps`` and
    ``num_stages`` are the launch options the host launcher uses for this configuration.
    """

    name: str  # e.g. "self_attn_fwd[D=72,bf16,BLOCK_M=128]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    uses_mma: bool = True  # whether the hot loop runs on tensor cores (so sm_90 must use wgmma); fp32 "ieee" dots do not
    tags: dict[str, Any] = field(default_factory=dict)



def build_tags(dtype: torch.dtype, D: int) -> dict[str, Any]:
    """What `stdit inspect` reports beside a shipped build: its dtype, head dim, and for fp32 why
    there is no wgmma (the exact-fp32 path multiplies on the FMA units, not the tensor cores)."""
    tags: dict[str, Any] = {"dtype": TL_DTYPES[dtype], "head_dim": D}
    if dtype == torch.float32:
        tags["note"] = "fp32 uses exact fp32 dots (input_precision='ieee') on FMA units; wgmma is for 16-bit"
    return tags


# Pointer arguments of our kernels, and the element type of those that do not follow the input dtype.
_POINTERS = {
    "QKV", "O", "DO", "DQKV", "Q", "KV", "DQ", "LSE", "DELTA", "DKV", "LENS",  # attention
    "X", "Y", "SHIFT", "SCALE", "GATE", "OUT", "DX", "DY", "DOUT", "MEAN", "RSTD", "DSHIFT", "DSCALE", "DGATE",
}  # fmt: skip
_POINTER_DTYPES = {
    "LSE": "fp32", "DELTA": "fp32", "DKV": "fp32", "LENS": "i32",
    "MEAN": "fp32", "RSTD": "fp32", "DSHIFT": "fp32", "DSCALE": "fp32", "DGATE": "fp32",
}  # fmt: skip


def signature_of(fn: Any, dtype: torch.dtype, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton type strings for every argument of a kernel written in this package's convention:
    names in _POINTERS are pointers (of the input dtype unless listed in _POINTER_DTYPES), ``*_scale``
    and ``eps`` arguments are fp32, every other runtime argument is i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = "*" + _POINTER_DTYPES.get(name, TL_DTYPES[dtype])
        elif name.endswith("_scale") or name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig
