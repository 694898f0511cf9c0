"""Fused elementwise ops of the STDiT block (adaLN-single modulation), with backends.

    layernorm_modulate(x, shift, scale) = LayerNorm(x, no affine) * (1 + scale) + shift
    gated_residual(x, gate, y)          = x + gate * y

x, y: (B, N, C); shift, scale, gate: one row per sample, (B, 1, C) or (B, C), broadcast over the N
tokens. Outputs have x's dtype; LayerNorm statistics are fp32 (or float64 for float64 inputs).
Every function is differentiable with respect to every tensor input.

Why these two and not the GELU-tanh after the MLP's first linear (bytes per token, C channels,
2-byte activations): LayerNorm + modulate moves 12C bytes eager (3 reads + 3 writes) and 4C fused,
twice per block; the gated residual 10C eager and 6C fused, three times per block. GELU-tanh is
already one elementwise pass (read 4C, write 4C) in eager PyTorch and torch.compile; it disappears
only inside fc1's GEMM epilogue, a matmul kernel's job, which is why the block suite of the
benchmark measures torch.compile's version of the whole block.

``backend``: "triton" (our kernels, :mod:`stdit.kernels.triton_modulate`), "reference" (the readable
eager PyTorch below, which tests and benchmarks compare against), "auto": the reference, which
torch.compile fuses, until the benchmark shows ours beating that fusion on a GPU. A named backend
that cannot run raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import triton_modulate
from .api import require

FUSED_BACKENDS = ("auto", "triton", "reference")


# ----------------------------------------------------------------------------------------------------
# Reference: readable eager PyTorch
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for 16-bit inputs, float64 stays float64


def _rows(m: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, 1, C), broadcasting over tokens; (B, 1, C) unchanged."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def reference_layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ct = _compute_dtype(x.dtype)
    h = F.layer_norm(x.to(ct), (x.shape[-1],), eps=eps)
    return (h * (1 + _rows(scale).to(ct)) + _rows(shift).to(ct)).to(x.dtype)


def reference_gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ct = _compute_dtype(x.dtype)
    return (x.to(ct) + _rows(gate).to(ct) * y.to(ct)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------------


def _check_x(name: str, x) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected shape (B, N, C), got {tuple(x.shape)} ({x.dim()} dims)")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    return tuple(x.shape)


def _check_like(name: str, t, x: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match x's {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    B, N, C = x.shape
    if what == "per_sample":
        if tuple(t.shape) not in ((B, 1, C), (B, C)):
            raise ValueError(f"{name}: expected shape (B, 1, C) = {(B, 1, C)} or (B, C) = {(B, C)}, got {tuple(t.shape)}")
    elif tuple(t.shape) != (B, N, C):
        raise ValueError(f"{name}: expected the shape of x {(B, N, C)}, got {tuple(t.shape)}")


def _backend(backend, x: torch.Tensor) -> str:
    """'triton' or 'reference' for this input, or raise why the named backend cannot run."""
    if not isinstance(backend, str) or backend not in FUSED_BACKENDS:
        raise ValueError(f"backend: expected one of {FUSED_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "reference"  # ours only where the benchmark shows it beating torch.compile's own fusion
    if backend == "triton":
        triton_modulate.check_input(x)
        require("triton", x.device)
    return backend


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """LayerNorm over C without affine, then adaLN modulation: LN(x) * (1 + scale) + shift.

    x (B, N, C); shift, scale (B, 1, C) or (B, C), same dtype and device as x -> (B, N, C) in x's dtype.
    """
    _check_x("x", x)
    _check_like("shift", shift, x, "per_sample")
    _check_like("scale", scale, x, "per_sample")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    if _backend(backend, x) == "triton":
        return triton_modulate.layernorm_modulate(x, shift, scale, float(eps))
    return reference_layernorm_modulate(x, shift, scale, float(eps))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The gated residual of a DiT block: x + gate * y.

    x, y (B, N, C); gate (B, 1, C) or (B, C); all the same dtype and device -> (B, N, C) in x's dtype.
    """
    _check_x("x", x)
    _check_like("gate", gate, x, "per_sample")
    _check_like("y", y, x, "tokens")
    if _backend(backend, x) == "triton":
        return triton_modulate.gated_residual(x, gate, y)
    return reference_gated_residual(x, gate, y)
