"""Per-head RMSNorm of q and k, and rotary position embedding (RoPE), as Open-Sora 1.2's STDiT3
applies them between the qkv projection and the attention.

STDiT3's self-attention normalises q and k per head (``LlamaRMSNorm`` of width D, eps 1e-6) and, in
its temporal blocks only, rotates them after the norm (``rotary-embedding-torch``'s
``rotate_queries_or_keys``). Both act on one head vector x (D,) of one token at a time:

- norm: ``h = x.float(); h = h * rsqrt(mean(h * h) + eps); n = weight * h.to(x.dtype)``, the
  result in x's dtype (a product rounded to it: the gain may be fp32 while x is 16-bit);
- RoPE: interleaved pairs (n[2i], n[2i+1]) rotated by the angle p * theta_i, p the token's position
  within its attended sequence (0..LEN-1: the frame index in temporal attention) and theta (D/2,)
  the inverse frequencies 10000^(-2i/D) (the model's ``rope.freqs``): in fp32,
  ``y = n * cos + rotate_half(n) * sin`` with ``rotate_half`` mapping each pair (a, b) to (-b, a),
  then cast back to x's dtype.

Precision, and what rotary-embedding-torch 0.5.3 does differently: it builds positions with
``arange(LEN, dtype=x.dtype)`` and multiplies them by ``freqs`` in the frequencies' dtype, and for the
(B, H, N, D) tensors STDiT3 passes it returns the promoted dtype without a cast back. Open-Sora casts
the whole model with ``.to(dtype)``, so in its bf16 runs the angles themselves are bf16 (about 0.1 rad
off at p = 50). Here positions are exact integers, angles and the rotation are fp32 whatever the
dtype of ``theta`` (a bf16 theta is used as the bf16-rounded values), and the result has x's dtype:
for fp32 models identical to Open-Sora, for 16-bit ones the accurate version of the same math.

Every non-fused backend (sdpa, flex, flash_attn, xformers) calls :func:`apply` on the native qkv
layout before its attention call: one copy of qkv with q and k replaced. The reference backend
uses :func:`rms_norm` and :func:`rotate` in Open-Sora's (sequences, LEN, H, D) layout; the triton
backend fuses both into its kernels. ``theta`` is a constant (no gradient), the gains are learnable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class QKNorm(NamedTuple):
    """The learned per-head RMSNorm of q and k: gains (D,) each, and the epsilon added to mean(x^2)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm over the last dim: x (..., D), weight (D,) -> (..., D) in x's dtype.

    The mean square and the scaling run in fp32 (float64 for float64 x), the normalised value is
    rounded to x's dtype before the gain multiplies it (as LlamaRMSNorm does), and the product is
    rounded to x's dtype.
    """
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs; float64 stays float64 (the tests' oracle)."""
    return torch.promote_types(dtype, torch.float32)


def cos_sin(
    positions: torch.Tensor, theta: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation of pair i at position p: positions (...,) integers, theta (D/2,) -> cos, sin (..., D/2).

    Angles p * theta_i in fp32 (float64 when ``dtype`` is the input dtype float64).
    """
    dtype = _compute_dtype(dtype)
    angles = positions.to(dtype)[..., None] * theta.detach().to(dtype)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: x (..., D), cos/sin broadcastable to (..., D/2) -> (..., D) in x's dtype.

    Pair (a, b) = (x[2i], x[2i+1]) becomes (a*cos - b*sin, b*cos + a*sin), computed in fp32: the same
    roundings as ``x * cos + rotate_half(x) * sin`` with the angles repeated per pair (float64 stays
    float64).
    """
    a, b = x.to(_compute_dtype(x.dtype)).unflatten(-1, (-1, 2)).unbind(-1)
    y = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return y.to(x.dtype)


def token_positions(kind: str, N: int, num_frames: int, device: torch.device) -> torch.Tensor:
    """(N,) position of token n = t*S + s within its attended sequence: t (temporal), s (spatial), n (full)."""
    n = torch.arange(N, device=device)
    S = N // num_frames
    if kind == "temporal":
        return n // S
    if kind == "spatial":
        return n % S
    if kind == "full":
        return n
    raise ValueError(f"kind: expected 'spatial', 'temporal' or 'full', got {kind!r}")


def apply(
    qkv: torch.Tensor, kind: str, num_frames: int, qk_norm: QKNorm | None, rope: torch.Tensor | None
) -> torch.Tensor:
    """qkv (B, T*S, 3, H, D) -> a new (B, T*S, 3, H, D) with q and k normalised, then rotated; v as is.

    Differentiable with respect to qkv and both gains (plain autograd).
    """
    q, k, v = qkv.unbind(2)  # each (B, N, H, D)
    if qk_norm is not None:
        q = rms_norm(q, qk_norm.q_weight, qk_norm.eps)
        k = rms_norm(k, qk_norm.k_weight, qk_norm.eps)
    if rope is not None:
        pos = token_positions(kind, qkv.shape[1], num_frames, qkv.device)
        cos, sin = (c[:, None, :] for c in cos_sin(pos, rope, qkv.dtype))  # (N, 1, D/2): broadcast over B and H
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return torch.stack((q, k, v), dim=2)
