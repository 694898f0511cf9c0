"""What every Triton kernel of stdit shares: whether they can run here, which inputs they take, the
split of the head dim, the @triton.jit row loaders, host-side launch helpers, and the description
of a shipped kernel configuration (what `stdit inspect` compiles ahead of time).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from stdit.common.dtypes import short_name

# ----------------------------------------------------------------------------------------------------
# Where the kernels run and what they take
# ----------------------------------------------------------------------------------------------------

# Triton decides between interpreted and compiled kernels when @triton.jit runs, i.e. when this
# package's kernel modules are imported (stdit.kernels imports them up front). Read the switch once,
# here, so the backend's answers cannot drift from how its kernels actually run.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TL_DTYPES = {d: short_name(d) for d in (torch.float16, torch.bfloat16, torch.float32)}  # the ones our kernels take
SHIPPED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the order `stdit inspect` lists them
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when our kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def _interpreter_defect() -> str | None:
    """Why Triton's interpreter cannot run our kernels here, or None.

    Triton 3.6's interpreter passes a kernel's integer arguments as 1-element arrays and reads them
    back with int(array) (e.g. the bound of ``range(0, LEN, BLOCK_N)``), which NumPy 2.4 turned from a
    deprecation into a TypeError; Triton 3.7 squeezes the array first. The compiled kernels are not
    affected.
    """
    import numpy as np

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", version)[:2])

    if major_minor(triton.__version__) < (3, 7) and major_minor(np.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {np.__version__} (it reads "
                "integer arguments with int() of a 1-element array, an error since NumPy 2.4): use "
                "triton >= 3.7 or numpy < 2.4 for the interpreter")
    return None


def availability(device: torch.device) -> str | None:
    """None when our Triton kernels can run on ``device``; otherwise why not and what to do."""
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set; unset it to run the Triton kernels on the GPU"
        return None
    if device.type == "cpu":
        if interpreting():
            return _interpreter_defect()
        return (
            "Triton has no CPU backend; set TRITON_INTERPRET=1 to run the kernels through the "
            "interpreter (correctness only, slow), or use a CUDA device"
        )
    return f"device type {device.type!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"


def triton_takes(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether the attention kernels take this dtype and head dim (None: unknown, assume yes)."""
    return (dtype is None or dtype in TL_DTYPES) and (head_dim is None or 16 <= head_dim <= 128)


def check_dtype(name: str, x: torch.Tensor) -> None:
    """Raise a clear TypeError for a dtype no Triton kernel of ours takes."""
    if x.dtype not in TL_DTYPES:
        raise TypeError(
            f"{name}: the triton backend takes float16, bfloat16 or float32, got {x.dtype} "
            "(use backend='reference' for float64)"
        )


def check_attention_input(name: str, x: torch.Tensor) -> None:
    """Raise a clear error for an attention input (..., H, D) with batch B that the kernels do not take."""
    check_dtype(name, x)
    D = x.shape[-1]
    if not triton_takes(None, D):
        raise ValueError(f"{name}: the triton backend takes head dims 16..128, got D = {D}")
    if x.shape[0] * x.shape[-2] > 65535:  # B*H is the grid's second axis, capped by CUDA
        raise ValueError(f"{name}: the triton backend takes B*H <= 65535, got B*H = {x.shape[0] * x.shape[-2]}")


# ----------------------------------------------------------------------------------------------------
# Head dim
# ----------------------------------------------------------------------------------------------------


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


TileTable = dict[tuple[str, int], tuple[tuple[int, ...], ...]]


