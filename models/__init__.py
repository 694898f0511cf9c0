"""stdit.models: STDiT (Open-Sora 1.0), STDiT3 (Open-Sora 1.2), full-attention DiT and Latte on stdit.kernels."""

from .stdit import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset
from .dit import DIT_PRESETS, DiT, dit_from_preset
from .latte import LATTE_PRESETS, Latte, latte_from_preset
from .stdit3 import STDIT3_PRESETS, STDiT3, stdit3_from_preset

from .sizes import SIZES, STDIT3_SIZES, ModelSize, constructor_kwargs, preset_names, split_preset

FAMILY_CLASSES: dict[str, type] = {"STDiT": STDiT, "DiT": DiT, "Latte": Latte, "STDiT3": STDiT3}
MODEL_PRESETS: dict[str, tuple[type, dict]] = {
    name: (FAMILY_CLASSES[split_preset(name)[0]], constructor_kwargs(*split_preset(name))) for name in preset_names()
}


def from_preset(name: str, **overrides):
    """Any model preset by name ("STDiT-XL/2", "STDiT3-XL/2", "DiT-tiny", "Latte-mini", ...); overrides win."""
    family, size = split_preset(name)
    return FAMILY_CLASSES[family](**{**constructor_kwargs(family, size), **overrides})


__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters", "MODEL_PRESETS", "from_preset"]
__all__ += ["ModelSize", "SIZES", "split_preset", "preset_names"]
__all__ += ["DiT", "DIT_PRESETS", "dit_from_preset", "Latte", "LATTE_PRESETS", "latte_from_preset"]
__all__ += ["STDiT3", "STDIT3_PRESETS", "stdit3_from_preset", "STDIT3_SIZES", "constructor_kwargs"]
