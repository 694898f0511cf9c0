"""stdit.models: STDiT (Open-Sora 1.0), full-attention DiT and Latte on stdit.kernels (issue: models)."""

from .stdit import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset
from .dit import DIT_PRESETS, DiT, dit_from_preset
from .latte import LATTE_PRESETS, Latte, latte_from_preset

__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters"]
__all__ += ["DiT", "DIT_PRESETS", "dit_from_preset", "Latte", "LATTE_PRESETS", "latte_from_preset"]
