"""The "sdpa" backend: ``torch.nn.functional.scaled_dot_product_attention`` behind the stdit layouts.

SDPA takes (Z, H, L, D) tensors of any strides, so every layout change here is a view or a
permute, except where no single (Z, H) pair of strides can describe the tokens:

- spatial: q (B, T*S, H, D) -> (B*T, H, S, D). Merging B and T is a view for any ``linear(x).view``
  input (stride_B == T * stride_T); ``reshape`` copies only for inputs where it is not.
- temporal: (B, T, S, H, D) -> (B*S, H, T, D). B and S cannot share one stride (stride_B = T*S*sn,
  stride_S = sn), and S and H cannot either (q/k/v interleave in qkv), so each of q, k, v is copied
  once, like Open-Sora's rearrange; the output is copied back into (B, T*S, H, D) token order.
- full: (B, N, H, D) -> (B, H, N, D), a view.
- cross: q as full; k, v (B, H, L, D) views of kv with the padding zeroed; keys >= kv_lens[b] are
  hidden by a boolean mask of shape (B, 1, 1, L) (True = attend). kv_lens >= 1, so no row is fully
  masked (no NaN).

SDPA accumulates the softmax in fp32 for fp16/bf16 inputs and returns the input dtype.

Sub-backends ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math") are pinned with
``torch.nn.attention.sdpa_kernel``; SDPA then raises instead of silently falling back. On CPU,
torch (checked on 2.13) has a fused "flash" kernel and the math path; "efficient" and "cudnn" are
CUDA-only. The CUDA flash kernel takes no attn_mask, so "sdpa:flash" cannot do cross-attention on
CUDA (the CPU flash kernel can, and does).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import qk_norm_rope
from .qk_norm_rope import QKNorm
from .validate import BackendUnavailable

SUB_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, device_index: int | None, sub: str) -> str | None:
    """Run one tiny pinned SDPA call (forward + backward) on the device; None if it ran, else why not.

    Probing is the honest test: which fused kernels exist depends on the torch build, the GPU
    generation and the dtype, and SDPA knows the rules better than a copy of them here would.
    """
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    # fused GPU kernels want fp16/bf16; CPU kernels take fp32
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    # the answer is cached, so the caller's grad mode (no_grad, inference_mode) must not affect it
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("always")  # SDPA explains a refused kernel in warnings
        try:
            x = torch.randn(1, 2, 128, 64, device=device, dtype=dtype, requires_grad=True)
            with sdpa_kernel(SUB_BACKENDS[sub]):
                F.scaled_dot_product_attention(x, x, x).sum().backward()
        except Exception as e:  # e.g. RuntimeError (no kernel) or AssertionError (torch built without CUDA)
            why = [str(w.message).splitlines()[0] for w in caught] + [str(e).splitlines()[0]]
            return f"torch {torch.__version__} has no {sub!r} SDPA kernel for {device}: " + "; ".join(why)
    return None


def availability(device: torch.device, sub: str | None = None) -> str | None:
    """None if SDPA (pinned to ``sub`` if given) runs on ``device``, else why not and what to do."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device is usable (torch {torch.__version__}, built with CUDA {torch.version.cuda})"
    if sub is None:
        return None  # SDPA's math path runs wherever torch does
    if sub in ("efficient", "cudnn") and device.type != "cuda":
        return (
            f"SDPA's {sub!r} kernel needs a CUDA device (PyTorch has no {device.type} kernel for it); "
            "use 'sdpa' or 'sdpa:math'"
        )
    if sub == "cudnn" and device.type == "cuda" and not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN; install a CUDA torch wheel with cuDNN"
    return _probe(device.type, device.index, sub)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sub: str | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q (Z, H, Lq, D), k/v (Z, H, Lk, D), mask broadcastable to (Z, H, Lq, Lk) -> (Z, H, Lq, D)."""
    # every fused SDPA kernel needs a unit stride along D; without one SDPA silently takes the math
    # path (or, pinned, refuses), so pay one copy for such (rare) inputs
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if sub is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if sub == "flash" and mask is not None and q.device.type == "cuda":
        raise BackendUnavailable(
            "backend 'sdpa:flash' cannot run cross-attention on CUDA: SDPA's CUDA flash kernel takes no "
            "attn_mask (needed to hide keys >= kv_lens); use 'sdpa', 'sdpa:efficient' or 'flash_attn'"
        )
    try:
        with sdpa_kernel(SUB_BACKENDS[sub]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):
            raise
        raise BackendUnavailable(
            f"backend 'sdpa:{sub}' cannot run these inputs (dtype {q.dtype}, head dim {q.shape[-1]}, "
            f"device {q.device}); SDPA's warnings above say which constraint failed. Original error: {e}"
        ) from e


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float, sub: str | None = None,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D); kind: spatial | temporal | full.

    With ``qk_norm`` / ``rope``, q and k are normalised and rotated in PyTorch first (qk_norm_rope.apply).
    """
    if qk_norm is not None or rope is not None:
        qkv = qk_norm_rope.apply(qkv, kind, num_frames, qk_norm, rope)
    B, N, _, H, D = qkv.shape
    T = num_frames
    S = N // T
    q, k, v = qkv.unbind(2)  # each (B, T*S, H, D), views
    if kind == "spatial":
        # (B, T, S, H, D) -> (B*T, S, H, D) -> (B*T, H, S, D)
        q, k, v = (x.reshape(B * T, S, H, D).transpose(1, 2) for x in (q, k, v))
        o = _sdpa(q, k, v, scale, sub)  # (B*T, H, S, D)
        return o.transpose(1, 2).reshape(B, N, H, D)
    if kind == "temporal":
        # (B, T, S, H, D) -> (B, S, H, T, D) view -> (B*S, H, T, D): the one unavoidable copy
        q, k, v = (x.unflatten(1, (T, S)).permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D) for x in (q, k, v))
        o = _sdpa(q, k, v, scale, sub)  # (B*S, H, T, D)
        return o.view(B, S, H, T, D).permute(0, 3, 1, 2, 4).reshape(B, N, H, D)
    if kind == "full":
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, sub)  # (B, H, N, D)
        return o.transpose(1, 2)
    raise ValueError(f"kind: expected 'spatial', 'temporal' or 'full', got {kind!r}")


def cross_attention(
    q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float, sub: str | None = None
) -> torch.Tensor:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    B, N, H, D = q.shape
    L = kv.shape[1]
    valid = torch.arange(L, device=q.device) < kv_lens.to(q.device, torch.long)[:, None]  # (B, L)
    # Zero the padding (a copy of the small kv, L ~ 120): a masked score is -inf, but a NaN/inf in a
    # padded key or value would still leak through (NaN + -inf, 0 * NaN), and padding is often garbage.
    kv = kv.masked_fill(~valid[:, :, None, None, None], 0)
    k, v = (x.transpose(1, 2) for x in kv.unbind(2))  # (B, H, L, D) views
    o = _sdpa(q.transpose(1, 2), k, v, scale, sub, mask=valid[:, None, None, :])  # (B, H, N, D)
    return o.transpose(1, 2)
