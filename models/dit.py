"""Full-attention DiT: the baseline of Open-Sora 1.0's benchmark ("DiT with T5 conditioning like PixArt").

Same embedders, conditioning, widths and presets as STDiT (everything below the blocks is imported
from stdit.models.stdit); the difference is the block: one PixArt-alpha block per layer whose
self-attention spans all N = T*S tokens of a clip, instead of STDiT's spatial + temporal pair.

    x += gate_msa * FullAttn(modulate(LN(x), shift_msa, scale_msa))
    x += CrossAttn(x, text)                                   (no norm, no gate)
    x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

Positions: the fixed spatial sin-cos table and the fixed temporal table are both added to the
patch tokens once, before block 0 (full attention has no separate temporal input to add them to).

The block takes the self-attention kind ("full", "spatial" or "temporal") as an argument, so Latte
(stdit.models.latte) reuses it and this model class with a different block layout.

Reads top-down: block, model, presets. Dimension alphabet: B batch, T frames,
S tokens per frame, N = T*S tokens, L text tokens, H heads, D head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .sizes import SIZES
from .base import VideoDiTBase
from .layers import DropPath, FinalLayer, Mlp
from .stdit import CrossAttention, SelfAttention, STDiTBlock

__all__ = ["DiT", "DIT_PRESETS", "dit_from_preset", "PixArtBlock"]


# ------------------------------------------------------------------------------------------------
# PixArt-alpha block
# ------------------------------------------------------------------------------------------------


class PixArtBlock(nn.Module):
    """One PixArt-alpha block (adaLN-single) with self-attention of the given kind:

    x += gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x += CrossAttn(x, text)                                   (no norm, no gate)
    x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    Parameter names are STDiTBlock's without attn_temp.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, kind: str = "full"
    ):
        super().__init__()
        self.kind = kind
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, kind)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t0: torch.Tensor,
        y_lens: torch.Tensor,
        num_frames: int,
        backend: str,
        fused: str | None = None,
    ) -> torch.Tensor:
        """x (B, T*S, C), y (B, L, C), t0 (B, 6C), y_lens (B,) -> (B, T*S, C).

        ``fused`` as in STDiTBlock: None for plain torch LayerNorm+modulate and gated residuals,
        a backend name for stdit.kernels.layernorm_modulate / gated_residual.
        """
        B, N, C = x.shape
        mods = self.scale_shift_table[None] + t0.reshape(B, 6, C)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (B, 1, C) each

        x_a = self.attn(self._norm_modulate(self.norm1, x, shift_msa, scale_msa, fused), num_frames, backend)
        x = self._gated_residual(x, gate_msa, x_a, fused)

        x = x + self.cross_attn(x, y, y_lens, backend)

        x_m = self.mlp(self._norm_modulate(self.norm2, x, shift_mlp, scale_mlp, fused))
        return self._gated_residual(x, gate_mlp, x_m, fused)

    # The same helpers STDiT's block uses (they only read self.drop_path).
    _norm_modulate = staticmethod(STDiTBlock._norm_modulate)
    _gated_residual = STDiTBlock._gated_residual


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class DiT(VideoDiTBase):
    """Full-attention video DiT with STDiT's embedders, conditioning, sizes and forward signature.

    Args: as STDiT's (input_size, in_channels, patch_size, hidden_size, depth, num_heads,
    mlp_ratio, class_dropout_prob, pred_sigma, drop_path, caption_channels, model_max_length,
    dtype, space_scale, time_scale) and its switches attention_backend, checkpoint, fused_ops,
    with the same meaning. STDiT's config-compatibility flags (enable_flashattn, freeze, ...) are
    not taken: no Open-Sora checkpoint exists for this model.
    """

    family = "DiT"  # its name in presets ("DiT-tiny") and, lower-cased, in the cost model

    def __init__(
        self,
        input_size: tuple[int, int, int] = (1, 32, 32),
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        dtype: torch.dtype | str = torch.float32,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        *,
        attention_backend: str = "auto",
        checkpoint: bool = False,
        fused_ops: str | None = None,
    ):
        super().__init__()
        rates = self._build_trunk(
            input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
            pred_sigma, drop_path, caption_channels, model_max_length, dtype, space_scale, time_scale,
            attention_backend, checkpoint, fused_ops,
        )  # fmt: skip
        kinds = self.block_kinds(depth)
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, mlp_ratio, r, kind) for r, kind in zip(rates, kinds)
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), self.out_channels)
        self.initialize_weights()

    @staticmethod
    def block_kinds(depth: int) -> list[str]:
        """Self-attention kind of each block: all "full" here (Latte overrides this)."""
        return ["full"] * depth

    def _silent_layers(self) -> list[nn.Linear]:
        """Zero-initialized, as in PixArt-alpha: the cross-attention output projections (and the
        final linear, added by initialize_weights)."""
        return [block.cross_attn.proj for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C_in, T, H, W); timestep (B,); y (B, 1, L, caption_channels); mask (B, L) 0/1 or
        None; force_drop_ids (B,) 0/1 -> (B, out_channels, T, H, W) float32. As STDiT.forward."""
        x, t, t0, y, y_lens, grid, tpe = self._embed(x, timestep, y, mask, force_drop_ids)
        B, N, C = x.shape
        T = grid[0]
        x = (x.view(B, T, N // T, C) + tpe[:, :, None]).view(B, N, C)  # temporal table, once, on the input
        for block in self.blocks:
            x = self._run_block(block, x, y, t0, y_lens, T)
        x = self.final_layer(x, t)  # (B, T*S, p_t*p_h*p_w*C_out)
        return self.unpatchify(x, grid).float()


# ------------------------------------------------------------------------------------------------
# Presets: the sizes of stdit.models.sizes under DiT names ("DiT-XL/2", "DiT-tiny", ...)
# ------------------------------------------------------------------------------------------------

DIT_PRESETS: dict[str, dict] = {f"DiT-{name}": size.kwargs() for name, size in SIZES.items()}


def dit_from_preset(name: str, **overrides) -> DiT:
    """Build a preset by name (see DIT_PRESETS); keyword overrides win over the preset."""
    if name not in DIT_PRESETS:
        raise ValueError(f"name: unknown DiT preset {name!r}; expected one of {sorted(DIT_PRESETS)}")
    return DiT(**{**DIT_PRESETS[name], **overrides})
