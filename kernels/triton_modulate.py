"""Triton kernels for STDiT's adaLN-style elementwise ops: layernorm + modulate, and the gated residual.

    layernorm_modulate:  y   = LN(x) * (1 + scale) + shift     x (B, N, C); shift, scale per sample (B, C)
    gated_residual:      out = x + gate * y                    x, y (B, N, C); gate per sample (B, C)

LN has no affine parameters (Open-Sora's ``norm1``/``norm2`` are ``elementwise_affine=False``); its
statistics are fp32 whatever the input dtype, and every value is upcast to fp32 right after loading.

Tiling: the grid is (cdiv(N, BLOCK_N), B). A program owns BLOCK_N consecutive tokens of ONE sample, so
that sample's shift/scale/gate row is loaded once, and walks them ROWS tokens at a time as a
(ROWS, BLOCK_C) tile, BLOCK_C = next power of two >= C (masked). A whole row is one tile, so the LN
reductions are single in-register sums.

Backward (xhat = (x - mean) * rstd, g = dy * (1 + scale), means over the C channels):
    dx     = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dshift = sum over tokens of dy          dscale = sum over tokens of dy * xhat
    gated residual: dx = dout, dy = gate * dout, dgate = sum over tokens of dout * y
The per-sample sums run over the N tokens of that sample only. Each program writes its BLOCK_N-token
partial sum to an fp32 buffer (num_blocks, B, C); the host sums over num_blocks. No atomics, so the
result is deterministic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import (
    SHIPPED_DTYPES,
    TL_DTYPES,
    KernelBuild,
    alignment,
    check_dtype,
    new_output,
    signature_of,
    unit_stride_last,
)

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid_n, start, N, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Token indices of the ROWS-row step at ``start`` within program pid_n's block, and validity."""
    rows = start + tl.arange(0, ROWS)
    valid = (rows < (pid_n + 1) * BLOCK_N) & (rows < N)
    return rows, valid


@triton.jit
def _row_offsets(b, rows, stride_b, stride_n, ALIGN: tl.constexpr):
    """Element offset of each token's first channel; a multiple of ALIGN (the host checks), which
    lets loads along C vectorize."""
    return tl.multiple_of(b * stride_b + rows.to(tl.int64) * stride_n, ALIGN)