def tile_entry(table: TileTable, kernel: str, D: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The entry of ``kernel`` in a tile table for head dim D and inputs of ``dtype``: tables hold one
    row per (kernel, input width: 16-bit or 32), one entry per head-dim class in HEAD_CLASSES."""
    return table[(kernel, 32 if dtype == torch.float32 else 16)][HEAD_CLASSES.index(head_class(D))]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact ("ieee") dot products so fp32 results stay fp32-accurate on GPUs too
    (the GPU default would be tf32); 16-bit inputs use the tensor cores' native precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------
# @triton.jit helpers of the attention kernels: rows of (rows x D) tiles addressed by strides
# ----------------------------------------------------------------------------------------------------


@triton.jit
def row_offsets(head, tok, stride_n, ALIGN: tl.constexpr):
    """Element offset of each row's first element: head offset + token * token stride.

    Every offset is a multiple of ALIGN (the host checks strides and base addresses), which tells
    Triton how aligned rows start; with the usual ALIGN of 16 bytes, loads along D vectorize
    (8 bf16 per access) even for D = 72.
    """
    return tl.multiple_of(head + tok.to(tl.int64) * stride_n, ALIGN)


@triton.jit
def load_rows(ptr, rows, valid, offs_d, D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, len(offs_d)) tile: row r starts at ptr + rows[r]; masked past D / invalid rows."""
    x = tl.load(ptr + rows[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # Triton's interpreter computes garbage in bf16 arithmetic: upcast right after loading
        x = x.to(tl.float32)
    return x


# Triton's interpreter casts fp32 to bf16 by truncation; the GPU (and torch) round to nearest even.
# Truncation is biased, and its bias adds up in long sums (e.g. a gain's gradient over all tokens),
# so under the interpreter to_dtype rounds to bf16 by hand. Compiled kernels never see this branch.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(_INTERPRETING)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to nearest even in DTYPE."""
    y = x.to(DTYPE)
    if _ROUND_BF16_BY_HAND:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round the low 16 bits away, ties to even
            y = bits.to(tl.float32, bitcast=True).to(DTYPE)  # exact: the value is a bf16 now
    return y


@triton.jit
def store_rows(ptr, rows, valid, offs_d, D: tl.constexpr, x):
    """Store tile x in ptr's dtype: row r at ptr + rows[r]; masked past D / invalid rows."""
    mask = valid[:, None] & (offs_d[None, :] < D)
    tl.store(ptr + rows[:, None] + offs_d[None, :], to_dtype(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round fp32 values to the input dtype before a tensor-core dot (as FlashAttention does)."""
    x = to_dtype(x, DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


# ----------------------------------------------------------------------------------------------------
# Host-side launch helpers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """Tiling of one launch: BLOCK_M query rows x BLOCK_N key rows (packed: both are the tile)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1


# Tests set this: every buffer a kernel is meant to fill completely starts NaN-filled, so an element a
# kernel forgot to write shows up as NaN instead of as whatever memory held.
poison_outputs = False


def new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized buffer (NaN-filled when ``poison_outputs``) that a kernel writes in full."""
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if poison_outputs:
        t.fill_(float("nan"))
    return t


def unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride, else a contiguous copy. The kernels address rows by
    strides but assume unit stride along D (or C): the only copy they ever make, and only for exotic
    views such as a transposed head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def alignment(*tensors: torch.Tensor) -> int:
    """The largest ALIGN (elements, <= 16 bytes' worth) dividing every row/head/batch stride and every
    base address: the kernels promise Triton that row offsets are multiples of it, which is what
    lets loads along D vectorize. Open-Sora layouts get the full 16 bytes (every stride is a
    multiple of D = 72, itself a multiple of 8)."""
    size = tensors[0].element_size()
    align = 16 // size
    while align > 1 and not all(
        t.data_ptr() % (align * t.element_size()) == 0 and all(st % align == 0 for st in t.stride()[:-1]) for t in tensors
    ):
        align //= 2
    return align


def attention_constexprs(D: int, dtype: torch.dtype, align: int) -> dict:
    """Compile-time constants shared by every attention launch: head-dim split, alignment, interpreter mode."""
    d0, d1 = split_head_dim(D)
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(D=D, ALIGN=align, BLOCK_D0=d0, BLOCK_D1=d1, UPCAST=upcast, DOT_PREC=dot_precision(dtype))


# ----------------------------------------------------------------------------------------------------
# Shipped configurations, as `stdit inspect` compiles them
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelBuild:
    """One shipped kernel configuration, as `stdit inspect` compiles it ahead of time.

    ``signature`` maps every argument of ``fn`` to a Triton type string ("*bf16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives the value of every constexpr argument. ``num_warps`` and
    ``num_stages`` are the launch options the host launcher uses for this configuration.
    """

    name: str  # e.g. "self_attn_fwd_packed[D=72,bf16,128x128,w8]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    uses_mma: bool = True  # whether the hot loop runs on tensor cores (so sm_90 must use wgmma); fp32 "ieee" dots do not
    tags: dict[str, Any] = field(default_factory=dict)


# Pointer arguments of our kernels, and the element type of those that do not follow the input dtype.
_POINTERS = {
    "QKV", "O", "DO", "DQKV", "Q", "KV", "DQ", "LSE", "DELTA", "DKV", "LENS",  # attention
    "QW", "KW", "QKW", "COS", "SIN", "PART",  # q/k RMSNorm gains, RoPE tables, partial gain gradients
    "X", "Y", "SHIFT", "SCALE", "GATE", "OUT", "DX", "DY", "DOUT", "MEAN", "RSTD", "DSHIFT", "DSCALE", "DGATE",
}  # fmt: skip
_POINTER_DTYPES = {
    "LSE": "fp32", "DELTA": "fp32", "DKV": "fp32", "LENS": "i32",
    "QW": "fp32", "KW": "fp32", "QKW": "fp32", "COS": "fp32", "SIN": "fp32", "PART": "fp32",
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


def attention_build(name: str, fn: Any, t: Tiles, dtype: torch.dtype, D: int, blocks: dict[str, Any]) -> KernelBuild:
    """The build of attention kernel ``fn`` at tiling ``t`` as its launcher runs it on a GPU: 16-byte
    aligned rows, no interpreter upcast, ``blocks`` the kernel's tile constexprs."""
    c = dict(attention_constexprs(D, dtype, 16 // dtype.itemsize), UPCAST=False, **blocks)
    tags: dict[str, Any] = {"dtype": TL_DTYPES[dtype], "head_dim": D}
    if dtype == torch.float32:  # why there is no wgmma: exact fp32 dots multiply on the FMA units
        tags["note"] = "fp32 uses exact fp32 dots (input_precision='ieee') on FMA units; wgmma is for 16-bit"
    tag = f"D={D},{TL_DTYPES[dtype]},{t.block_m}x{t.block_n},w{t.num_warps}"
    return KernelBuild(
        f"{name}[{tag}]", fn, signature_of(fn, dtype, c), c, t.num_warps, t.num_stages,
        uses_mma=dtype != torch.float32, tags=tags,
    )  # fmt: skip
