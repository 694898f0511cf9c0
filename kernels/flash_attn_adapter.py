"""The "flash_attn" backend: FlashAttention-2's ``flash_attn`` package, called as Open-Sora 1.0 calls it.

Open-Sora 1.0 (opensora/models/layers/blocks.py, Attention with enable_flashattn):

- spatial: qkv viewed (B*T, S, 3, H, D), ``flash_attn_func(q, k, v, softmax_scale=scale)``;
- temporal: ``rearrange(x, "B (T S) C -> (B S) T C")`` (a copy), the same call, the inverse rearrange
  (a second copy);
- full: the same call on (B, N, 3, H, D).

Open-Sora used xformers for cross-attention (see xformers_adapter.py). The natural FlashAttention
equivalent is ``flash_attn_varlen_func``: the queries of all samples packed to (B*N, H, D) with
cu_seqlens_q = [0, N, 2N, ...], the valid text tokens packed to the front of (B*L, H, D) with
cu_seqlens_k = [0, cumsum(kv_lens)] -- the same block-diagonal attention as xformers'
BlockDiagonalMask, built without reading the lengths on the host (see pack_valid_first).

flash_attn is imported lazily (never at import time of stdit.kernels). It has CUDA kernels only,
for fp16/bf16 inputs. Tested on CPU through a stand-in package that records every call
(tests/kernels/test_adapters.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from . import qk_norm_rope
from .qk_norm_rope import QKNorm
from .reference import from_sequences, to_sequences

_DTYPES = (torch.float16, torch.bfloat16)


def availability(device: torch.device) -> str | None:
    """None if flash_attn runs on ``device``, else why not and how to get it."""
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "the 'flash_attn' package is not installed: pip install flash-attn --no-build-isolation "
            "(needs a CUDA torch and nvcc; it has no CPU kernels)"
        )
    if device.type != "cuda":
        return f"flash_attn has CUDA kernels only, not {device.type}; use a CUDA device or backend 'sdpa'"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"flash_attn (FlashAttention-2) needs an Ampere or newer GPU (sm_80+), this one is sm_{major}{minor}"
    return None


def _flash_attn() -> ModuleType:
    return importlib.import_module("flash_attn")


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{name}: backend 'flash_attn' takes float16 or bfloat16 only, got {x.dtype}; "
            "cast the input, or use backend 'sdpa' or 'triton' for fp32"
        )


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D); kind: spatial | temporal | full.

    With ``qk_norm`` / ``rope``, q and k are normalised and rotated in PyTorch first (qk_norm_rope.apply).
    """
    _check_dtype("qkv", qkv)
    if qk_norm is not None or rope is not None:
        qkv = qk_norm_rope.apply(qkv, kind, num_frames, qk_norm, rope)
    flash_attn_func = _flash_attn().flash_attn_func
    q, k, v = to_sequences(qkv, kind, num_frames)  # Open-Sora's rearranges (a copy for temporal)
    o = flash_attn_func(q, k, v, softmax_scale=scale)  # (Z, L, H, D)
    return from_sequences(o, kind, qkv.shape[0])


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    _check_dtype("q", q)
    flash_attn_varlen_func = _flash_attn().flash_attn_varlen_func
    B, N, H, D = q.shape
    L = kv.shape[1]
    lens = kv_lens.to(q.device, torch.int32)
    k, v = pack_valid_first(kv, lens).unbind(1)  # each (B*L, H, D): the valid text tokens first
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)  # [0, N, ..., B*N]
    cu_k = torch.cat([zero, lens.cumsum(0, dtype=torch.int32)])  # [0, len0, len0+len1, ...]
    # max_seqlen_k = L, an upper bound of every length that needs no read of kv_lens on the host
    o = flash_attn_varlen_func(q.reshape(B * N, H, D), k, v, cu_q, cu_k, N, L, softmax_scale=scale)  # (B*N, H, D)
    return o.view(B, N, H, D)


def pack_valid_first(kv: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """kv (B, L, 2, H, D) -> (B*L, 2, H, D): the first kv_lens[b] tokens of every sample, in order,
    then the (zeroed) padding, so rows [0, sum(kv_lens)) equal Open-Sora's masked_select packing.

    The output has a fixed size, so no length is read on the host. flash_attn reads only the rows
    cu_seqlens_k covers; its backward leaves the gradient of the padding rows unwritten, and the
    zeroing (masked_fill) gives the padding of kv exactly zero gradient whatever those rows hold.
    """
    B, L = kv.shape[:2]
    valid = torch.arange(L, device=kv.device) < kv_lens[:, None]  # (B, L)
    order = torch.argsort((~valid).flatten().to(torch.uint8), stable=True)  # valid rows first, in order
    return kv.masked_fill(~valid[:, :, None, None, None], 0).flatten(0, 1)[order]
