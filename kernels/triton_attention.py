"""The "triton" backend: our kernels (self-attention in triton_self_attention.py, cross-attention in
triton_cross_attention.py) behind the backend-module contract of backends.py."""

from __future__ import annotations

import torch

from .triton_common import triton_availability
from .triton_self_attention import self_attention  # noqa: F401


def availability(device: torch.device) -> str | None:
    return triton_availability(device)


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    from .triton_cross_attention import cross_attention as _cross

    return _cross(q, kv, kv_lens, scale)
