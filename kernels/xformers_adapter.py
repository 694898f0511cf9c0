"""The "xformers" backend: ``xformers.ops.memory_efficient_attention``, called as Open-Sora 1.0 calls it.

- self-attention: the layouts of Open-Sora's Attention (see flash_attn_adapter.py): spatial (B*T, S),
  temporal rearranged to (B*S, T) and back (two copies), full (B, N); (Z, L, H, D) tensors.
- cross (Open-Sora 1.0's MultiHeadCrossAttention, exactly): q viewed (1, B*N, H, D); the valid text
  tokens of every sample packed by a boolean mask to (1, sum(len), 2, H, D); the attention made
  block-diagonal by ``BlockDiagonalMask.from_seqlens([N] * B, lens)``, so sample b's N queries see
  only its own len(b) keys.

``BlockDiagonalMask.from_seqlens`` takes the lengths as Python ints, so cross-attention reads kv_lens
on the host (a device-to-host synchronisation per call), as Open-Sora 1.0 did; every other backend
but "reference" attends without one. xformers is imported lazily (never at import time of
stdit.kernels). It has no CPU kernels. Tested on CPU through a stand-in package that records every
call (tests/kernels/test_adapters.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from types import ModuleType

import torch

from . import qk_norm_rope
from .qk_norm_rope import QKNorm
from .reference import from_sequences, pack_valid, to_sequences


def availability(device: torch.device) -> str | None:
    """None if xformers runs on ``device``, else why not and how to get it."""
    if importlib.util.find_spec("xformers") is None:
        return "the 'xformers' package is not installed: pip install xformers (CUDA only; it has no CPU kernels)"
    if device.type != "cuda":
        return f"xformers has CUDA kernels only (none for {device.type}); use a CUDA device or backend 'sdpa'"
    return None


def _xops() -> ModuleType:
    return importlib.import_module("xformers.ops")


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D); kind: spatial | temporal | full.

    With ``qk_norm`` / ``rope``, q and k are normalised and rotated in PyTorch first (qk_norm_rope.apply).
    """
    xops = _xops()
    if qk_norm is not None or rope is not None:
        qkv = qk_norm_rope.apply(qkv, kind, num_frames, qk_norm, rope)
    q, k, v = to_sequences(qkv, kind, num_frames)  # Open-Sora's rearranges (a copy for temporal)
    o = xops.memory_efficient_attention(q, k, v, scale=scale)  # (Z, L, H, D)
    return from_sequences(o, kind, qkv.shape[0])


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    xops = _xops()
    B, N, H, D = q.shape
    lens = [int(n) for n in kv_lens.tolist()]  # from_seqlens takes Python ints (one host sync)
    packed = pack_valid(kv, kv_lens).unsqueeze(0)  # (1, sum(len), 2, H, D)
    k, v = packed.unbind(2)
    bias = _block_diagonal_mask(xops, [N] * B, lens, q.device)
    o = xops.memory_efficient_attention(q.reshape(1, B * N, H, D), k, v, attn_bias=bias, scale=scale)
    return o.view(B, N, H, D)


def _block_diagonal_mask(xops: ModuleType, q_seqlen: list[int], kv_seqlen: list[int], device: torch.device):
    """``BlockDiagonalMask.from_seqlens`` on the inputs' device. Releases whose from_seqlens takes
    ``device=`` put the mask's offsets on the default CUDA device unless told, the wrong GPU for
    inputs on cuda:1; older releases take no device argument."""
    from_seqlens = xops.fmha.BlockDiagonalMask.from_seqlens
    if "device" in inspect.signature(from_seqlens).parameters:
        return from_seqlens(q_seqlen, kv_seqlen, device=device)
    return from_seqlens(q_seqlen, kv_seqlen)
