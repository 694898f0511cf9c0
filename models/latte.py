"""Latte (variant 1): alternating spatial and temporal PixArt-alpha blocks, on stdit.kernels.

Block i attends within each frame when i is even and across frames (at each spatial position)
when i is odd; every block is a full PixArt-alpha block (its own norms, scale_shift_table,
cross-attention to the text, MLP). Everything else (embedders, adaLN-single t_block, positions
added to the input tokens once, final layer, forward signature, switches) is stdit.models.dit.DiT's.

Unlike STDiT, a temporal block here has its own LayerNorm + modulate and gates, and spatial and
temporal attention live in different blocks; depth counts both kinds ("Latte-XL/2": 14 + 14).
"""

from __future__ import annotations

from .dit import DiT
from .sizes import SIZES, split_preset

__all__ = ["Latte", "LATTE_PRESETS", "latte_from_preset"]


class Latte(DiT):
    """Latte variant 1; arguments as DiT's (depth is the total number of blocks, both kinds)."""

    family = "Latte"  # its name in presets ("Latte-tiny") and, lower-cased, in the cost model

    @staticmethod
    def block_kinds(depth: int) -> list[str]:
        """Even blocks spatial, odd blocks temporal."""
        return ["spatial" if i % 2 == 0 else "temporal" for i in range(depth)]


# The sizes of stdit.models.sizes under Latte names (a 1-block size gets 2, so it has a temporal block).
LATTE_PRESETS: dict[str, dict] = {f"Latte-{name}": split_preset(f"Latte-{name}")[1].kwargs() for name in SIZES}


def latte_from_preset(name: str, **overrides) -> Latte:
    """Build a preset by name (see LATTE_PRESETS); keyword overrides win over the preset."""
    if name not in LATTE_PRESETS:
        raise ValueError(f"name: unknown Latte preset {name!r}; expected one of {sorted(LATTE_PRESETS)}")
    return Latte(**{**LATTE_PRESETS[name], **overrides})
