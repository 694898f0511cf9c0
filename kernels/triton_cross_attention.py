"""Triton cross-attention for STDiT: video tokens attend to each sample's variable-length T5 text.

q (B, N, H, D) attends to kv (B, L, 2, H, D), padded to L text tokens, of which the first
kv_lens[b] are real. Open-Sora 1.0 packs the valid tokens of all samples with ``masked_select``
(a copy) and calls xformers with a ``BlockDiagonalMask``; here every program reads its sample's
length from ``kv_lens`` and masks the padded keys, with no packing copy.

The text is short (L <= 120 in Open-Sora 1.0), so one (sample, head)'s K and V (<= 128 x 72 x 2
values, ~37 KB in bf16) stay resident in the program while it streams query tiles of BLOCK_M rows:
K/V are read once per program instead of once per query tile, and the softmax of a query tile is
exact in one pass (all its keys are present), so there is no online-softmax rescaling. Programs are
(query chunk, sample x head); a chunk holds tiles_per_prog consecutive query tiles, sized so the
launch fills the GPU even at small batch.

Head dim is split into power-of-two chunks D0 + D1 (72 = 64 + 16, 8 masked) like the
self-attention kernels; the row loaders are shared with them.

Backward (P recomputed from the stored log-sum-exp; Delta_i = sum_d dO_id O_id):
    dS = P * (dO V^T - Delta)     dQ = scale * dS K     dK = scale * dS^T Q     dV = P^T dO
dQ is written per query tile. dK and dV sum over every query of the sample: each program
accumulates its chunk's share in registers and writes it to a fp32 partial buffer
(chunks, B, L, 2, H, D), summed on the host -- deterministic, no atomics, and the buffer is tiny
(text-sized). Padded keys (position >= kv_lens[b]) get exactly zero gradient.

Limit: L <= 256 (K/V must fit a program); longer text raises a ValueError naming kv.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .triton_common import TL_DTYPES, KernelBuild, signature_of
from .triton_self_attention import LOG2E, _consts, _last_dim_contiguous, _load, _lowp, _store, check_supported

MAX_L = 256

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _cross_fwd_kernel(
    Q, KV, LENS, O, LSE,
    q_stride_b, q_stride_n, q_stride_h,
    kv_stride_b, kv_stride_l, kv_stride_2, kv_stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    H, N, D, qk_scale, tiles_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    DTYPE: tl.constexpr = O.dtype.element_ty
    kv_len = tl.load(LENS + b)
    q_base = Q + b.to(tl.int64) * q_stride_b + h * q_stride_h
    o_base = O + b.to(tl.int64) * o_stride_b + h * o_stride_h
    k_base = KV + b.to(tl.int64) * kv_stride_b + h * kv_stride_h
    v_base = k_base + kv_stride_2
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D0)
    valid_l = offs_l < kv_len

    # K and V of this (sample, head): loaded once, reused by every query tile below.
    k0 = _load(k_base, offs_l, valid_l, kv_stride_l, offs_d0, D, UPCAST)
    v0 = _load(v_base, offs_l, valid_l, kv_stride_l, offs_d0, D, UPCAST)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load(k_base, offs_l, valid_l, kv_stride_l, offs_d1, D, UPCAST)
        v1 = _load(v_base, offs_l, valid_l, kv_stride_l, offs_d1, D, UPCAST)

    for i in range(0, tiles_per_prog):
        rows = (pid_c * tiles_per_prog + i) * BLOCK_M + offs_m
        valid_m = rows < N
        q0 = _load(q_base, rows, valid_m, q_stride_n, offs_d0, D, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            q1 = _load(q_base, rows, valid_m, q_stride_n, offs_d1, D, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.where(valid_l[None, :], s * qk_scale, -1.0e30)  # kv_len >= 1: every row has a key
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        inv_l = 1.0 / l
        p_lp = _lowp(p, DTYPE, UPCAST)
        _store(o_base, rows, valid_m, o_stride_n, offs_d0, D, tl.dot(p_lp, v0, input_precision=DOT_PREC) * inv_l[:, None])
        if BLOCK_D1 > 0:
            _store(o_base, rows, valid_m, o_stride_n, offs_d1, D, tl.dot(p_lp, v1, input_precision=DOT_PREC) * inv_l[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, m + tl.log2(l), mask=valid_m)


@triton.jit
def _cross_bwd_kernel(
    Q, KV, LENS, O, DO, LSE, DQ, DKV,
    q_stride_b, q_stride_n, q_stride_h,
    kv_stride_b, kv_stride_l, kv_stride_2, kv_stride_h,
    o_stride_b, o_stride_n, o_stride_h,
    do_stride_b, do_stride_n, do_stride_h,
    dq_stride_b, dq_stride_n, dq_stride_h,
    dkv_stride_c, dkv_stride_b, dkv_stride_l, dkv_stride_2, dkv_stride_h,
    H, N, L, D, qk_scale, sm_scale, tiles_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    DTYPE: tl.constexpr = DO.dtype.element_ty
    kv_len = tl.load(LENS + b)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * q_stride_b + h * q_stride_h
    o_base = O + b64 * o_stride_b + h * o_stride_h
    do_base = DO + b64 * do_stride_b + h * do_stride_h
    dq_base = DQ + b64 * dq_stride_b + h * dq_stride_h
    k_base = KV + b64 * kv_stride_b + h * kv_stride_h
    v_base = k_base + kv_stride_2
    dk_base = DKV + pid_c.to(tl.int64) * dkv_stride_c + b64 * dkv_stride_b + h * dkv_stride_h
    dv_base = dk_base + dkv_stride_2
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D0)
    valid_l = offs_l < kv_len

    k0 = _load(k_base, offs_l, valid_l, kv_stride_l, offs_d0, D, UPCAST)
    v0 = _load(v_base, offs_l, valid_l, kv_stride_l, offs_d0, D, UPCAST)
    dk0 = tl.zeros([BLOCK_L, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_L, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load(k_base, offs_l, valid_l, kv_stride_l, offs_d1, D, UPCAST)
        v1 = _load(v_base, offs_l, valid_l, kv_stride_l, offs_d1, D, UPCAST)
        dk1 = tl.zeros([BLOCK_L, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_L, BLOCK_D1], dtype=tl.float32)

    for i in range(0, tiles_per_prog):
        rows = (pid_c * tiles_per_prog + i) * BLOCK_M + offs_m
        valid_m = rows < N
        q0 = _load(q_base, rows, valid_m, q_stride_n, offs_d0, D, UPCAST)
        do0 = _load(do_base, rows, valid_m, do_stride_n, offs_d0, D, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        delta = tl.sum(do0.to(tl.float32) * _load(o_base, rows, valid_m, o_stride_n, offs_d0, D, True), 1)
        if BLOCK_D1 > 0:
            q1 = _load(q_base, rows, valid_m, q_stride_n, offs_d1, D, UPCAST)
            do1 = _load(do_base, rows, valid_m, do_stride_n, offs_d1, D, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
            delta += tl.sum(do1.to(tl.float32) * _load(o_base, rows, valid_m, o_stride_n, offs_d1, D, True), 1)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=valid_m, other=0.0)
        keep = valid_m[:, None] & valid_l[None, :]
        p = tl.where(keep, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds_lp = _lowp(p * (dp - delta[:, None]), DTYPE, UPCAST)
        p_t = tl.trans(_lowp(p, DTYPE, UPCAST))
        ds_t = tl.trans(ds_lp)
        _store(dq_base, rows, valid_m, dq_stride_n, offs_d0, D, tl.dot(ds_lp, k0, input_precision=DOT_PREC) * sm_scale)
        dv0 += tl.dot(p_t, do0, input_precision=DOT_PREC)
        dk0 += tl.dot(ds_t, q0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            _store(dq_base, rows, valid_m, dq_stride_n, offs_d1, D, tl.dot(ds_lp, k1, input_precision=DOT_PREC) * sm_scale)
            dv1 += tl.dot(p_t, do1, input_precision=DOT_PREC)
            dk1 += tl.dot(ds_t, q1, input_precision=DOT_PREC)

    # Every key row < L is written (zeros past kv_len), so the partial buffer needs no zero-fill.
    in_l = offs_l < L
    _store(dk_base, offs_l, in_l, dkv_stride_l, offs_d0, D, dk0 * sm_scale)
    _store(dv_base, offs_l, in_l, dkv_stride_l, offs_d0, D, dv0)
    if BLOCK_D1 > 0:
        _store(dk_base, offs_l, in_l, dkv_stride_l, offs_d1, D, dk1 * sm_scale)
        _store(dv_base, offs_l, in_l, dkv_stride_l, offs_d1, D, dv1)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------

_NUM_WARPS = 4
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


def block_sizes(L: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_L): the whole padded text in one tile; fewer query rows as it grows, so the
    (BLOCK_M x BLOCK_L) fp32 score tile stays at <= 8K values per program."""
    block_l = max(16, triton.next_power_of_2(L))
    budget = 4096 if dtype == torch.float32 else 8192
    return max(16, min(64, budget // block_l)), block_l


def _chunking(N: int, BH: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(chunks, tiles per program): enough programs to fill the GPU (~4 per SM), no more."""
    n_tiles = triton.cdiv(N, block_m)
    if _tiles_per_program_override is not None:
        per = _tiles_per_program_override
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        chunks = min(n_tiles, max(1, triton.cdiv(4 * sms, BH)))
        per = triton.cdiv(n_tiles, chunks)
    return triton.cdiv(n_tiles, per), per


def _prepare(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor):
    return _last_dim_contiguous(q), _last_dim_contiguous(kv), kv_lens.to(device=q.device, dtype=torch.int32).contiguous()


def forward(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, N, H, D), lse (B, H, N) fp32, log2 domain)."""
    q, kv, lens = _prepare(q, kv, kv_lens)
    B, N, H, D = q.shape
    L = kv.shape[1]
    out = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    block_m, block_l = block_sizes(L, q.dtype)
    chunks, per = _chunking(N, B * H, block_m, q.device)
    _cross_fwd_kernel[(chunks, B * H)](
        q, kv, lens, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        H, N, D, scale * LOG2E, per,
        BLOCK_M=block_m, BLOCK_L=block_l, **_consts(D, q.dtype), num_warps=_NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return out, lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dq (B, N, H, D), dkv (B, L, 2, H, D))."""
    q, kv, lens = _prepare(q, kv, kv_lens)
    dout = _last_dim_contiguous(dout)
    B, N, H, D = q.shape
    L = kv.shape[1]
    block_m, block_l = block_sizes(L, q.dtype)
    chunks, per = _chunking(N, B * H, block_m, q.device)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dkv_part = torch.empty((chunks, B, L, 2, H, D), device=q.device, dtype=torch.float32)
    _cross_bwd_kernel[(chunks, B * H)](
        q, kv, lens, out, dout, lse, dq, dkv_part,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *dkv_part.stride()[:5],
        H, N, L, D, scale * LOG2E, scale, per,
        BLOCK_M=block_m, BLOCK_L=block_l, **_consts(D, q.dtype), num_warps=_NUM_WARPS, num_stages=1,
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
    check_supported("q", q)
    if kv.shape[1] > MAX_L:
        raise ValueError(
            f"kv: the triton cross-attention keeps K/V resident and takes L <= {MAX_L} text tokens, "
            f"got L = {kv.shape[1]}; use backend='sdpa' or 'flex' for longer text"
        )
    out, _ = _cross_attention_op(q, kv, kv_lens, float(scale))
    return out


# ----------------------------------------------------------------------------------------------------
# Shipped configurations, for `stdit inspect`
# ----------------------------------------------------------------------------------------------------


def shipped_builds() -> list[KernelBuild]:
    """Every (kernel, text tile, head dim, dtype) configuration the launchers above can pick."""
    builds = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (32, 64, 72, 80, 96, 128):
            for L in (16, 32, 64, 128, 256):
                block_m, block_l = block_sizes(L, dtype)
                c = dict(_consts(D, dtype), UPCAST=False, BLOCK_M=block_m, BLOCK_L=block_l)
                tag = f"D={D},L<={block_l},{TL_DTYPES[dtype]}"
                for name, fn in (("fwd", _cross_fwd_kernel), ("bwd", _cross_bwd_kernel)):
                    builds.append(KernelBuild(f"cross_attn_{name}[{tag}]", fn, signature_of(fn, dtype, c), c, _NUM_WARPS, 1))
    return builds
