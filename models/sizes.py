"""Model sizes as data: one dataclass and the named presets every part of stdit reads.

The models build from a :class:`ModelSize`, the cost model counts FLOPs and bytes from one, the
benchmark suites and the trainer pick one by name. A preset name is ``"<family>-<size>"`` with
family STDiT, DiT or Latte and size one of :data:`SIZES` ("STDiT-XL/2", "DiT-tiny", "Latte-mini"),
or family STDiT3 (Open-Sora 1.2) and size one of :data:`STDIT3_SIZES` ("STDiT3-XL/2", "STDiT3-3B/2",
"STDiT3-tiny").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "FAMILIES", "ModelSize", "SIZES", "STDIT3_SIZES", "constructor_kwargs", "family_sizes", "preset_names",
    "split_preset",
]  # fmt: skip

FAMILIES = ("STDiT", "DiT", "Latte", "STDiT3")


@dataclass(frozen=True)
class ModelSize:
    """The sizes of a video DiT, in Open-Sora 1.0's constructor keywords."""

    depth: int
    """Number of blocks (Latte counts its spatial and temporal blocks together; STDiT3 has ``depth``
    spatial and ``depth`` temporal blocks, each a whole DiT block, as Open-Sora 1.2 counts them)."""
    hidden_size: int
    """Channels C of every token."""
    num_heads: int
    """Attention heads H; the head dim D = hidden_size / num_heads."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(p_t, p_h, p_w) latent voxels per token."""
    in_channels: int = 4
    """Latent channels (the VAE's)."""
    caption_channels: int = 4096
    """Width of the text features (T5-XXL: 4096)."""
    model_max_length: int = 120
    """Text tokens L per caption (Open-Sora: 120)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / C."""
    pred_sigma: bool = True
    """Also predict the learned variance (IDDPM), doubling the output channels."""
    input_size: tuple[int, int, int] = (1, 32, 32)
    """Latent (T, H, W) the fixed position tables are built for (other sizes rebuild them); STDiT3
    has no fixed tables and leaves it at the default."""
    space_scale: float = 1.0
    """Divisor of the spatial positions in the sin-cos table (not STDiT3's: it scales by pixel size)."""
    time_scale: float = 1.0
    """Divisor of the frame positions in the sin-cos table (not STDiT3's: RoPE replaces the table)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    def kwargs(self) -> dict:
        """The model constructor's keywords for these sizes."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelSize":
        """A copy with some sizes changed (unknown names raise TypeError naming them)."""
        return dataclasses.replace(self, **changes)


SIZES: dict[str, ModelSize] = {
    # Open-Sora 1.0's only registered size; its 16x256x256 train config adds input_size (16, 32, 32),
    # space_scale 0.5 and time_scale 1.0.
    "XL/2": ModelSize(depth=28, hidden_size=1152, num_heads=16),
    # The golden reference's configuration (tests/data/opensora_v1/stdit_tiny_a.json): head dim 72 as
    # in XL/2, 1,052,240 parameters.
    "tiny": ModelSize(
        depth=2, hidden_size=144, num_heads=2, caption_channels=32, model_max_length=8,
        input_size=(4, 8, 8), space_scale=0.5,
    ),  # fmt: skip
    # The CPU training demo's model (configs/demo): deep and wide enough that minutes of CPU training
    # learn the synthetic shapes' colours and backgrounds; 6.1M parameters.
    "demo": ModelSize(
        depth=6, hidden_size=216, num_heads=3, caption_channels=32, model_max_length=80,
        input_size=(8, 8, 8), space_scale=0.5,
    ),  # fmt: skip
    # The smallest size that runs every path (one block, one head of 72).
    "mini": ModelSize(depth=1, hidden_size=72, num_heads=1, caption_channels=16, model_max_length=4, input_size=(2, 4, 4)),
}


# Open-Sora 1.2's STDiT3 sizes (T5 text: 4096 wide, 300 tokens); every one has head dim 72.
STDIT3_SIZES: dict[str, ModelSize] = {
    # Open-Sora 1.2's registered sizes: 1,207,643,972 parameters at XL/2.
    "XL/2": ModelSize(depth=28, hidden_size=1152, num_heads=16, model_max_length=300),
    "3B/2": ModelSize(depth=28, hidden_size=1872, num_heads=26, model_max_length=300),
    # The golden reference's configuration (tests/data/opensora_v12/stdit3_tiny_a.json): 6,256,868 parameters.
    "tiny": ModelSize(depth=2, hidden_size=288, num_heads=4, caption_channels=48, model_max_length=12),
    # The CPU training demo's model: 3 spatial + 3 temporal blocks at STDiT-demo's width and text.
    "demo": ModelSize(depth=3, hidden_size=216, num_heads=3, caption_channels=32, model_max_length=80),
    # The smallest size that runs every path (one block pair, one head of 72).
    "mini": ModelSize(depth=1, hidden_size=72, num_heads=1, caption_channels=16, model_max_length=4),
}

_FAMILY_SIZES = {"STDiT": SIZES, "DiT": SIZES, "Latte": SIZES, "STDiT3": STDIT3_SIZES}

# The ModelSize fields a family's constructor takes (the others are the v1.0 families' fixed tables).
_STDIT3_FIELDS = (
    "depth", "hidden_size", "num_heads", "patch_size", "in_channels", "caption_channels", "model_max_length",
    "mlp_ratio", "pred_sigma",
)  # fmt: skip


def family_sizes(family: str) -> dict[str, ModelSize]:
    """The named sizes of a family ("STDiT3" -> STDIT3_SIZES; STDiT, DiT, Latte -> SIZES)."""
    if family not in _FAMILY_SIZES:
        raise ValueError(f"family: unknown model family {family!r}; expected one of {FAMILIES}")
    return _FAMILY_SIZES[family]


def constructor_kwargs(family: str, size: ModelSize) -> dict:
    """The constructor keywords of ``family`` for ``size`` (STDiT3 takes no fixed-table fields)."""
    kwargs = size.kwargs()
    if family == "STDiT3":
        return {k: kwargs[k] for k in _STDIT3_FIELDS}
    return kwargs


def preset_names() -> list[str]:
    """Every "<family>-<size>" name."""
    return [f"{family}-{size}" for family in FAMILIES for size in family_sizes(family)]


def split_preset(name: str) -> tuple[str, ModelSize]:
    """"Latte-mini" -> ("Latte", its ModelSize). Latte gets at least 2 blocks, so it has a temporal one."""
    family, _, size = str(name).partition("-")
    if family not in FAMILIES or size not in family_sizes(family):
        raise ValueError(f"name: unknown model preset {name!r}; expected one of {preset_names()}")
    sizes = family_sizes(family)[size]
    if family == "Latte" and sizes.depth < 2:
        sizes = sizes.replace(depth=2)
    return family, sizes
