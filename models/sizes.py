"""Model sizes as data: one dataclass and the named presets every part of stdit reads.

The models build from a :class:`ModelSize`, the cost model counts FLOPs and bytes from one, the
benchmark suites and the trainer pick one by name. A preset name is ``"<family>-<size>"`` with
family STDiT, DiT or Latte and size one of :data:`SIZES` ("STDiT-XL/2", "DiT-tiny", "Latte-mini").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["FAMILIES", "ModelSize", "SIZES", "preset_names", "split_preset"]

FAMILIES = ("STDiT", "DiT", "Latte")


@dataclass(frozen=True)
class ModelSize:
    """The sizes of a video DiT, in Open-Sora 1.0's constructor keywords."""

    depth: int
    """Number of blocks (Latte counts its spatial and temporal blocks together)."""
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
    """Latent (T, H, W) the fixed position tables are built for (other sizes rebuild them)."""
    space_scale: float = 1.0
    """Divisor of the spatial positions in the sin-cos table."""
    time_scale: float = 1.0
    """Divisor of the frame positions in the sin-cos table."""

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


def preset_names() -> list[str]:
    """Every "<family>-<size>" name."""
    return [f"{family}-{size}" for family in FAMILIES for size in SIZES]


def split_preset(name: str) -> tuple[str, ModelSize]:
    """"Latte-mini" -> ("Latte", its ModelSize). Latte gets at least 2 blocks, so it has a temporal one."""
    family, _, size = str(name).partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"name: unknown model preset {name!r}; expected one of {preset_names()}")
    sizes = SIZES[size]
    if family == "Latte" and sizes.depth < 2:
        sizes = sizes.replace(depth=2)
    return family, sizes
