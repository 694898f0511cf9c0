"""The "reference" backend: readable eager PyTorch doing exactly what Open-Sora 1.0 does.

Open-Sora 1.0 (v1.0.0, opensora/models/layers/blocks.py) computes

- spatial: x viewed (B*T, S, C); attention over S with q*scale, q @ k^T, softmax in fp32, cast back,
  @ v;
- temporal: ``rearrange(x, "B (T S) C -> (B S) T C")`` (a full copy), the same attention, and the
  inverse rearrange (a second copy);
- cross: q flattened to (1, B*N, H, D), the valid text tokens of every sample packed
  (``masked_select`` by the caption mask) to (1, sum(len), 2, H, D), and xformers'
  ``memory_efficient_attention`` with ``BlockDiagonalMask.from_seqlens([N]*B, lens)``. Here the
  block-diagonal attention is evaluated per sample over the packed tokens, with the same math.

With ``qk_norm`` / ``rope`` (Open-Sora 1.2's STDiT3), q and k are normalised per head and then rotated
in the sequence layout, positions 0..L-1 along each sequence, before the same attention: the
norm in fp32 rounded to the input dtype, the gain multiply, RoPE in fp32 rounded to the input dtype
(see qk_norm_rope.py for the exact operations and how rotary-embedding-torch differs in 16-bit).

This is the baseline that the benchmarks call "what Open-Sora does", and the float64 oracle of the
tests (run it on float64 inputs). It is autograd-differentiable as written. Packing the valid text
tokens and splitting them per sample need their count on the host, so cross-attention reads kv_lens
there (a device-to-host synchronisation per call), as Open-Sora's packing does.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .qk_norm_rope import QKNorm, cos_sin, rms_norm, rotate


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (Z, Nq, H, D), k/v (Z, Nk, H, D) -> (Z, Nq, H, D); Open-Sora's eager path, fp32 softmax."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # Z H N D
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.to(torch.float32 if attn.dtype != torch.float64 else torch.float64).softmax(dim=-1).to(q.dtype)
    return (attn @ v).transpose(1, 2)


def to_sequences(qkv: torch.Tensor, kind: str, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Open-Sora's layout change before attention: qkv (B, T*S, 3, H, D) -> q, k, v (Z, L, H, D).

    spatial: Z = B*T sequences of L = S (a view); temporal: Z = B*S of L = T (Open-Sora's full
    ``B (T S) C -> (B S) T C`` copy); full: Z = B of L = T*S (a view).
    """
    T = num_frames
    if kind == "spatial":
        x = rearrange(qkv, "B (T S) three H D -> (B T) S three H D", T=T)
    elif kind == "temporal":
        x = rearrange(qkv, "B (T S) three H D -> (B S) T three H D", T=T).contiguous()  # Open-Sora's copy
    elif kind == "full":
        x = qkv
    else:
        raise ValueError(f"kind: expected 'spatial', 'temporal' or 'full', got {kind!r}")
    q, k, v = x.unbind(2)
    return q, k, v


def from_sequences(o: torch.Tensor, kind: str, batch: int) -> torch.Tensor:
    """The inverse of to_sequences for the output: (Z, L, H, D) -> (B, T*S, H, D)."""
    if kind == "spatial":
        return rearrange(o, "(B T) S H D -> B (T S) H D", B=batch)
    if kind == "temporal":
        return rearrange(o, "(B S) T H D -> B (T S) H D", B=batch).contiguous()  # the copy back
    return o


def pack_valid(kv: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """Open-Sora's text packing: the first kv_lens[b] tokens of every sample, concatenated:
    kv (B, L, 2, H, D) -> (sum(kv_lens), 2, H, D) (a masked_select copy)."""
    L = kv.shape[1]
    keep = torch.arange(L, device=kv.device)[None, :] < kv_lens.to(kv.device)[:, None]  # B L
    return kv[keep]


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D); kind: spatial | temporal | full.

    Open-Sora 1.2's order: q, k = q_norm(q), k_norm(k), then RoPE (positions along each sequence).
    """
    q, k, v = to_sequences(qkv, kind, num_frames)  # (Z, L, H, D)
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm.q_weight, qk_norm.eps), rms_norm(k, qk_norm.k_weight, qk_norm.eps)
    if rope is not None:
        positions = torch.arange(q.shape[1], device=q.device)  # 0..L-1 along each sequence
        cos, sin = (c[:, None, :] for c in cos_sin(positions, rope, q.dtype))  # (L, 1, D/2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return from_sequences(_attention(q, k, v, scale), kind, qkv.shape[0])


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    k_all, v_all = pack_valid(kv, kv_lens).unbind(1)
    # block-diagonal attention over the packed text: sample b's N queries see only its len(b) keys
    outs = []
    start = 0
    for b, n in enumerate(int(n) for n in kv_lens.tolist()):
        k = k_all[start : start + n].unsqueeze(0)
        v = v_all[start : start + n].unsqueeze(0)
        outs.append(_attention(q[b : b + 1], k, v, scale))
        start += n
    return torch.cat(outs, dim=0)
