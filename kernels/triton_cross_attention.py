"""Triton cross-attention for STDiT: video tokens attend to each sample's variable-length T5 text.

q (B, N, H, D) attends to kv (B, L, 2, H, D), padded to L text tokens, of which the first
kv_lens[b] are real. Open-Sora 1.0 packs the valid tokens of all samples with ``masked_select``
(a copy) and calls xformers with a ``BlockDiagonalMask``; here every program reads its sample's
length from ``kv_lens`` and masks (or skips) the padded keys, with no packing copy.

Forward. The text is short (L <= 120 in Open-Sora 1.0), so when L <= BLOCK_L (128 for 16-bit
inputs, 32-64 for fp32: see TILES) one (sample, head)'s K and V (128 x 72 x 2 values, 37 KB in bf16)
stay resident in the program while it streams query tiles of BLOCK_M rows: K/V are read once per
program rather than once per query tile, and each query tile's softmax is exact in one pass (all its
keys are present: no online rescaling). Programs are (query chunk, sample x head); a chunk holds
``tiles_per_prog`` consecutive query tiles, sized so the launch fills the GPU even at batch 1.
Longer text (L > 128) streams key blocks with an online softmax instead, and stops at kv_lens[b],
so padded blocks cost nothing.

Head dim is split into power-of-two chunks D0 + D1 (72 = 64 + 16, 8 masked) like the self-attention
kernels, with the same row loaders (triton_common). The backward's math is beside its kernels.
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

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _cross_fwd_kernel(
    Q, KV, LENS, O, LSE,
    q_stride_b, q_stride_n, q_stride_h,
    kv_stride_b, kv_stride_l, kv_stride_2, kv_stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    H, N, qk_scale, tiles_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    RESIDENT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = O.dtype.element_ty
    kv_len = tl.load(LENS + b)
    q_head = b * q_stride_b + h * q_stride_h
    o_head = b * o_stride_b + h * o_stride_h
    k_head = b * kv_stride_b + h * kv_stride_h
    v_head = k_head + kv_stride_2
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    if RESIDENT:  # K and V of this (sample, head): loaded once, reused by every query tile below
        valid_l = offs_l < kv_len
        k_rows = row_offsets(k_head, offs_l, kv_stride_l, ALIGN)
        v_rows = row_offsets(v_head, offs_l, kv_stride_l, ALIGN)
        k0 = load_rows(KV, k_rows, valid_l, offs_d0, D, UPCAST)
        v0 = load_rows(KV, v_rows, valid_l, offs_d0, D, UPCAST)
        if BLOCK_D1 > 0:
            k1 = load_rows(KV, k_rows, valid_l, offs_d1, D, UPCAST)
            v1 = load_rows(KV, v_rows, valid_l, offs_d1, D, UPCAST)

    for i in range(0, tiles_per_prog):
        rows = (pid_c * tiles_per_prog + i) * BLOCK_M + offs_m
        valid_m = rows < N
        q_rows = row_offsets(q_head, rows, q_stride_n, ALIGN)
        q0 = load_rows(Q, q_rows, valid_m, offs_d0, D, UPCAST)
        if BLOCK_D1 > 0:
            q1 = load_rows(Q, q_rows, valid_m, offs_d1, D, UPCAST)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        # resident: one step over the loaded K/V; streamed: key blocks up to this sample's length
        for start_l in range(0, BLOCK_L if RESIDENT else kv_len, BLOCK_L):
            if not RESIDENT:
                valid_l = start_l + offs_l < kv_len
                k_rows = row_offsets(k_head, start_l + offs_l, kv_stride_l, ALIGN)
                v_rows = row_offsets(v_head, start_l + offs_l, kv_stride_l, ALIGN)
                k0 = load_rows(KV, k_rows, valid_l, offs_d0, D, UPCAST)
                v0 = load_rows(KV, v_rows, valid_l, offs_d0, D, UPCAST)
                if BLOCK_D1 > 0:
                    k1 = load_rows(KV, k_rows, valid_l, offs_d1, D, UPCAST)
                    v1 = load_rows(KV, v_rows, valid_l, offs_d1, D, UPCAST)
            s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
            if BLOCK_D1 > 0:
                s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            s = tl.where(valid_l[None, :], s * qk_scale, -1.0e30)  # kv_len >= 1: every row has a key
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p_lp = dot_operand(p, DTYPE, UPCAST)
            acc0 = acc0 * alpha[:, None] + tl.dot(p_lp, v0, input_precision=DOT_PREC)
            if BLOCK_D1 > 0:
                acc1 = acc1 * alpha[:, None] + tl.dot(p_lp, v1, input_precision=DOT_PREC)
            m_i = m_new
        inv_l = 1.0 / l_i
        o_rows = row_offsets(o_head, rows, o_stride_n, ALIGN)
        store_rows(O, o_rows, valid_m, offs_d0, D, acc0 * inv_l[:, None])
        if BLOCK_D1 > 0:
            store_rows(O, o_rows, valid_m, offs_d1, D, acc1 * inv_l[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=valid_m)


# Backward (P recomputed from the stored log-sum-exp; Delta_i = sum_d dO_id O_id):
#     dS = P * (dO V^T - Delta)     dQ = scale * dS K     dK = scale * dS^T Q     dV = P^T dO
# Two kernels, as in FlashAttention-2: one per query tile computes dQ over the sample's key blocks
# (and stores Delta); one per (key block, query chunk) accumulates dK and dV over the chunk's query
# tiles. Keeping dK/dV for all 120 keys of a program in registers would need ~160 fp32 registers per
# thread on top of K and V (it spills; `stdit inspect` shows it), so key blocks are 64 wide (32 for
# fp32). Chunks write fp32 partials (chunks, B, L, 2, H, D), summed on the host: deterministic, no
# atomics, and text-sized. Padded keys (position >= kv_lens[b]) get exactly zero gradient.


@triton.jit
def _cross_bwd_dq_kernel(
    Q, KV, LENS, O, DO, LSE, DELTA, DQ,
    q_stride_b, q_stride_n, q_stride_h,
    kv_stride_b, kv_stride_l, kv_stride_2, kv_stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    dq_stride_b, dq_stride_n, dq_stride_h,
    H, N, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One query tile: dQ over the sample's key blocks; also stores Delta for the dK/dV kernel."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = DO.dtype.element_ty
    kv_len = tl.load(LENS + b)
    k_head = b * kv_stride_b + h * kv_stride_h
    v_head = k_head + kv_stride_2
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D0)
    rows = pid_m * BLOCK_M + offs_m
    valid_m = rows < N
    q_rows = row_offsets(b * q_stride_b + h * q_stride_h, rows, q_stride_n, ALIGN)
    o_rows = row_offsets(b * o_stride_b + h * o_stride_h, rows, o_stride_n, ALIGN)
    do_rows = row_offsets(b * do_stride_b + h * do_stride_h, rows, do_stride_n, ALIGN)
    dq_rows = row_offsets(b * dq_stride_b + h * dq_stride_h, rows, dq_stride_n, ALIGN)

    q0 = load_rows(Q, q_rows, valid_m, offs_d0, D, UPCAST)
    do0 = load_rows(DO, do_rows, valid_m, offs_d0, D, UPCAST)
    delta = tl.sum(do0.to(tl.float32) * load_rows(O, o_rows, valid_m, offs_d0, D, True), 1)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = load_rows(Q, q_rows, valid_m, offs_d1, D, UPCAST)
        do1 = load_rows(DO, do_rows, valid_m, offs_d1, D, UPCAST)
        delta += tl.sum(do1.to(tl.float32) * load_rows(O, o_rows, valid_m, offs_d1, D, True), 1)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    stat_ptrs = pid_bh.to(tl.int64) * N + rows
    tl.store(DELTA + stat_ptrs, delta, mask=valid_m)
    lse = tl.load(LSE + stat_ptrs, mask=valid_m, other=0.0)

    for start_l in range(0, kv_len, BLOCK_L):
        valid_l = start_l + offs_l < kv_len
        k_rows = row_offsets(k_head, start_l + offs_l, kv_stride_l, ALIGN)
        v_rows = row_offsets(v_head, start_l + offs_l, kv_stride_l, ALIGN)
        k0 = load_rows(KV, k_rows, valid_l, offs_d0, D, UPCAST)
        v0 = load_rows(KV, v_rows, valid_l, offs_d0, D, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = load_rows(KV, k_rows, valid_l, offs_d1, D, UPCAST)
            v1 = load_rows(KV, v_rows, valid_l, offs_d1, D, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        p = tl.where(valid_l[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds_lp = dot_operand(p * (dp - delta[:, None]), DTYPE, UPCAST)
        dq0 += tl.dot(ds_lp, k0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dq1 += tl.dot(ds_lp, k1, input_precision=DOT_PREC)
    store_rows(DQ, dq_rows, valid_m, offs_d0, D, dq0 * sm_scale)
    if BLOCK_D1 > 0:
        store_rows(DQ, dq_rows, valid_m, offs_d1, D, dq1 * sm_scale)


@triton.jit
def _cross_bwd_dkdv_kernel(
    Q, KV, LENS, DO, LSE, DELTA, DKV,
    q_stride_b, q_stride_n, q_stride_h,
    kv_stride_b, kv_stride_l, kv_stride_2, kv_stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    dkv_stride_c, dkv_stride_b, dkv_stride_l, dkv_stride_2, dkv_stride_h,
    H, N, L, qk_scale, sm_scale, tiles_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One (key block, query chunk): this chunk's share of dK and dV, as fp32 partials."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_lblocks = tl.cdiv(L, BLOCK_L)
    pid_c = pid // n_lblocks
    start_l = (pid % n_lblocks) * BLOCK_L
    b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    DTYPE: tl.constexpr = DO.dtype.element_ty
    kv_len = tl.load(LENS + b)
    q_head = b * q_stride_b + h * q_stride_h
    do_head = b * do_stride_b + h * do_stride_h
    k_head = b * kv_stride_b + h * kv_stride_h
    dk_head = pid_c.to(tl.int64) * dkv_stride_c + b * dkv_stride_b + h * dkv_stride_h
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = start_l + tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D0)
    valid_l = offs_l < kv_len
    k_rows = row_offsets(k_head, offs_l, kv_stride_l, ALIGN)
    v_rows = row_offsets(k_head + kv_stride_2, offs_l, kv_stride_l, ALIGN)
    k0 = load_rows(KV, k_rows, valid_l, offs_d0, D, UPCAST)
    v0 = load_rows(KV, v_rows, valid_l, offs_d0, D, UPCAST)
    dk0 = tl.zeros([BLOCK_L, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_L, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = load_rows(KV, k_rows, valid_l, offs_d1, D, UPCAST)
        v1 = load_rows(KV, v_rows, valid_l, offs_d1, D, UPCAST)
        dk1 = tl.zeros([BLOCK_L, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_L, BLOCK_D1], dtype=tl.float32)

    # a block wholly past kv_len gets zero gradient: skip its query loop
    n_tiles = tl.where(start_l < kv_len, tiles_per_prog, 0)
    for i in range(0, n_tiles):
        rows = (pid_c * tiles_per_prog + i) * BLOCK_M + offs_m
        valid_m = rows < N
        q_rows = row_offsets(q_head, rows, q_stride_n, ALIGN)
        do_rows = row_offsets(do_head, rows, do_stride_n, ALIGN)
        stat_ptrs = pid_bh.to(tl.int64) * N + rows
        lse = tl.load(LSE + stat_ptrs, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + stat_ptrs, mask=valid_m, other=0.0)
        q0 = load_rows(Q, q_rows, valid_m, offs_d0, D, UPCAST)
        do0 = load_rows(DO, do_rows, valid_m, offs_d0, D, UPCAST)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BLOCK_L, BLOCK_M) = S^T
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            q1 = load_rows(Q, q_rows, valid_m, offs_d1, D, UPCAST)
            do1 = load_rows(DO, do_rows, valid_m, offs_d1, D, UPCAST)
            s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        keep = valid_l[:, None] & valid_m[None, :]
        p_t = tl.where(keep, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        ds_t = dot_operand(p_t * (dp_t - delta[None, :]), DTYPE, UPCAST)
        p_t = dot_operand(p_t, DTYPE, UPCAST)
        dv0 += tl.dot(p_t, do0, input_precision=DOT_PREC)
        dk0 += tl.dot(ds_t, q0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dv1 += tl.dot(p_t, do1, input_precision=DOT_PREC)
            dk1 += tl.dot(ds_t, q1, input_precision=DOT_PREC)

    # every key row < L is written (zeros past kv_len), so the partial buffer needs no zero-fill
    in_l = offs_l < L
    dk_rows = row_offsets(dk_head, offs_l, dkv_stride_l, ALIGN)
    dv_rows = row_offsets(dk_head + dkv_stride_2, offs_l, dkv_stride_l, ALIGN)
    store_rows(DKV, dk_rows, in_l, offs_d0, D, dk0 * sm_scale)
    store_rows(DKV, dv_rows, in_l, offs_d0, D, dv0)
    if BLOCK_D1 > 0:
        store_rows(DKV, dk_rows, in_l, offs_d1, D, dk1 * sm_scale)
        store_rows(DKV, dv_rows, in_l, offs_d1, D, dv1)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------

_tiles_per_program_override: int | None = None


@contextlib.contextmanager
def tiles_per_program_override(n: int):
    """Force tiles_per_prog = n (tests use it to exercise several chunks and several tiles each)."""
    global _tiles_per_program_override
    old, _tiles_per_program_override = _tiles_per_program_override, n
    try:
        yield
    finally:
        _tiles_per_program_override = old


# (BLOCK_M, BLOCK_L, num_warps[, num_stages]) per kernel and input width (16-bit or fp32), one entry
# per head-dim class, chosen like the self-attention TILES: the largest tiling without register
# spills on sm_90 and sm_80 under triton 3.6 and 3.7. For "fwd_resident", BLOCK_L is the longest text kept resident; shorter
# text uses its own power-of-two fit. "dkdv" tiles are (query rows per step, key rows per program).
# ("dq", 32) at class 128 is the only entry that needs 2 pipeline stages to avoid spilling.
TILES: TileTable = {
    # head-dim class:     32             64             80             96             128
    ("fwd_resident", 16): ((64, 128, 4), (64, 128, 4), (64, 128, 4), (64, 128, 4), (64, 128, 4)),
    ("fwd_resident", 32): ((32, 64, 8), (32, 64, 8), (32, 32, 4), (32, 64, 8), (32, 32, 4)),
    ("fwd_streamed", 16): ((64, 64, 4), (64, 64, 4), (64, 64, 4), (64, 32, 4), (64, 64, 4)),
    ("fwd_streamed", 32): ((16, 32, 4), (16, 32, 4), (32, 32, 8), (16, 32, 4), (32, 32, 4)),
    ("dq", 16): ((64, 64, 4), (64, 64, 4), (64, 64, 4), (64, 32, 4), (64, 64, 4)),
    ("dq", 32): ((32, 32, 8), (32, 32, 8), (32, 32, 8), (32, 32, 8), (32, 32, 4, 2)),
    ("dkdv", 16): ((64, 64, 8), (64, 64, 8), (32, 64, 8), (32, 64, 8), (64, 64, 8)),
    ("dkdv", 32): ((32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 8)),
}  # fmt: skip


def tiles(kernel: str, D: int, dtype: torch.dtype, L: int) -> Tiles:
    """The tiling of ``kernel`` (fwd_resident, fwd_streamed, dq, dkdv) for head dim D, text length L."""
    bm, bl, warps, *stages = tile_entry(TILES, kernel, D, dtype)
    if kernel == "fwd_resident":
        bl = max(16, triton.next_power_of_2(L))
    return Tiles(bm, bl, warps, stages[0] if stages else 1)


def resident(D: int, dtype: torch.dtype, L: int) -> bool:
    """Whether the forward keeps the whole text of a (sample, head) resident (L <= BLOCK_L)."""
    return L <= tile_entry(TILES, "fwd_resident", D, dtype)[1]


def _chunking(n_tiles: int, programs_per_chunk: int, device: torch.device) -> tuple[int, int]:
    """(chunks, tiles per program): enough programs to fill the GPU (~4 per SM), no more."""
    if _tiles_per_program_override is not None:
        per = _tiles_per_program_override
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        chunks = min(n_tiles, max(1, triton.cdiv(4 * sms, programs_per_chunk)))
        per = triton.cdiv(n_tiles, chunks)
    return triton.cdiv(n_tiles, per), per


def _prepare(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor):
    # clamped so that no key past L is ever read, even when the caller skipped the value check
    lens = kv_lens.to(device=q.device, dtype=torch.int32).clamp(1, kv.shape[1]).contiguous()
    return unit_stride_last(q), unit_stride_last(kv), lens


def forward(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, N, H, D), lse (B, H, N) fp32, log2 domain)."""
    q, kv, lens = _prepare(q, kv, kv_lens)
    B, N, H, D = q.shape
    out = new_output((B, N, H, D), q)
    lse = new_output((B, H, N), q, torch.float32)
    res = resident(D, q.dtype, kv.shape[1])
    t = tiles("fwd_resident" if res else "fwd_streamed", D, q.dtype, kv.shape[1])
    chunks, per = _chunking(triton.cdiv(N, t.block_m), B * H, q.device)
    _cross_fwd_kernel[(chunks, B * H)](
        q, kv, lens, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        H, N, scale * LOG2E, per,
        BLOCK_M=t.block_m, BLOCK_L=t.block_n, RESIDENT=res, **attention_constexprs(D, q.dtype, alignment(q, kv, out)),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out, lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dq (B, N, H, D), dkv (B, L, 2, H, D))."""
    q, kv, lens = _prepare(q, kv, kv_lens)
    dout = unit_stride_last(dout)
    B, N, H, D = q.shape
    L = kv.shape[1]
    tq, tk = tiles("dq", D, q.dtype, L), tiles("dkdv", D, q.dtype, L)
    n_lblocks = triton.cdiv(L, tk.block_n)
    chunks, per = _chunking(triton.cdiv(N, tk.block_m), B * H * n_lblocks, q.device)
    dq = new_output((B, N, H, D), q)
    delta = new_output((B, H, N), q, torch.float32)
    dkv_part = new_output((chunks, B, L, 2, H, D), q, torch.float32)
    consts = attention_constexprs(D, q.dtype, alignment(q, kv, out, dout, dq, dkv_part))
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    kv_strides = (kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3))
    do_strides = (dout.stride(0), dout.stride(1), dout.stride(2))
    _cross_bwd_dq_kernel[(triton.cdiv(N, tq.block_m), B * H)](
        q, kv, lens, out, dout, lse, delta, dq,
        *q_strides, *kv_strides, out.stride(0), out.stride(1), out.stride(2), *do_strides,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, N, scale * LOG2E, scale,
        BLOCK_M=tq.block_m, BLOCK_L=tq.block_n, **consts, num_warps=tq.num_warps, num_stages=tq.num_stages,
    )  # fmt: skip
    _cross_bwd_dkdv_kernel[(chunks * n_lblocks, B * H)](
        q, kv, lens, dout, lse, delta, dkv_part,
        *q_strides, *kv_strides, *do_strides, *dkv_part.stride()[:5],
        H, N, L, scale * LOG2E, scale, per,
        BLOCK_M=tk.block_m, BLOCK_L=tk.block_n, **consts, num_warps=tk.num_warps, num_stages=tk.num_stages,
    )  # fmt: skip
    dkv = (dkv_part[0] if chunks == 1 else dkv_part.sum(0)).to(kv.dtype)
    return dq, dkv


# ----------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops, so torch.compile traces callers without graph breaks
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("stdit::triton_cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, kv, kv_lens, scale)


@_cross_attention_op.register_fake
def _(q, kv, kv_lens, scale):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("stdit::triton_cross_attention_backward", mutates_args=())
def _cross_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dout, q, kv, kv_lens, out, lse, scale)


@_cross_attention_backward_op.register_fake
def _(dout, q, kv, kv_lens, out, lse, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(kv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, kv, kv_lens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, kv_lens, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, kv, kv_lens, out, lse = ctx.saved_tensors
    dq, dkv = _cross_attention_backward_op(dout, q, kv, kv_lens, out, lse, ctx.scale)
    return dq, dkv, None, None


_cross_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Backend entry point: q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    check_attention_input("q", q)
    out, _ = _cross_attention_op(q, kv, kv_lens, float(scale))
    return out


# ----------------------------------------------------------------------------------------------------
# Shipped configurations, for `stdit inspect`
# ----------------------------------------------------------------------------------------------------


def shipped_builds() -> list[KernelBuild]:
    """Every (kernel, text tile, head dim, dtype) configuration the launchers above can pick."""
    builds = []
    for dtype in SHIPPED_DTYPES:
        for D in SHIPPED_HEAD_DIMS:
            max_resident = tile_entry(TILES, "fwd_resident", D, dtype)[1]
            variants = [("fwd_resident", L, _cross_fwd_kernel) for L in (16, 32, 64, 128) if L <= max_resident]
            variants += [("fwd_streamed", 0, _cross_fwd_kernel), ("dq", 0, _cross_bwd_dq_kernel), ("dkdv", 0, _cross_bwd_dkdv_kernel)]
            for name, L, fn in variants:
                t = tiles(name, D, dtype, L)
                blocks = dict(BLOCK_M=t.block_m, BLOCK_L=t.block_n)
                if fn is _cross_fwd_kernel:
                    blocks["RESIDENT"] = name == "fwd_resident"
                builds.append(attention_build(f"cross_attn_{name}", fn, t, dtype, D, blocks))
    return builds
