"""Triton side of STDiT3's q/k RMSNorm + RoPE (the math and dtypes: qk_norm_rope.py).

- :func:`load_head`: a @triton.jit loader the attention kernels of triton_self_attention.py call for
  q and k rows. It loads the two head-dim chunks (D0 + D1) of each row from the strided qkv and, when
  QK_NORM / ROPE are set, forms the normalised and rotated rows on chip: the sum of squares over both
  chunks, the rstd scaling and the gain with the same roundings to the input dtype as the reference,
  then the interleaved rotation by pos * theta (cos / sin tables (LEN, D/2) made on the host by the
  same torch code as the other backends'). The rotation reads each row's partner features
  x[d ^ 1] with a second load of the same cache lines (pairs never straddle the D0 / D1 boundary:
  both chunk widths are even), so no normalised or rotated q/k is ever written to memory.
- The backward is split in two. The attention backward kernels recompute q_hat, k_hat on chip
  (through :func:`load_head`) and write the gradients with respect to them, d(q_hat) and d(k_hat),
  where dq and dk go in dqkv. A second, row-wise pass (:func:`backward`, one program per block of
  (token, head) rows of q or of k) then reads the raw rows and d(hat) and turns them, in place, into
  the gradients with respect to the raw q and k, and writes per-program partial sums of the gains'
  gradients, summed afterwards by one torch reduction (deterministic: no atomics). Per row x (D,):

      forward:  r = rsqrt(mean(x^2) + eps)   h = x * r   n = w * h   y = rotate(n, p * theta)
      RoPE:     dn = rotate(dy, -p * theta)   (the inverse rotation: pair (a, b) -> (a c + b s, b c - a s))
      gain:     dw += dn * h   (summed over rows)     dh = w * dn
      norm:     dx = r * dh - x * r^3 / D * sum_d(dh * x)

  All of it in fp32; h is the normalised value rounded to the input dtype, as the forward used it.
"""

import torch
import triton
import triton.language as tl

from .triton_common import (
    TL_DTYPES, KernelBuild, Tiles, dot_operand, load_rows, new_output, signature_of, to_dtype,
)  # fmt: skip

# ----------------------------------------------------------------------------------------------------
# @triton.jit: the on-chip prologue of q and k rows
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gain(x, rstd, W, offs_d, D: tl.constexpr, DTYPE: tl.constexpr):
    """LlamaRMSNorm of one chunk: (x * rstd) rounded to the input dtype, times the gain, rounded again."""
    w = tl.load(W + offs_d, mask=offs_d < D, other=0.0)
    h = to_dtype(x.to(tl.float32) * rstd[:, None], DTYPE).to(tl.float32)
    return to_dtype(h * w[None, :], DTYPE).to(tl.float32)


