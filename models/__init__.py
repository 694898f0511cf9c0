"""stdit.models: STDiT (Open-Sora 1.0), full-attention DiT and Latte on stdit.kernels (issue: models)."""

from .stdit import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset

__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters"]
