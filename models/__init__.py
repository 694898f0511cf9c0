"""stdit.models: STDiT (Open-Sora 1.0), full-attention DiT and Latte on stdit.kernels."""

from .stdit import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset
from .dit import DIT_PRESETS, DiT, dit_from_preset
from .latte import LATTE_PRESETS, Latte, latte_from_preset

from .sizes import SIZES, ModelSize, preset_names, split_preset

FAMILY_CLASSES: dict[str, type] = {"STDiT": STDiT, "DiT": DiT, "Latte": Latte}
MODEL_PRESETS: dict[str, tuple[type, dict]] = {
    name: (FAMILY_CLASSES[split_preset(name)[0]], split_preset(name)[1].kwargs()) for name in preset_names()
}


def from_preset(name: str, **overrides):
    """Any model preset by name ("STDiT-XL/2", "DiT-tiny", "Latte-mini", ...); overrides win."""
    family, size = split_preset(name)
    return FAMILY_CLASSES[family](**{**size.kwargs(), **overrides})


__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters", "MODEL_PRESETS", "from_preset"]
__all__ += ["ModelSize", "SIZES", "split_preset", "preset_names"]
__all__ += ["DiT", "DIT_PRESETS", "dit_from_preset", "Latte", "LATTE_PRESETS", "latte_from_preset"]
