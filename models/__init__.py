"""stdit.models: STDiT (Open-Sora 1.0), full-attention DiT and Latte on stdit.kernels (issue: models)."""

from .stdit import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset
from .dit import DIT_PRESETS, DiT, dit_from_preset
from .latte import LATTE_PRESETS, Latte, latte_from_preset

MODEL_PRESETS: dict[str, tuple[type, dict]] = {
    **{name: (STDiT, cfg) for name, cfg in STDIT_PRESETS.items()},
    **{name: (DiT, cfg) for name, cfg in DIT_PRESETS.items()},
    **{name: (Latte, cfg) for name, cfg in LATTE_PRESETS.items()},
}


def from_preset(name: str, **overrides):
    """Any model preset by name ("STDiT-XL/2", "DiT-tiny", "Latte-mini", ...); overrides win."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"name: unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    cls, cfg = MODEL_PRESETS[name]
    return cls(**{**cfg, **overrides})


__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters", "MODEL_PRESETS", "from_preset"]
__all__ += ["DiT", "DIT_PRESETS", "dit_from_preset", "Latte", "LATTE_PRESETS", "latte_from_preset"]
