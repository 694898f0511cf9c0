"""The public attention API of stdit: four functions, one contract, many backends.

Layouts (Open-Sora 1.0's ``B (T S) C`` token order, token index t*S + s):

- ``qkv``: the qkv projection output viewed as (B, T*S, 3, H, D). Any strides (e.g.
  ``linear(x).view(B, N, 3, H, D)``).
- ``out``: (B, T*S, H, D) in the same token order, so ``out.flatten(2)`` feeds the output projection.
- cross: ``q`` (B, N, H, D), ``kv`` (B, L, 2, H, D) padded to L text tokens, ``kv_lens`` (B,) integer
  with 1 <= len <= L; keys at positions >= len never influence the output.

``scale`` defaults to D**-0.5. The output has the input's dtype; the softmax accumulates in fp32.
Every function is differentiable with respect to every floating input.

``backend``: "auto" (best for the input's device), "triton" (ours), "sdpa" / "sdpa:<flash|efficient|
cudnn|math>", "flex", "flash_attn", "xformers", "reference" (Open-Sora 1.0's exact eager math). A
named backend that cannot run raises :class:`BackendUnavailable` saying why; nothing falls back.
"""

from __future__ import annotations

import torch

from . import backends, validate


def _self_attention(qkv: torch.Tensor, kind: str, num_frames: int, backend: str, scale: float | None) -> torch.Tensor:
    B, N, H, D = validate.check_qkv(qkv)
    num_frames = validate.check_num_frames(num_frames, N)
    scale = validate.check_scale(scale, D)
    mod, sub = backends.resolve(backend, qkv.device, qkv.dtype, D)
    if sub is not None:
        return mod.self_attention(qkv, kind, num_frames, scale, sub=sub)
    return mod.self_attention(qkv, kind, num_frames, scale)


def spatial_attention(
    qkv: torch.Tensor, num_frames: int, *, backend: str = "auto", scale: float | None = None
) -> torch.Tensor:
    """Self-attention among the S tokens of each frame.

    qkv (B, T*S, 3, H, D) with T = num_frames -> out (B, T*S, H, D); token t*S + s attends to
    tokens t*S + s' for all s'.
    """
    return _self_attention(qkv, "spatial", num_frames, backend, scale)


def temporal_attention(
    qkv: torch.Tensor, num_frames: int, *, backend: str = "auto", scale: float | None = None
) -> torch.Tensor:
    """Self-attention among the T tokens at each spatial position.

    qkv (B, T*S, 3, H, D) with T = num_frames -> out (B, T*S, H, D); token t*S + s attends to
    tokens t'*S + s for all t'. No (B S) T C rearrange is needed by the caller.
    """
    return _self_attention(qkv, "temporal", num_frames, backend, scale)


def full_attention(qkv: torch.Tensor, *, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Self-attention among all N = T*S tokens: qkv (B, N, 3, H, D) -> out (B, N, H, D)."""
    return _self_attention(qkv, "full", 1, backend, scale)


def cross_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    backend: str = "auto",
    scale: float | None = None,
    check_lens: bool = True,
) -> torch.Tensor:
    """Attention from video tokens to each sample's valid text tokens.

    q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) integer in [1, L] -> out (B, N, H, D).
    Sample b's queries attend to keys kv[b, :kv_lens[b]] only.

    ``check_lens``: check that every length lies in [1, L], which reads kv_lens on the host (a
    device-to-host synchronisation). A caller that has already checked them once, as the models do
    per forward, passes False so that blocks never wait on the host.
    """
    B, N, L, H, D = validate.check_cross(q, kv, kv_lens, check_lens=check_lens)
    scale = validate.check_scale(scale, D)
    mod, sub = backends.resolve(backend, q.device, q.dtype, D)
    if sub is not None:
        return mod.cross_attention(q, kv, kv_lens, scale, sub=sub)
    return mod.cross_attention(q, kv, kv_lens, scale)
