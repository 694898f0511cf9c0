"""stdit.kernels: attention for STDiT (spatial, temporal, full, cross) behind one API with backends,
and the fused adaLN ops of its block.

See :mod:`stdit.kernels.api` for the layout contract and the backends. Optional packages
(flash-attn, xformers) are imported lazily, never here.
"""

if __name__ != "stdit.kernels":
    # This folder imported as a top-level package ("kernels"): the repository root is on sys.path (Python
    # run from a checkout) and a library probed for a package of that name (transformers looks for Hugging
    # Face's `kernels` hub package). Import nothing: a second copy of the modules would register the
    # stdit:: custom ops again, and every later call of stdit.kernels would run that copy's kernels.
    __all__: list[str] = []
else:
    from .api import (
        BACKENDS,
        BackendUnavailable,
        auto_backend,
        availability,
        cross_attention,
        full_attention,
        spatial_attention,
        temporal_attention,
    )
    from .qk_norm_rope import QKNorm
    from .fused_ops import gated_residual, layernorm_modulate, reference_gated_residual, reference_layernorm_modulate

    __all__ = [
        "spatial_attention",
        "temporal_attention",
        "full_attention",
        "cross_attention",
        "QKNorm",
        "BACKENDS",
        "BackendUnavailable",
        "auto_backend",
        "availability",
        "layernorm_modulate",
        "gated_residual",
        "reference_layernorm_modulate",
        "reference_gated_residual",
    ]
