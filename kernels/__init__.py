"""stdit.kernels: attention for STDiT (spatial, temporal, full, cross) behind one API with backends.

See :mod:`stdit.kernels.api` for the layout contract and :mod:`stdit.kernels.backends` for the
backends. Optional packages (flash-attn, xformers) are imported lazily, never here.
"""

from .api import cross_attention, full_attention, spatial_attention, temporal_attention
from .backends import BACKENDS, BackendUnavailable, auto_backend, availability
from .fused_ops import gated_residual, layernorm_modulate

__all__ = [
    "spatial_attention",
    "temporal_attention",
    "full_attention",
    "cross_attention",
    "BACKENDS",
    "BackendUnavailable",
    "auto_backend",
    "availability",
    "layernorm_modulate",
    "gated_residual",
]

from . import backends as _backends

_backends._preload()
