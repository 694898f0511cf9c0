"""The public attention API of stdit: four functions, one contract, and the one resolver of backends.

Layouts (Open-Sora 1.0's ``B (T S) C`` token order, token index t*S + s):

- ``qkv``: the qkv projection output viewed as (B, T*S, 3, H, D). Any strides (e.g.
  ``linear(x).view(B, N, 3, H, D)``).
- ``out``: (B, T*S, H, D) in the same token order, so ``out.flatten(2)`` feeds the output projection.
- cross: ``q`` (B, N, H, D), ``kv`` (B, L, 2, H, D) padded to L text tokens, ``kv_lens`` (B,) integer
  with 1 <= len <= L; keys at positions >= len never influence the output.

``scale`` defaults to D**-0.5. The output has the input's dtype; the softmax accumulates in fp32.
Every function is differentiable with respect to every floating input.

Open-Sora 1.2 (STDiT3) additions of the self-attention functions, applied to q and k before the
attention, in this order (qk_norm_rope.py has the exact operations and dtypes):

- ``qk_norm``: :class:`QKNorm` (q_weight (D,), k_weight (D,), eps): per-head RMSNorm of q and k with
  learned gains (differentiable, on every backend);
- ``rope``: theta (D/2,) inverse frequencies: interleaved rotary embedding of pair i by the angle
  p * theta_i, p the token's position within its attended sequence (frame index t for temporal
  attention, s for spatial, n for full). A constant, e.g. the model's frozen ``rope.freqs``: the one
  floating input no gradient flows to.

The triton backend fuses both into its kernels; the other backends apply them in PyTorch first.

``backend``: "auto" (best for the input's device), "triton" (ours), "sdpa" / "sdpa:<flash|efficient|
cudnn|math>", "flex", "flash_attn", "xformers", "reference" (Open-Sora 1.0's exact eager math). Each
is a module with ``self_attention(qkv, kind, num_frames, scale, qk_norm=None, rope=None)`` (kind
"spatial", "temporal" or "full"; called without the last two when both are None) and ``cross_attention(q, kv, kv_lens, scale)`` on validated input, plus the sdpa sub-backend
as ``sub``. Whether a backend can run is decided here, by :func:`availability`, and nowhere else: a
named backend that cannot run raises :class:`BackendUnavailable` saying why; nothing falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import (
    flash_attn_adapter,
    flex_attention,
    reference,
    sdpa_attention,
    triton_common,
    triton_cross_attention,
    triton_self_attention,
    validate,
    xformers_adapter,
)
from .qk_norm_rope import QKNorm
from .validate import BackendUnavailable

# ----------------------------------------------------------------------------------------------------
# The backends and the resolver
# ----------------------------------------------------------------------------------------------------


def _no_reason(device: torch.device) -> str | None:
    """Nothing stops or limits a backend written in plain PyTorch on any device."""
    return None


@dataclass(frozen=True)
class _Backend:
    """A backend's two entry points, its availability check (None: runs on the device, else why not
    and how to get it), and what it cannot do where it is available (None: nothing to say)."""

    self_attention: Callable[..., torch.Tensor]
    cross_attention: Callable[..., torch.Tensor]
    availability: Callable[[torch.device], str | None]
    limitations: Callable[[torch.device], str | None] = _no_reason


_BACKENDS: dict[str, _Backend] = {
    "triton": _Backend(
        triton_self_attention.self_attention, triton_cross_attention.cross_attention, triton_common.availability
    ),
    "sdpa": _Backend(sdpa_attention.self_attention, sdpa_attention.cross_attention, sdpa_attention.availability),
    "flex": _Backend(
        flex_attention.self_attention, flex_attention.cross_attention, flex_attention.availability,
        flex_attention.limitations,
    ),  # fmt: skip
    "flash_attn": _Backend(
        flash_attn_adapter.self_attention, flash_attn_adapter.cross_attention, flash_attn_adapter.availability
    ),
    "xformers": _Backend(
        xformers_adapter.self_attention, xformers_adapter.cross_attention, xformers_adapter.availability
    ),
    "reference": _Backend(reference.self_attention, reference.cross_attention, _no_reason),
}
BACKENDS: tuple[str, ...] = tuple(_BACKENDS)


def split_name(backend: str) -> tuple[str, str | None]:
    """'sdpa:flash' -> ('sdpa', 'flash'); 'triton' -> ('triton', None); a bad name is a ValueError."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
    base, _, sub = backend.partition(":")
    if base != "auto" and base not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
    if sub and base != "sdpa":
        raise ValueError(f"backend: only 'sdpa' takes a sub-backend (e.g. 'sdpa:flash'), got {backend!r}")
    if sub and sub not in sdpa_attention.SUB_BACKENDS:
        raise ValueError(
            f"backend: unknown SDPA sub-backend {backend!r}; expected one of {tuple(sdpa_attention.SUB_BACKENDS)}"
        )
    return base, (sub or None)