@triton.jit
def _load_tile(ptr, offs, offs_c, mask):
    return tl.load(ptr + offs[:, None] + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_row(ptr, b, stride_b, offs_c, mask_c):
    """One sample's (C,) modulation row, as fp32."""
    return tl.load(ptr + b * stride_b + offs_c, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def _ln_modulate_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD,
    x_stride_b, x_stride_n, shift_stride_b, scale_stride_b, y_stride_b, y_stride_n,
    N, C, eps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    shift = _load_row(SHIFT, b, shift_stride_b, offs_c, mask_c)
    scale1 = 1.0 + _load_row(SCALE, b, scale_stride_b, offs_c, mask_c)
    for start in range(pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, ROWS):
        rows, valid = _tile(pid_n, start, N, BLOCK_N, ROWS)
        mask = valid[:, None] & mask_c[None, :]
        x = _load_tile(X, _row_offsets(b, rows, x_stride_b, x_stride_n, ALIGN), offs_c, mask)
        mean = tl.sum(x, 1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
        y = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
        y_offs = _row_offsets(b, rows, y_stride_b, y_stride_n, ALIGN)
        tl.store(Y + y_offs[:, None] + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)
        stat = b * N + rows
        tl.store(MEAN + stat, mean, mask=valid)
        tl.store(RSTD + stat, rstd, mask=valid)


@triton.jit
def _ln_modulate_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD, DX, DSHIFT, DSCALE,
    dy_stride_b, dy_stride_n, x_stride_b, x_stride_n, scale_stride_b, dx_stride_b, dx_stride_n,
    N, C,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale1 = 1.0 + _load_row(SCALE, b, scale_stride_b, offs_c, mask_c)
    dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, ROWS):
        rows, valid = _tile(pid_n, start, N, BLOCK_N, ROWS)
        mask = valid[:, None] & mask_c[None, :]
        x = _load_tile(X, _row_offsets(b, rows, x_stride_b, x_stride_n, ALIGN), offs_c, mask)
        dy = _load_tile(DY, _row_offsets(b, rows, dy_stride_b, dy_stride_n, ALIGN), offs_c, mask)
        stat = b * N + rows
        mean = tl.load(MEAN + stat, mask=valid, other=0.0)
        rstd = tl.load(RSTD + stat, mask=valid, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * scale1[None, :]  # gradient w.r.t. xhat; 0 where masked since dy is
        mean_g = tl.sum(g, 1) / C
        mean_gx = tl.sum(g * xhat, 1) / C
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        dx_offs = _row_offsets(b, rows, dx_stride_b, dx_stride_n, ALIGN)
        tl.store(DX + dx_offs[:, None] + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dshift += tl.sum(dy, 0)
        dscale += tl.sum(dy * xhat, 0)
    # this block's partial sums over its tokens: buffers (num_blocks, B, C), fp32, summed on the host
    part = (pid_n * tl.num_programs(1) + b) * C + offs_c
    tl.store(DSHIFT + part, dshift, mask=mask_c)
    tl.store(DSCALE + part, dscale, mask=mask_c)


@triton.jit
def _gated_residual_fwd_kernel(
    X, GATE, Y, OUT,
    x_stride_b, x_stride_n, gate_stride_b, y_stride_b, y_stride_n, out_stride_b, out_stride_n,
    N, C,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    gate = _load_row(GATE, b, gate_stride_b, offs_c, mask_c)
    for start in range(pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, ROWS):
        rows, valid = _tile(pid_n, start, N, BLOCK_N, ROWS)
        mask = valid[:, None] & mask_c[None, :]
        x = _load_tile(X, _row_offsets(b, rows, x_stride_b, x_stride_n, ALIGN), offs_c, mask)
        y = _load_tile(Y, _row_offsets(b, rows, y_stride_b, y_stride_n, ALIGN), offs_c, mask)
        out = x + gate[None, :] * y
        o_offs = _row_offsets(b, rows, out_stride_b, out_stride_n, ALIGN)
        tl.store(OUT + o_offs[:, None] + offs_c[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, GATE, Y, DY, DGATE,
    dout_stride_b, dout_stride_n, gate_stride_b, y_stride_b, y_stride_n, dy_stride_b, dy_stride_n,
    N, C,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """dy = gate * dout, and this block's partial of dgate = sum over tokens of dout * y (dx = dout
    needs no kernel)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    gate = _load_row(GATE, b, gate_stride_b, offs_c, mask_c)
    dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N, ROWS):
        rows, valid = _tile(pid_n, start, N, BLOCK_N, ROWS)
        mask = valid[:, None] & mask_c[None, :]
        dout = _load_tile(DOUT, _row_offsets(b, rows, dout_stride_b, dout_stride_n, ALIGN), offs_c, mask)
        y = _load_tile(Y, _row_offsets(b, rows, y_stride_b, y_stride_n, ALIGN), offs_c, mask)
        dy_offs = _row_offsets(b, rows, dy_stride_b, dy_stride_n, ALIGN)
        tl.store(DY + dy_offs[:, None] + offs_c[None, :], (gate[None, :] * dout).to(DY.dtype.element_ty), mask=mask)
        dgate += tl.sum(dout * y, 0)
    tl.store(DGATE + (pid_n * tl.num_programs(1) + b) * C + offs_c, dgate, mask=mask_c)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """BLOCK_N tokens per program, walked ROWS at a time as a (ROWS, BLOCK_C) tile, on num_warps warps."""

    block_n: int
    rows: int
    num_warps: int


# Tiles of at most 2048 fp32 values on 4-8 warps: <= 16 values per thread per live tile, so the
# backward's five live tiles and two (BLOCK_C,) accumulators stay in registers (`stdit inspect`).
_TILE_ELEMS = 2048
_BLOCK_N = 64  # tokens per program: num_blocks = N / 64 partial rows, e.g. 64 for N = 4096
_override: Config | None = None


@contextlib.contextmanager
def config_override(block_n: int, rows: int, num_warps: int = 4):
    """Force BLOCK_N and ROWS (powers of two, rows <= block_n). For tests: small blocks make small N
    span several programs, so the partial-sum reduction over token blocks is exercised."""
    global _override
    for name, v in (("block_n", block_n), ("rows", rows)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}: expected a power of two, got {v}")
    if rows > block_n:
        raise ValueError(f"rows: expected <= block_n = {block_n}, got {rows}")
    old, _override = _override, Config(block_n, rows, num_warps)
    try:
        yield
    finally:
        _override = old


def config(C: int) -> Config:
    """The shipped tiling for C channels (the same for every dtype: values are fp32 once loaded)."""
    if _override is not None:
        return _override
    block_c = triton.next_power_of_2(C)
    rows = max(1, _TILE_ELEMS // block_c)
    warps = 8 if block_c * rows >= 2048 else 4
    return Config(_BLOCK_N, min(rows, _BLOCK_N), warps)


def _consts(C: int, align: int) -> dict:
    cfg = config(C)
    return dict(BLOCK_N=cfg.block_n, ROWS=cfg.rows, BLOCK_C=triton.next_power_of_2(C), ALIGN=align,
                num_warps=cfg.num_warps, num_stages=1)  # fmt: skip


def _per_sample(m: torch.Tensor) -> torch.Tensor:
    """(B, 1, C) or (B, C) -> a (B, C) view with unit stride along C."""
    return unit_stride_last(m[:, 0] if m.dim() == 3 else m)


def _grid(N: int, B: int, block_n: int) -> tuple[int, int]:
    return (triton.cdiv(N, block_n), B)


def ln_modulate_forward(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, N, C) -> (y (B, N, C), mean (B, N) fp32, rstd (B, N) fp32)."""
    x = unit_stride_last(x)
    shift, scale = _per_sample(shift), _per_sample(scale)
    B, N, C = x.shape
    y = new_output((B, N, C), x)
    mean = new_output((B, N), x, torch.float32)
    rstd = new_output((B, N), x, torch.float32)
    if y.numel() == 0:
        return y, mean, rstd
    consts = _consts(C, alignment(x, y))
    _ln_modulate_fwd_kernel[_grid(N, B, consts["BLOCK_N"])](
        x, shift, scale, y, mean, rstd,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), y.stride(0), y.stride(1),
        N, C, eps, **consts,
    )  # fmt: skip
    return y, mean, rstd


def ln_modulate_backward(
    dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (B, N, C), dshift and dscale in the shapes of shift and scale)."""
    shift_shape, scale_shape = shift.shape, scale.shape
    x, dy = unit_stride_last(x), unit_stride_last(dy)
    scale = _per_sample(scale)
    B, N, C = x.shape
    dx = new_output((B, N, C), x)
    consts = _consts(C, alignment(x, dy, dx))
    nb = triton.cdiv(N, consts["BLOCK_N"])
    dshift = new_output((nb, B, C), x, torch.float32)
    dscale = new_output((nb, B, C), x, torch.float32)
    if dx.numel() > 0:
        _ln_modulate_bwd_kernel[_grid(N, B, consts["BLOCK_N"])](
            dy, x, scale, mean, rstd, dx, dshift, dscale,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), scale.stride(0), dx.stride(0), dx.stride(1),
            N, C, **consts,
        )  # fmt: skip
    return dx, dshift.sum(0).to(x.dtype).view(shift_shape), dscale.sum(0).to(x.dtype).view(scale_shape)


def gated_residual_forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y (B, N, C), gate (B, 1, C) or (B, C) -> x + gate * y (B, N, C)."""
    x, y, gate = unit_stride_last(x), unit_stride_last(y), _per_sample(gate)
    B, N, C = x.shape
    out = new_output((B, N, C), x)
    if out.numel() == 0:
        return out
    consts = _consts(C, alignment(x, y, out))
    _gated_residual_fwd_kernel[_grid(N, B, consts["BLOCK_N"])](
        x, gate, y, out,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        N, C, **consts,
    )  # fmt: skip
    return out


def gated_residual_backward(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate in gate's shape, dy (B, N, C)); dx is dout itself."""
    gate_shape = gate.shape
    dout, y, gate = unit_stride_last(dout), unit_stride_last(y), _per_sample(gate)
    B, N, C = y.shape
    dy = new_output((B, N, C), y)
    consts = _consts(C, alignment(dout, y, dy))
    nb = triton.cdiv(N, consts["BLOCK_N"])
    dgate = new_output((nb, B, C), y, torch.float32)
    if dy.numel() > 0:
        _gated_residual_bwd_kernel[_grid(N, B, consts["BLOCK_N"])](
            dout, gate, y, dy, dgate,
            dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1), dy.stride(0), dy.stride(1),
            N, C, **consts,
        )  # fmt: skip
    return dgate.sum(0).to(y.dtype).view(gate_shape), dy


# ----------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops, so torch.compile traces callers without graph breaks
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("stdit::triton_layernorm_modulate", mutates_args=())
def _ln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_forward(x, shift, scale, eps)


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps):
    B, N, C = x.shape
    return x.new_empty((B, N, C)), x.new_empty((B, N), dtype=torch.float32), x.new_empty((B, N), dtype=torch.float32)


@torch.library.custom_op("stdit::triton_layernorm_modulate_backward", mutates_args=())
def _ln_modulate_backward_op(
    dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_backward(dy, x, shift, scale, mean, rstd)


@_ln_modulate_backward_op.register_fake
def _(dy, x, shift, scale, mean, rstd):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _ln_setup_context(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, mean, rstd)


def _ln_backward(ctx, dy, dmean, drstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _ln_modulate_backward_op(dy, x, shift, scale, mean, rstd)
    return dx, dshift, dscale, None


_ln_modulate_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)


@torch.library.custom_op("stdit::triton_gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, gate, y)


@_gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("stdit::triton_gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(
    dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(dout, gate, y)


@_gated_residual_backward_op.register_fake
def _(dout, gate, y):
    return gate.new_empty(gate.shape), y.new_empty(y.shape)


def _gr_setup_context(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gr_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dgate, dy = _gated_residual_backward_op(dout, gate, y)
    return dout, dgate, dy  # dx = dout: outside the op, since an op's outputs may not alias its inputs


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup_context)


def check_input(x: torch.Tensor) -> None:
    """Raise a clear error for an x (B, N, C) that these kernels do not take."""
    check_dtype("x", x)
    if x.shape[0] > 65535:  # B is the grid's second axis, capped by CUDA
        raise ValueError(f"x: the triton backend takes B <= 65535, got B = {x.shape[0]}")


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Backend entry point (inputs validated by fused_ops): x (B, N, C) -> LN(x) * (1 + scale) + shift."""
    y, _, _ = _ln_modulate_op(x, shift, scale, float(eps))
    return y


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Backend entry point (inputs validated by fused_ops): x + gate * y, all (B, N, C) but gate."""
    return _gated_residual_op(x, gate, y)


# ----------------------------------------------------------------------------------------------------
# Shipped configurations, for `stdit inspect`
# ----------------------------------------------------------------------------------------------------

SHIPPED_CHANNELS = (1152, 144)  # STDiT-XL's hidden size, and a small one (BLOCK_C = 256, many rows)


def shipped_builds() -> list[KernelBuild]:
    """Every (kernel, C, dtype) configuration the launchers above pick for the shipped channel counts."""
    kernels = {
        "ln_modulate_fwd": _ln_modulate_fwd_kernel,
        "ln_modulate_bwd": _ln_modulate_bwd_kernel,
        "gated_residual_fwd": _gated_residual_fwd_kernel,
        "gated_residual_bwd": _gated_residual_bwd_kernel,
    }
    builds = []
    for dtype in SHIPPED_DTYPES:
        for C in SHIPPED_CHANNELS:
            consts = _consts(C, 16 // dtype.itemsize)
            warps, stages = consts.pop("num_warps"), consts.pop("num_stages")
            for name, fn in kernels.items():
                tag = f"C={C},{TL_DTYPES[dtype]},{consts['BLOCK_N']}x{consts['ROWS']}x{consts['BLOCK_C']},w{warps}"
                builds.append(
                    KernelBuild(
                        f"{name}[{tag}]", fn, signature_of(fn, dtype, consts), dict(consts), warps, stages,
                        uses_mma=False, tags={"dtype": TL_DTYPES[dtype], "channels": C},
                    )
                )
    return builds