@triton.jit
def _prologue_chunk(
    ptr, rows, valid, pos, offs_d, x, rstd, W, COS, SIN,
    D: tl.constexpr, UPCAST: tl.constexpr, QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """One chunk of normalised, rotated rows, rounded to the input dtype (fp32 again when UPCAST)."""
    DTYPE: tl.constexpr = ptr.dtype.element_ty
    y = x.to(tl.float32)
    if QK_NORM:
        y = _gain(x, rstd, W, offs_d, D, DTYPE)
    if ROPE:
        partner = offs_d ^ 1  # the other feature of each (2i, 2i+1) pair
        xp = load_rows(ptr, rows, valid, partner, D, UPCAST)
        yp = xp.to(tl.float32)
        if QK_NORM:
            yp = _gain(xp, rstd, W, partner, D, DTYPE)
        idx = pos[:, None] * (D // 2) + offs_d[None, :] // 2  # COS / SIN are (LEN, D/2)
        cmask = valid[:, None] & (offs_d[None, :] < D)
        cos = tl.load(COS + idx, mask=cmask, other=0.0)
        sin = tl.load(SIN + idx, mask=cmask, other=0.0)
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)  # rotate_half: (a, b) -> (-b, a)
        y = y * cos + sign[None, :] * yp * sin
    return dot_operand(y, DTYPE, UPCAST)


@triton.jit
def load_head(
    ptr, rows, valid, pos, offs_d0, offs_d1, W, COS, SIN, eps,
    D: tl.constexpr, BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr, QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Rows of a head split in chunks (x0 (rows, D0), x1 (rows, D1)), normalised with gain W and rotated
    by the angles of each row's position pos (COS / SIN tables (LEN, D/2)) when QK_NORM / ROPE.

    Without either flag only x0 is loaded (x1 is x0, a placeholder): the caller loads x1 with
    :func:`second_chunk` where the plain kernel did, so the plain kernels stay instruction for
    instruction what they were. With a flag both chunks are needed at once (the norm sums over both).
    """
    x0 = load_rows(ptr, rows, valid, offs_d0, D, UPCAST)
    x1 = x0
    if QK_NORM or ROPE:
        if BLOCK_D1 > 0:
            x1 = load_rows(ptr, rows, valid, offs_d1, D, UPCAST)
        rstd = tl.zeros_like(pos).to(tl.float32)
        if QK_NORM:  # mean of squares over the whole head dim: both chunks (masked columns are 0)
            f0 = x0.to(tl.float32)
            ss = tl.sum(f0 * f0, 1)
            if BLOCK_D1 > 0:
                f1 = x1.to(tl.float32)
                ss += tl.sum(f1 * f1, 1)
            rstd = 1.0 / tl.sqrt(ss / D + eps)
        y0 = _prologue_chunk(ptr, rows, valid, pos, offs_d0, x0, rstd, W, COS, SIN, D, UPCAST, QK_NORM, ROPE)
        y1 = y0
        if BLOCK_D1 > 0:
            y1 = _prologue_chunk(ptr, rows, valid, pos, offs_d1, x1, rstd, W, COS, SIN, D, UPCAST, QK_NORM, ROPE)
        x0 = y0
        x1 = y1
    return x0, x1


@triton.jit
def second_chunk(ptr, rows, valid, offs_d1, x1, D: tl.constexpr, UPCAST: tl.constexpr, LOADED: tl.constexpr):
    """The second head-dim chunk of rows: x1 itself if load_head LOADED it (a q/k variant), else loaded now."""
    if not LOADED:
        x1 = load_rows(ptr, rows, valid, offs_d1, D, UPCAST)
    return x1


# ----------------------------------------------------------------------------------------------------
# @triton.jit: the row-wise backward pass
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _qk_bwd_kernel(
    QKV, DQKV, QKW, COS, SIN, PART,
    stride_b, stride_n, stride_3, stride_h,
    g_stride_b, g_stride_n, g_stride_3, g_stride_h,
    H, N, ROWS, ITERS, POS_DIV, POS_MOD, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Program (pid, which): ITERS blocks of BLOCK_R (token, head) rows of q (which = 0) or k (1).
    DQKV holds d(hat) on entry and dx on exit; PART[which, pid] gets this program's dw partial sum."""
    pid = tl.program_id(0)
    which = tl.program_id(1)
    DTYPE: tl.constexpr = DQKV.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    if ROPE:
        sign = tl.where(offs_d % 2 == 0, 1.0, -1.0)  # the inverse rotation: (a, b) -> (a c + b s, b c - a s)
    if QK_NORM:
        w = tl.load(QKW + which * D + offs_d, mask=dmask, other=0.0)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ITERS):
        r = (pid * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = r < ROWS
        h = (r % H).to(tl.int64)
        n = (r // H) % N
        b = (r // (H * N)).to(tl.int64)
        x_rows = b * stride_b + n.to(tl.int64) * stride_n + which * stride_3 + h * stride_h
        g_rows = b * g_stride_b + n.to(tl.int64) * g_stride_n + which * g_stride_3 + h * g_stride_h
        mask = valid[:, None] & dmask[None, :]
        g = tl.load(DQKV + g_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            gp = tl.load(DQKV + g_rows[:, None] + (offs_d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
            idx = ((n // POS_DIV) % POS_MOD)[:, None] * (D // 2) + offs_d[None, :] // 2  # (LEN, D/2) tables
            cos = tl.load(COS + idx, mask=mask, other=0.0)
            sin = tl.load(SIN + idx, mask=mask, other=0.0)
            g = g * cos + sign[None, :] * gp * sin
        if QK_NORM:
            x = tl.load(QKV + x_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            hn = to_dtype(x * rstd[:, None], DTYPE).to(tl.float32)  # the rounded h the gain multiplied
            dw += tl.sum(g * hn, 0)
            dh = g * w[None, :]
            dot = tl.sum(dh * x, 1)
            g = rstd[:, None] * dh - x * (rstd * rstd * rstd * dot / D)[:, None]
        tl.store(DQKV + g_rows[:, None] + offs_d[None, :], to_dtype(g, DTYPE), mask=mask)
    if QK_NORM:
        tl.store(PART + (which * tl.num_programs(0) + pid) * BLOCK_D + offs_d, dw)


# ----------------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------------

# (rows per block, -, num_warps) of the row-wise pass: the largest without spills on sm_90 / sm_80
BWD_TILES = {16: Tiles(16, 16, 8), 32: Tiles(16, 16, 8)}
_MAX_PROGRAMS = 1024  # programs per q/k: bounds the partial dw buffer (2 x programs x BLOCK_D fp32)


def pass_tiles(dtype: torch.dtype) -> Tiles:
    """Tiling of the row-wise backward pass for inputs of ``dtype``."""
    return BWD_TILES[32 if dtype == torch.float32 else 16]


def position_of_token(kind: str, N: int, num_frames: int) -> tuple[int, int]:
    """(POS_DIV, POS_MOD): token n sits at position (n // POS_DIV) % POS_MOD of its attended sequence."""
    S = N // num_frames
    return {"temporal": (S, num_frames), "spatial": (1, S), "full": (1, N)}[kind]


def backward(
    qkv: torch.Tensor, dqkv: torch.Tensor, kind: str, num_frames: int,
    qk_weights: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
) -> torch.Tensor:  # fmt: skip
    """Turn d(q_hat), d(k_hat) in dqkv (B, N, 3, H, D) into dq, dk in place; return d(gains) (2, D) fp32
    (an empty (0,) tensor without qk_weights). qk_weights (2, D) fp32; cos_sin: the forward's rotation
    tables, (LEN, D/2) fp32 each, or None without RoPE."""
    B, N, _, H, D = qkv.shape
    t = pass_tiles(qkv.dtype)
    rows = B * N * H
    blocks = triton.cdiv(rows, t.block_m)
    iters = triton.cdiv(blocks, _MAX_PROGRAMS)
    programs = triton.cdiv(blocks, iters)
    block_d = triton.next_power_of_2(D)
    qk_norm = qk_weights is not None
    part = new_output((2, programs, block_d), qkv, torch.float32) if qk_norm else qkv.new_empty(0, dtype=torch.float32)
    dummy = part if qk_norm else qkv.new_empty(1, dtype=torch.float32)
    pos_div, pos_mod = position_of_token(kind, N, num_frames)
    _qk_bwd_kernel[(programs, 2)](
        qkv, dqkv, qk_weights if qk_norm else dummy, *(cos_sin or (dummy, dummy)), part if qk_norm else dummy,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), dqkv.stride(3),
        H, N, rows, iters, pos_div, pos_mod, eps,
        BLOCK_R=t.block_m, BLOCK_D=block_d, D=D, QK_NORM=qk_norm, ROPE=cos_sin is not None,
        num_warps=t.num_warps, num_stages=1,
    )  # fmt: skip
    if not qk_norm:
        return part
    return part.sum(1)[:, :D]


def pass_build(dtype: torch.dtype, D: int, QK_NORM: bool, ROPE: bool) -> KernelBuild:
    """The row-wise backward pass as its launcher runs it on a GPU, for `stdit inspect`."""
    t = pass_tiles(dtype)
    c = {"BLOCK_R": t.block_m, "BLOCK_D": triton.next_power_of_2(D), "D": D, "QK_NORM": QK_NORM, "ROPE": ROPE}
    variant = "+norm" * QK_NORM + "+rope" * ROPE
    tag = f"D={D},{TL_DTYPES[dtype]},{t.block_m}x{c['BLOCK_D']},w{t.num_warps}"
    return KernelBuild(
        f"self_attn_qk_bwd{variant}[{tag}]", _qk_bwd_kernel, signature_of(_qk_bwd_kernel, dtype, c), c,
        t.num_warps, 1, uses_mma=False, tags={"dtype": TL_DTYPES[dtype], "head_dim": D},
    )  # fmt: skip
