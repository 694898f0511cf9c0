"""Triton self-attention for STDiT: spatial, temporal and full attention on the native qkv layout.

The input is the qkv projection output viewed as (B, N = T*S, 3, H, D) with any strides, token index
n = t*S + s; the output is (B, N, H, D) in the same order. A *kind* is only a way of grouping tokens
into independent sequences, so one kernel family serves all three:

    kind      sequences (NSEQ)   length (LEN)   token of (seq j, position p)
    spatial   T frames           S              j*S + p         (SEQ_TOK = S, POS_TOK = 1)
    temporal  S positions        T              j   + p*S       (SEQ_TOK = 1, POS_TOK = S)
    full      1                  T*S            p               (SEQ_TOK = 0, POS_TOK = 1)

Each row of a tile computes its token with that formula and reads q/k/v straight from the strided
qkv, so temporal attention needs none of Open-Sora's ``B (T S) C -> (B S) T C`` copies. Two tilings:
*packed* (LEN <= BLOCK_M): a tile holds G = BLOCK_M // LEN whole sequences, attention is
block-diagonal within it and the key loop runs once (at T = 16 all 128 rows of a tile carry work,
where a FlashAttention tile would hold one 16-row sequence); *streamed* (LEN > BLOCK_M):
FlashAttention-2's online softmax over key tiles of BLOCK_N.

Head dim D runs as two power-of-two chunks D0 + D1 (triton_common.split_head_dim; 72 = 64 + 16), so
every dot over D is the sum of two dots. Softmax runs in fp32 in the log2 domain (exp2, scale folded
with log2(e)); the forward stores the per-token log-sum-exp LSE (B, H, N) for the backward.

Open-Sora 1.2's q/k RMSNorm and RoPE (constexprs QK_NORM, ROPE; qk_norm_rope.py has the math) are
fused: every kernel forms the normalised, rotated q and k rows on chip as it loads them
(triton_qk_norm_rope.load_head; a row's position in its sequence is known from the table above), so
they never reach memory. The backward kernels recompute them the same way and write the gradients
w.r.t. them; a second, row-wise pass (triton_qk_norm_rope.backward) turns those into dq, dk and the
gains' gradients. With both flags off the kernels are exactly the plain attention.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .triton_common import (
    LOG2E, SHIPPED_DTYPES, SHIPPED_HEAD_DIMS, KernelBuild, TileTable, Tiles, alignment, attention_build,
    attention_constexprs, check_attention_input, dot_operand, load_rows, new_output, row_offsets, store_rows,
    tile_entry, unit_stride_last,
)  # fmt: skip
from . import qk_norm_rope, triton_qk_norm_rope
from .qk_norm_rope import QKNorm
from .triton_qk_norm_rope import load_head, second_chunk

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rows(pid_m, offs, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """Token index, validity, group id and position in its sequence of the BLOCK rows of tile pid_m.

    Packed: tile pid_m holds sequences [pid_m*G, pid_m*G + G), row r is position r % LEN of sequence
    pid_m*G + r // LEN. Streamed: tile pid_m is query block pid_m % cdiv(LEN, BLOCK) of sequence
    pid_m // cdiv(LEN, BLOCK). The group id (always 0 when streamed) makes the block-diagonal mask.
    """
    if PACKED:
        G = BLOCK // LEN
        grp = offs // LEN
        pos = offs % LEN
        seq = pid_m * G + grp
        valid = (grp < G) & (seq < NSEQ)
    else:
        tiles = tl.cdiv(LEN, BLOCK)
        seq = pid_m // tiles
        pos = (pid_m % tiles) * BLOCK + offs
        grp = offs * 0
        valid = pos < LEN
    tok = seq * SEQ_TOK + pos * POS_TOK
    return tok, valid, grp, pos


@triton.jit
def _fwd_kernel(
    QKV, O, LSE,
    stride_b, stride_n, stride_3, stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, qk_scale,
    QW, KW, COS, SIN, eps,  # last: the plain kernels' parameters keep their offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    PACKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = O.dtype.element_ty
    q_head = b * stride_b + h * stride_h
    k_head = q_head + stride_3
    v_head = k_head + stride_3
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = offs_d0  # unused unless BLOCK_D1 > 0
    if BLOCK_D1 > 0:  # the masked second chunk of a non-power-of-two head dim
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    tok_m, valid_m, grp_m, pos_m = _rows(pid_m, offs_m, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK_M, PACKED)
    q_rows = row_offsets(q_head, tok_m, stride_n, ALIGN)
    # q (and k below) normalised / rotated on chip when QK_NORM / ROPE; the second head-dim chunk comes from
    # load_head then, else from second_chunk (where the plain kernel always loaded it)
    q0, q1 = load_head(
        QKV, q_rows, valid_m, pos_m, offs_d0, offs_d1, QW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
    )
    if BLOCK_D1 > 0:
        q1 = second_chunk(QKV, q_rows, valid_m, offs_d1, q1, D, UPCAST, QK_NORM or ROPE)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    if PACKED:
        n_end = BLOCK_N  # the tile's keys are its own queries: one step
    else:
        n_end = LEN
        seq = pid_m // tl.cdiv(LEN, BLOCK_M)
    for start_n in range(0, n_end, BLOCK_N):
        if PACKED:
            tok_n, valid_n, grp_n, pos_n = _rows(pid_m, offs_n, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK_N, PACKED)
            mask = valid_n[None, :] & (grp_n[None, :] == grp_m[:, None])
        else:
            pos_n = start_n + offs_n
            valid_n = pos_n < LEN
            tok_n = seq * SEQ_TOK + pos_n * POS_TOK
            mask = valid_n[None, :]
        k_rows = row_offsets(k_head, tok_n, stride_n, ALIGN)
        v_rows = row_offsets(v_head, tok_n, stride_n, ALIGN)
        k0, k1 = load_head(
            QKV, k_rows, valid_n, pos_n, offs_d0, offs_d1, KW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
        )
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = second_chunk(QKV, k_rows, valid_n, offs_d1, k1, D, UPCAST, QK_NORM or ROPE)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.where(mask, s * qk_scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lp = dot_operand(p, DTYPE, UPCAST)
        v0 = load_rows(QKV, v_rows, valid_n, offs_d0, D, UPCAST)
        acc0 = acc0 * alpha[:, None] + tl.dot(p_lp, v0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            v1 = load_rows(QKV, v_rows, valid_n, offs_d1, D, UPCAST)
            acc1 = acc1 * alpha[:, None] + tl.dot(p_lp, v1, input_precision=DOT_PREC)
        m_i = m_new

    o_head = b * o_stride_b + h * o_stride_h
    o_rows = row_offsets(o_head, tok_m, o_stride_n, ALIGN)
    inv_l = 1.0 / l_i
    store_rows(O, o_rows, valid_m, offs_d0, D, acc0 * inv_l[:, None])
    if BLOCK_D1 > 0:
        store_rows(O, o_rows, valid_m, offs_d1, D, acc1 * inv_l[:, None])
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N + tok_m
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=valid_m)


# Backward (dS is the gradient w.r.t. the scaled logits, P the softmax, recomputed from Q, K and LSE):
#     dV = P^T dO          dP = dO V^T          Delta_i = sum_d dO_id O_id  (= rowsum(P * dP))
#     dS = P * (dP - Delta)          dQ = scale * dS K          dK = scale * dS^T Q
# Packed tiles are self-contained (their keys are their queries), so one program computes dQ, dK and
# dV with no atomics. Streamed sequences use two kernels: one per query tile for dQ (it also stores
# Delta), then one per key tile for dK and dV.
# With QK_NORM / ROPE, Q and K above are the normalised, rotated q_hat and k_hat, recomputed on chip by
# load_head; the kernels then write dQ_hat and dK_hat where dq and dk go, and the row-wise pass of
# triton_qk_norm_rope.py turns those into dq, dk and the gains' gradients.


@triton.jit
def _bwd_packed_kernel(
    QKV, O, DO, LSE, DQKV,
    stride_b, stride_n, stride_3, stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    g_stride_b, g_stride_n, g_stride_3, g_stride_h,
    H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, qk_scale, sm_scale,
    QW, KW, COS, SIN, eps,  # last: the plain kernels' parameters keep their offsets
    BLOCK: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """One packed tile: G whole sequences; queries and keys are the same BLOCK rows."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = DO.dtype.element_ty
    q_head = b * stride_b + h * stride_h
    k_head = q_head + stride_3
    v_head = k_head + stride_3
    o_head = b * o_stride_b + h * o_stride_h
    do_head = b * do_stride_b + h * do_stride_h
    dq_head = b * g_stride_b + h * g_stride_h
    dk_head = dq_head + g_stride_3
    dv_head = dk_head + g_stride_3
    offs = tl.arange(0, BLOCK)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = offs_d0  # unused unless BLOCK_D1 > 0
    if BLOCK_D1 > 0:  # the masked second chunk of a non-power-of-two head dim
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    tok, valid, grp, pos = _rows(pid_m, offs, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK, True)
    q_rows = row_offsets(q_head, tok, stride_n, ALIGN)
    k_rows = row_offsets(k_head, tok, stride_n, ALIGN)
    v_rows = row_offsets(v_head, tok, stride_n, ALIGN)
    do_rows = row_offsets(do_head, tok, do_stride_n, ALIGN)
    o_rows = row_offsets(o_head, tok, o_stride_n, ALIGN)
    dq_rows = row_offsets(dq_head, tok, g_stride_n, ALIGN)
    dk_rows = row_offsets(dk_head, tok, g_stride_n, ALIGN)
    dv_rows = row_offsets(dv_head, tok, g_stride_n, ALIGN)
    mask = valid[:, None] & valid[None, :] & (grp[:, None] == grp[None, :])

    q0, q1 = load_head(
        QKV, q_rows, valid, pos, offs_d0, offs_d1, QW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
    )
    k0, k1 = load_head(
        QKV, k_rows, valid, pos, offs_d0, offs_d1, KW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
    )
    v0 = load_rows(QKV, v_rows, valid, offs_d0, D, UPCAST)
    do0 = load_rows(DO, do_rows, valid, offs_d0, D, UPCAST)
    o0 = load_rows(O, o_rows, valid, offs_d0, D, True)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
    delta = tl.sum(do0.to(tl.float32) * o0, 1)
    if BLOCK_D1 > 0:
        q1 = second_chunk(QKV, q_rows, valid, offs_d1, q1, D, UPCAST, QK_NORM or ROPE)
        k1 = second_chunk(QKV, k_rows, valid, offs_d1, k1, D, UPCAST, QK_NORM or ROPE)
        v1 = load_rows(QKV, v_rows, valid, offs_d1, D, UPCAST)
        do1 = load_rows(DO, do_rows, valid, offs_d1, D, UPCAST)
        o1 = load_rows(O, o_rows, valid, offs_d1, D, True)
        s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        delta += tl.sum(do1.to(tl.float32) * o1, 1)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + tok, mask=valid, other=0.0)
    p = tl.where(mask, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    p_lp = dot_operand(p, DTYPE, UPCAST)
    ds_lp = dot_operand(ds, DTYPE, UPCAST)
    p_t = tl.trans(p_lp)
    ds_t = tl.trans(ds_lp)
    store_rows(DQKV, dv_rows, valid, offs_d0, D, tl.dot(p_t, do0, input_precision=DOT_PREC))
    store_rows(DQKV, dq_rows, valid, offs_d0, D, tl.dot(ds_lp, k0, input_precision=DOT_PREC) * sm_scale)
    store_rows(DQKV, dk_rows, valid, offs_d0, D, tl.dot(ds_t, q0, input_precision=DOT_PREC) * sm_scale)
    if BLOCK_D1 > 0:
        store_rows(DQKV, dv_rows, valid, offs_d1, D, tl.dot(p_t, do1, input_precision=DOT_PREC))
        store_rows(DQKV, dq_rows, valid, offs_d1, D, tl.dot(ds_lp, k1, input_precision=DOT_PREC) * sm_scale)
        store_rows(DQKV, dk_rows, valid, offs_d1, D, tl.dot(ds_t, q1, input_precision=DOT_PREC) * sm_scale)


@triton.jit
def _bwd_dq_kernel(
    QKV, O, DO, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_3, stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    g_stride_b, g_stride_n, g_stride_3, g_stride_h,
    H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, qk_scale, sm_scale,
    QW, KW, COS, SIN, eps,  # last: the plain kernels' parameters keep their offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Streamed sequences, one query tile: dQ over all key tiles; also stores Delta for dK/dV."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = DO.dtype.element_ty
    q_head = b * stride_b + h * stride_h
    k_head = q_head + stride_3
    v_head = k_head + stride_3
    o_head = b * o_stride_b + h * o_stride_h
    do_head = b * do_stride_b + h * do_stride_h
    dq_head = b * g_stride_b + h * g_stride_h
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = offs_d0  # unused unless BLOCK_D1 > 0
    if BLOCK_D1 > 0:  # the masked second chunk of a non-power-of-two head dim
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    tok_m, valid_m, _, pos_m = _rows(pid_m, offs_m, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK_M, False)
    q_rows = row_offsets(q_head, tok_m, stride_n, ALIGN)
    do_rows = row_offsets(do_head, tok_m, do_stride_n, ALIGN)
    o_rows = row_offsets(o_head, tok_m, o_stride_n, ALIGN)
    dq_rows = row_offsets(dq_head, tok_m, g_stride_n, ALIGN)
    seq = pid_m // tl.cdiv(LEN, BLOCK_M)

    q0, q1 = load_head(
        QKV, q_rows, valid_m, pos_m, offs_d0, offs_d1, QW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
    )
    do0 = load_rows(DO, do_rows, valid_m, offs_d0, D, UPCAST)
    delta = tl.sum(do0.to(tl.float32) * load_rows(O, o_rows, valid_m, offs_d0, D, True), 1)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        q1 = second_chunk(QKV, q_rows, valid_m, offs_d1, q1, D, UPCAST, QK_NORM or ROPE)
        do1 = load_rows(DO, do_rows, valid_m, offs_d1, D, UPCAST)
        delta += tl.sum(do1.to(tl.float32) * load_rows(O, o_rows, valid_m, offs_d1, D, True), 1)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    row_ptrs = pid_bh.to(tl.int64) * N + tok_m
    tl.store(DELTA + row_ptrs, delta, mask=valid_m)
    lse = tl.load(LSE + row_ptrs, mask=valid_m, other=0.0)

    for start_n in range(0, LEN, BLOCK_N):
        pos_n = start_n + offs_n
        valid_n = pos_n < LEN
        tok_n = seq * SEQ_TOK + pos_n * POS_TOK
        k_rows = row_offsets(k_head, tok_n, stride_n, ALIGN)
        v_rows = row_offsets(v_head, tok_n, stride_n, ALIGN)
        k0, k1 = load_head(
            QKV, k_rows, valid_n, pos_n, offs_d0, offs_d1, KW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
        )
        v0 = load_rows(QKV, v_rows, valid_n, offs_d0, D, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = second_chunk(QKV, k_rows, valid_n, offs_d1, k1, D, UPCAST, QK_NORM or ROPE)
            v1 = load_rows(QKV, v_rows, valid_n, offs_d1, D, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        p = tl.where(valid_n[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds_lp = dot_operand(p * (dp - delta[:, None]), DTYPE, UPCAST)
        dq0 += tl.dot(ds_lp, k0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dq1 += tl.dot(ds_lp, k1, input_precision=DOT_PREC)
    store_rows(DQKV, dq_rows, valid_m, offs_d0, D, dq0 * sm_scale)
    if BLOCK_D1 > 0:
        store_rows(DQKV, dq_rows, valid_m, offs_d1, D, dq1 * sm_scale)


@triton.jit
def _bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_3, stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    g_stride_b, g_stride_n, g_stride_3, g_stride_h,
    H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, qk_scale, sm_scale,
    QW, KW, COS, SIN, eps,  # last: the plain kernels' parameters keep their offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Streamed sequences, one key tile: dK and dV over all query tiles (transposed scores)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = DO.dtype.element_ty
    q_head = b * stride_b + h * stride_h
    k_head = q_head + stride_3
    v_head = k_head + stride_3
    do_head = b * do_stride_b + h * do_stride_h
    dk_head = b * g_stride_b + h * g_stride_h + g_stride_3
    dv_head = dk_head + g_stride_3
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = offs_d0  # unused unless BLOCK_D1 > 0
    if BLOCK_D1 > 0:  # the masked second chunk of a non-power-of-two head dim
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    tok_n, valid_n, _, pos_n = _rows(pid_n, offs_n, NSEQ, LEN, SEQ_TOK, POS_TOK, BLOCK_N, False)
    k_rows = row_offsets(k_head, tok_n, stride_n, ALIGN)
    v_rows = row_offsets(v_head, tok_n, stride_n, ALIGN)
    dk_rows = row_offsets(dk_head, tok_n, g_stride_n, ALIGN)
    dv_rows = row_offsets(dv_head, tok_n, g_stride_n, ALIGN)
    seq = pid_n // tl.cdiv(LEN, BLOCK_N)

    k0, k1 = load_head(
        QKV, k_rows, valid_n, pos_n, offs_d0, offs_d1, KW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
    )
    v0 = load_rows(QKV, v_rows, valid_n, offs_d0, D, UPCAST)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        k1 = second_chunk(QKV, k_rows, valid_n, offs_d1, k1, D, UPCAST, QK_NORM or ROPE)
        v1 = load_rows(QKV, v_rows, valid_n, offs_d1, D, UPCAST)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)

    for start_m in range(0, LEN, BLOCK_M):
        pos_m = start_m + offs_m
        valid_m = pos_m < LEN
        tok_m = seq * SEQ_TOK + pos_m * POS_TOK
        q_rows = row_offsets(q_head, tok_m, stride_n, ALIGN)
        do_rows = row_offsets(do_head, tok_m, do_stride_n, ALIGN)
        row_ptrs = pid_bh.to(tl.int64) * N + tok_m
        lse = tl.load(LSE + row_ptrs, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + row_ptrs, mask=valid_m, other=0.0)
        q0, q1 = load_head(
            QKV, q_rows, valid_m, pos_m, offs_d0, offs_d1, QW, COS, SIN, eps, D, BLOCK_D1, UPCAST, QK_NORM, ROPE
        )
        do0 = load_rows(DO, do_rows, valid_m, offs_d0, D, UPCAST)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = S^T
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            q1 = second_chunk(QKV, q_rows, valid_m, offs_d1, q1, D, UPCAST, QK_NORM or ROPE)
            do1 = load_rows(DO, do_rows, valid_m, offs_d1, D, UPCAST)
            s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        p_t = tl.where(valid_m[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        ds_t = dot_operand(p_t * (dp_t - delta[None, :]), DTYPE, UPCAST)
        p_t = dot_operand(p_t, DTYPE, UPCAST)
        dv0 += tl.dot(p_t, do0, input_precision=DOT_PREC)
        dk0 += tl.dot(ds_t, q0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dv1 += tl.dot(p_t, do1, input_precision=DOT_PREC)
            dk1 += tl.dot(ds_t, q1, input_precision=DOT_PREC)
    store_rows(DQKV, dk_rows, valid_n, offs_d0, D, dk0 * sm_scale)
    store_rows(DQKV, dv_rows, valid_n, offs_d0, D, dv0)
    if BLOCK_D1 > 0:
        store_rows(DQKV, dk_rows, valid_n, offs_d1, D, dk1 * sm_scale)
        store_rows(DQKV, dv_rows, valid_n, offs_d1, D, dv1)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------

KINDS = ("spatial", "temporal", "full")


def geometry(kind: str, N: int, num_frames: int) -> tuple[int, int, int, int]:
    """(NSEQ, LEN, SEQ_TOK, POS_TOK) of a kind: how tokens group into independent sequences."""
    T = num_frames
    S = N // T
    if kind == "spatial":
        return T, S, S, 1
    if kind == "temporal":
        return S, T, 1, S
    if kind == "full":
        return 1, N, 0, 1
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


# (BLOCK_M, BLOCK_N, num_warps) per kernel and input width (16-bit or fp32), one entry per head-dim
# class (the padded width BLOCK_D0 + BLOCK_D1, see head_class). Each entry is the largest tiling that
# compiles for both sm_90 and sm_80 without register spills under triton 3.6 and 3.7 (measured with
# `stdit inspect`; the inspect test and CI's triton 3.6 step keep it so). "dkdv" tiles are (query rows per step, key rows per program). fp32 tiles
# are smaller: fp32 dots run on FMA units and the same registers hold half as many values; fp32 is
# the accuracy path, 16-bit the fast one.
TILES: TileTable = {
    # head-dim class:   32             64             80             96             128
    ("fwd_packed", 16): ((128, 128, 8), (128, 128, 8), (128, 128, 8), (128, 128, 8), (64, 64, 4)),
    ("fwd_packed", 32): ((64, 64, 8), (32, 32, 4), (32, 32, 4), (16, 16, 4), (16, 16, 4)),
    ("fwd_streamed", 16): ((128, 64, 8), (128, 64, 8), (128, 64, 8), (128, 64, 8), (128, 32, 8)),
    ("fwd_streamed", 32): ((64, 32, 8), (64, 32, 8), (32, 32, 8), (64, 32, 8), (16, 16, 4)),
    ("bwd_packed", 16): ((64, 64, 8), (64, 64, 8), (64, 64, 8), (64, 64, 4), (64, 64, 8)),
    ("bwd_packed", 32): ((32, 32, 4), (32, 32, 8), (16, 16, 4), (16, 16, 4), (16, 16, 4)),
    ("bwd_dq", 16): ((64, 64, 8), (64, 64, 8), (64, 64, 8), (64, 64, 8), (64, 64, 8)),
    ("bwd_dq", 32): ((32, 32, 4), (32, 32, 4), (32, 32, 8), (16, 16, 4), (32, 32, 4)),
    ("bwd_dkdv", 16): ((64, 64, 8), (64, 64, 8), (32, 64, 8), (32, 64, 8), (64, 64, 8)),
    ("bwd_dkdv", 32): ((32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 8), (32, 32, 8)),
}  # fmt: skip
# The QK_NORM / ROPE variants also hold the gains, the rotation tables and each row's partner features:
# rows listed here replace TILES' rows for them. Their head-dim-80 entries (D = 72, every STDiT model
# size) are the largest tilings with no spills on sm_90 / sm_80 (`stdit inspect`); the other classes
# keep TILES' entries, not inspected with the prologue.
TILES_QK: TileTable = {
    # head-dim class:   32             64             80             96             128
    ("fwd_packed", 16): ((128, 128, 8), (128, 128, 8), (64, 64, 8), (128, 128, 8), (64, 64, 4)),
    ("fwd_packed", 32): ((64, 64, 8), (32, 32, 4), (32, 32, 8), (16, 16, 4), (16, 16, 4)),
    ("fwd_streamed", 16): ((128, 64, 8), (128, 64, 8), (128, 32, 8), (128, 64, 8), (128, 32, 8)),
    ("fwd_streamed", 32): ((64, 32, 8), (64, 32, 8), (32, 16, 8), (64, 32, 8), (16, 16, 4)),
    ("bwd_dq", 16): ((64, 64, 8), (64, 64, 8), (64, 32, 8), (64, 64, 8), (64, 64, 8)),
    ("bwd_dq", 32): ((32, 32, 4), (32, 32, 4), (32, 16, 8), (16, 16, 4), (32, 32, 4)),
    ("bwd_dkdv", 16): ((64, 64, 8), (64, 64, 8), (16, 64, 8), (32, 64, 8), (64, 64, 8)),
    ("bwd_dkdv", 32): ((32, 32, 4), (32, 32, 4), (16, 16, 8), (32, 32, 8), (32, 32, 8)),
}  # fmt: skip
QK_HEAD_DIMS = (72,)  # the head dims whose q/k prologue variants `stdit inspect` compiles
_STAGES = {"fwd_streamed": 2, "bwd_dq": 2, "bwd_dkdv": 2}
_override: int | None = None


@contextlib.contextmanager
def tile_override(block: int):
    """Force every launch to BLOCK_M = BLOCK_N = ``block`` (packed iff LEN <= block).

    For tests: small tiles let small shapes exercise multi-tile streaming and packing under the
    interpreter. Not thread-safe; not for production use.
    """
    global _override
    if block < 16 or block & (block - 1):
        raise ValueError(f"block: expected a power of two >= 16, got {block}")
    old, _override = _override, block
    try:
        yield
    finally:
        _override = old


def tiles(kernel: str, D: int, dtype: torch.dtype, qk: bool = False) -> Tiles:
    """The shipped tiling of ``kernel`` (fwd_packed, fwd_streamed, bwd_packed, bwd_dq, bwd_dkdv);
    ``qk``: the variant that normalises / rotates q and k on chip (TILES_QK where it has an entry)."""
    if _override is not None:
        return Tiles(_override, _override, 4)
    table = TILES_QK if qk and (kernel, 32 if dtype == torch.float32 else 16) in TILES_QK else TILES
    bm, bn, warps = tile_entry(table, kernel, D, dtype)
    return Tiles(bm, bn, warps, _STAGES.get(kernel, 1))


def _grid(packed: bool, block: int, NSEQ: int, LEN: int, BH: int) -> tuple[int, int]:
    """Packed: one program per G = block // LEN sequences; streamed: one per block rows of a sequence."""
    if packed:
        return (triton.cdiv(NSEQ, block // LEN), BH)
    return (NSEQ * triton.cdiv(LEN, block), BH)


def _qk_args(
    qk_weights: torch.Tensor | None, rope: torch.Tensor | None, LEN: int, dummy: torch.Tensor
) -> tuple[tuple, dict]:
    """The kernels' (QW, KW, COS, SIN) pointers and their QK_NORM / ROPE constexprs. Absent ones point
    at ``dummy`` (an fp32 buffer of the launch, never read: the constexpr removes the code).

    COS / SIN (LEN, D/2) fp32: the rotation of pair i at position p, computed here by the same torch
    code as every other backend's (so the kernels need no sin/cos of their own, whose slow path for
    huge arguments would put a local array on the stack of every attention kernel).
    """
    qw, kw = (qk_weights[0], qk_weights[1]) if qk_weights is not None else (dummy, dummy)
    cos = sin = dummy
    if rope is not None:
        cos, sin = (c.contiguous() for c in qk_norm_rope.cos_sin(torch.arange(LEN, device=rope.device), rope))
    return (qw, kw, cos, sin), {"QK_NORM": qk_weights is not None, "ROPE": rope is not None}


def forward(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_weights: torch.Tensor | None = None, rope: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """qkv (B, N, 3, H, D) -> (out (B, N, H, D), lse (B, H, N) fp32, log2 domain).

    qk_weights (2, D) fp32 (q's gain, k's gain) and rope theta (D/2,) fp32: q and k are normalised and
    rotated on chip before the attention (None: not).
    """
    qkv = unit_stride_last(qkv)
    B, N, _, H, D = qkv.shape
    NSEQ, LEN, SEQ_TOK, POS_TOK = geometry(kind, N, num_frames)
    out = new_output((B, N, H, D), qkv)
    lse = new_output((B, H, N), qkv, torch.float32)
    ptrs, flags = _qk_args(qk_weights, rope, LEN, lse)
    qk = flags["QK_NORM"] or flags["ROPE"]
    packed = LEN <= tiles("fwd_packed", D, qkv.dtype, qk).block_m
    t = tiles("fwd_packed" if packed else "fwd_streamed", D, qkv.dtype, qk)
    _fwd_kernel[_grid(packed, t.block_m, NSEQ, LEN, B * H)](
        qkv, out, lse,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, scale * LOG2E, *ptrs, eps,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n if not packed else t.block_m, PACKED=packed, **flags,
        **attention_constexprs(D, qkv.dtype, alignment(qkv, out)), num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out, lse


def backward(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kind: str, num_frames: int,
    scale: float, qk_weights: torch.Tensor | None = None, rope: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of forward's out: w.r.t. qkv, (B, N, 3, H, D) in qkv's layout, and w.r.t. qk_weights,
    (2, D) fp32 (an empty (0,) tensor without them).

    The attention kernels write dv and, with qk_weights / rope, the gradients w.r.t. the normalised,
    rotated q and k; the row-wise pass of triton_qk_norm_rope.py then turns those into dq, dk and
    the gains' gradients, in place.
    """
    qkv = unit_stride_last(qkv)
    dout = unit_stride_last(dout)
    B, N, _, H, D = qkv.shape
    NSEQ, LEN, SEQ_TOK, POS_TOK = geometry(kind, N, num_frames)
    dqkv = new_output((B, N, 3, H, D), qkv)
    args = (qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3))
    o_strides = (out.stride(0), out.stride(1), out.stride(2))
    do_strides = (dout.stride(0), dout.stride(1), dout.stride(2))
    g_strides = (dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), dqkv.stride(3))
    ptrs, flags = _qk_args(qk_weights, rope, LEN, lse)
    sizes = (H, N, NSEQ, LEN, SEQ_TOK, POS_TOK, scale * LOG2E, scale, *ptrs, eps)
    qk = flags["QK_NORM"] or flags["ROPE"]
    consts = dict(attention_constexprs(D, qkv.dtype, alignment(qkv, out, dout, dqkv)), **flags)
    t = tiles("bwd_packed", D, qkv.dtype, qk)
    if LEN <= t.block_m:
        _bwd_packed_kernel[_grid(True, t.block_m, NSEQ, LEN, B * H)](
            qkv, out, dout, lse, dqkv, *args, *o_strides, *do_strides, *g_strides, *sizes,
            BLOCK=t.block_m, **consts, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    else:
        delta = new_output((B, H, N), qkv, torch.float32)
        t = tiles("bwd_dq", D, qkv.dtype, qk)
        _bwd_dq_kernel[_grid(False, t.block_m, NSEQ, LEN, B * H)](
            qkv, out, dout, lse, delta, dqkv, *args, *o_strides, *do_strides, *g_strides, *sizes,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, **consts, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
        t = tiles("bwd_dkdv", D, qkv.dtype, qk)
        _bwd_dkdv_kernel[_grid(False, t.block_n, NSEQ, LEN, B * H)](
            qkv, dout, lse, delta, dqkv, *args, *do_strides, *g_strides, *sizes,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, **consts, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    if not qk:
        return dqkv, lse.new_empty(0)
    dw = triton_qk_norm_rope.backward(qkv, dqkv, kind, num_frames, qk_weights, ptrs[2:] if flags["ROPE"] else None, eps)
    return dqkv, dw


# ----------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops, so torch.compile traces callers without graph breaks
# ----------------------------------------------------------------------------------------------------


# qk_weights (2, D) fp32 stacks q's and k's RMSNorm gains, rope (D/2,) fp32 is theta; optional tensors
# (None: no norm / no rotation) stay traceable, so torch.compile sees one op either way.
@torch.library.custom_op("stdit::triton_self_attention", mutates_args=())
def _self_attention_op(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_weights: torch.Tensor | None = None, rope: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return forward(qkv, kind, num_frames, scale, qk_weights, rope, eps)


@_self_attention_op.register_fake
def _(qkv, kind, num_frames, scale, qk_weights=None, rope=None, eps=1e-6):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("stdit::triton_self_attention_backward", mutates_args=())
def _self_attention_backward_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kind: str, num_frames: int,
    scale: float, qk_weights: torch.Tensor | None = None, rope: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return backward(dout, qkv, out, lse, kind, num_frames, scale, qk_weights, rope, eps)


@_self_attention_backward_op.register_fake
def _(dout, qkv, out, lse, kind, num_frames, scale, qk_weights=None, rope=None, eps=1e-6):
    dw_shape = tuple(qk_weights.shape) if qk_weights is not None else (0,)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), lse.new_empty(dw_shape)


def _setup_context(ctx, inputs, output):
    qkv, kind, num_frames, scale, qk_weights, rope, eps = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, qk_weights, rope)
    ctx.args = (kind, num_frames, scale)
    ctx.eps = eps


def _backward(ctx, dout, dlse):
    qkv, out, lse, qk_weights, rope = ctx.saved_tensors
    dqkv, dw = _self_attention_backward_op(dout, qkv, out, lse, *ctx.args, qk_weights, rope, ctx.eps)
    return dqkv, None, None, None, (dw if qk_weights is not None else None), None, None


_self_attention_op.register_autograd(_backward, setup_context=_setup_context)


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Backend entry point: qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D) for kind spatial|temporal|full;
    q and k normalised (qk_norm) and rotated (rope theta (D/2,)) on chip, gradients to both gains."""
    check_attention_input("qkv", qkv)
    if qk_norm is None and rope is None:
        # Every argument passed: left to their defaults, a compiled backward after an eager call with
        # gains (same op) got a non-tensor for a tensor argument (tests/bench/test_check_sequence.py).
        out, _ = _self_attention_op(qkv, kind, num_frames, float(scale), None, None, 1e-6)
        return out
    # the gains as one fp32 (2, D) operand; autograd carries its gradient back to each gain's dtype
    qk_weights = None if qk_norm is None else torch.stack((qk_norm.q_weight.float(), qk_norm.k_weight.float()))
    eps = 1e-6 if qk_norm is None else float(qk_norm.eps)
    theta = None if rope is None else rope.detach().float().contiguous()
    out, _ = _self_attention_op(qkv, kind, num_frames, float(scale), qk_weights, theta, eps)
    return out


# ----------------------------------------------------------------------------------------------------
# Shipped configurations, for `stdit inspect`
# ----------------------------------------------------------------------------------------------------


# The q/k prologue variants a model runs: temporal attention with RMSNorm + RoPE, spatial with RMSNorm
# only. Either kind can take either tiling (packed or streamed), so each variant lists every kernel.
QK_VARIANTS = {"": {"QK_NORM": False, "ROPE": False}, "+norm": {"QK_NORM": True, "ROPE": False},
               "+norm+rope": {"QK_NORM": True, "ROPE": True}}  # fmt: skip


def shipped_builds() -> list[KernelBuild]:
    """Every (kernel, q/k variant, tiling, head dim, dtype) configuration the launchers above can pick
    on a GPU, and the row-wise q/k backward pass of the norm / RoPE variants."""
    kernels = {
        "fwd_packed": (_fwd_kernel, lambda t: {"BLOCK_M": t.block_m, "BLOCK_N": t.block_m, "PACKED": True}),
        "fwd_streamed": (_fwd_kernel, lambda t: {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "PACKED": False}),
        "bwd_packed": (_bwd_packed_kernel, lambda t: {"BLOCK": t.block_m}),
        "bwd_dq": (_bwd_dq_kernel, lambda t: {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}),
        "bwd_dkdv": (_bwd_dkdv_kernel, lambda t: {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}),
    }
    builds = []
    for dtype in SHIPPED_DTYPES:
        for D in SHIPPED_HEAD_DIMS:
            for variant, flags in QK_VARIANTS.items():
                if variant and D not in QK_HEAD_DIMS:
                    continue
                for name, (fn, blocks) in kernels.items():
                    t = tiles(name, D, dtype, qk=bool(variant))
                    build = attention_build(f"self_attn_{name}{variant}", fn, t, dtype, D, {**blocks(t), **flags})
                    builds.append(build)
                if variant:
                    builds.append(triton_qk_norm_rope.pass_build(dtype, D, **flags))
    return builds