def availability(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason and how to get it."""
    base, sub = split_name(name)
    if base == "auto":
        return None
    if sub is not None:
        return sdpa_attention.availability(torch.device(device), sub)
    return _BACKENDS[base].availability(torch.device(device))


def limitations(name: str, device: torch.device | str) -> str | None:
    """What backend ``name`` cannot do on ``device`` where it is available (e.g. flex on CPU runs
    forward only), or None."""
    base, _ = split_name(name)
    return None if base == "auto" else _BACKENDS[base].limitations(torch.device(device))


def require(backend: str, device: torch.device) -> None:
    """Raise :class:`BackendUnavailable` unless ``backend`` can run on ``device``.

    Skipped while torch.compile traces: the check is host-side work (package look-ups, probes) and
    the same call has already run eagerly, or fails inside the backend with its own error.
    """
    if torch.compiler.is_compiling():
        return
    reason = availability(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reason}")


def auto_backend(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """The backend "auto" picks for an input on ``device`` (with ``dtype`` and ``head_dim`` if known).

    CUDA: our Triton kernels, for the dtypes and head dims they take (16-bit and fp32, D <= 128),
    else SDPA. CPU: SDPA (Triton runs on CPU only through its interpreter, a correctness tool).
    """
    if device.type != "cuda" or not triton_common.triton_takes(dtype, head_dim):
        return "sdpa"
    if torch.compiler.is_compiling() or availability("triton", device) is None:
        return "triton"
    return "sdpa"


def _resolve(backend: str, x: torch.Tensor) -> tuple[_Backend, str | None]:
    """The backend that runs input ``x`` (a q or qkv), and its sdpa sub-backend; or raise why it cannot."""
    base, sub = split_name(backend)
    if base == "auto":
        base = backend = auto_backend(x.device, x.dtype, x.shape[-1])
    require(backend, x.device)
    return _BACKENDS[base], sub


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, backend: str, scale: float | None,
    qk_norm: QKNorm | None, rope: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    num_frames, scale = validate.check_self(qkv, num_frames, scale)
    qk_norm, rope = validate.check_qk_norm_rope(qkv, qk_norm, rope)
    impl, sub = _resolve(backend, qkv)
    extra = {} if qk_norm is None and rope is None else dict(qk_norm=qk_norm, rope=rope)  # old calls unchanged
    if sub is not None:
        return impl.self_attention(qkv, kind, num_frames, scale, sub=sub, **extra)
    return impl.self_attention(qkv, kind, num_frames, scale, **extra)


def spatial_attention(
    qkv: torch.Tensor, num_frames: int, *, backend: str = "auto", scale: float | None = None,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Self-attention among the S tokens of each frame.

    qkv (B, T*S, 3, H, D) with T = num_frames -> out (B, T*S, H, D); token t*S + s attends to
    tokens t*S + s' for all s'. ``qk_norm`` / ``rope``: see the module docstring (RoPE positions are
    s, the index within the frame).
    """
    return _self_attention(qkv, "spatial", num_frames, backend, scale, qk_norm, rope)


def temporal_attention(
    qkv: torch.Tensor, num_frames: int, *, backend: str = "auto", scale: float | None = None,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Self-attention among the T tokens at each spatial position.

    qkv (B, T*S, 3, H, D) with T = num_frames -> out (B, T*S, H, D); token t*S + s attends to
    tokens t'*S + s for all t'. No (B S) T C rearrange is needed by the caller. ``qk_norm`` /
    ``rope``: see the module docstring (RoPE positions are t, the frame index).
    """
    return _self_attention(qkv, "temporal", num_frames, backend, scale, qk_norm, rope)


def full_attention(
    qkv: torch.Tensor, *, backend: str = "auto", scale: float | None = None,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Self-attention among all N = T*S tokens: qkv (B, N, 3, H, D) -> out (B, N, H, D).
    ``qk_norm`` / ``rope``: see the module docstring (RoPE positions are n = 0..N-1)."""
    return _self_attention(qkv, "full", 1, backend, scale, qk_norm, rope)


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
    kv_lens, scale = validate.check_cross(q, kv, kv_lens, scale, check_lens)
    impl, sub = _resolve(backend, q)
    if sub is not None:
        return impl.cross_attention(q, kv, kv_lens, scale, sub=sub)
    return impl.cross_attention(q, kv, kv_lens, scale)
