"""The layers every video DiT here shares: fixed sin-cos tables, the patch / timestep / caption
embedders, the MLP, stochastic depth and the final layer, with Open-Sora 1.0's parameter names.

Dimension alphabet: B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CaptionEmbedder", "DropPath", "FinalLayer", "Mlp", "PatchEmbed3D", "TimestepEmbedder", "modulate", "sincos_1d",
    "spatial_pos_embed", "temporal_pos_embed", "timestep_sinusoid",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Fixed sin-cos tables (built in float64 with torch ops, so they also build on the meta device)
# ------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) float64 -> (M, dim) float64, laid out [sin | cos] with frequencies 10000^(-k/(dim/2))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half)  # (dim/2,)
    angles = pos[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def spatial_pos_embed(dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed 2D sin-cos table over a (grid_h, grid_w) patch grid -> (1, grid_h*grid_w, dim) float32.

    Token h*grid_w + w (the patch embedding's row-major order). Positions are divided by ``scale``
    (Open-Sora's space_scale). The first dim/2 channels encode the column w, the last dim/2 the row h.
    """
    h = torch.arange(grid_h, dtype=torch.float64) / scale
    w = torch.arange(grid_w, dtype=torch.float64) / scale
    hh, ww = torch.meshgrid(h, w, indexing="ij")  # (grid_h, grid_w) each
    table = torch.cat([sincos_1d(dim // 2, ww.reshape(-1)), sincos_1d(dim // 2, hh.reshape(-1))], dim=1)
    return table.float()[None]


def temporal_pos_embed(dim: int, num_frames: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed 1D sin-cos table over frames, positions / ``scale`` -> (1, T, dim) float32."""
    return sincos_1d(dim, torch.arange(num_frames, dtype=torch.float64) / scale).float()[None]


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) -> (B, dim) float32, laid out [cos | sin].

    Built in float32 on purpose, like the reference: frequency k = exp(-ln(max_period) * k / (dim/2)),
    multiplied by the float32 timestep. A float64 build moves the model output by up to ~1e-5.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ------------------------------------------------------------------------------------------------
# Small layers
# ------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x*(1+scale)+shift; x (B, N, C), shift/scale (B, 1, C)."""
    return x * (1 + scale) + shift


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (names match timm's Mlp, which Open-Sora uses)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ------------------------------------------------------------------------------------------------
# Embedders
# ------------------------------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """(B, C_in, T, H, W) -> (B, N, C) by a Conv3d with kernel = stride = patch; token t*S + h*W' + w."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size, p, name in zip(x.shape[2:], self.patch_size, "THW"):
            if size % p:
                raise ValueError(f"x: {name} = {size} is not a multiple of the patch size {p} ({tuple(x.shape)})")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, T', H', W') -> (B, N, C)


class TimestepEmbedder(nn.Module):
    """t (B,) -> 256-d sinusoid -> Linear -> SiLU -> Linear -> (B, C). Keys mlp.0 / mlp.2."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_embedding_size).to(dtype))


class CaptionEmbedder(nn.Module):
    """Caption features (B, 1, L, C_cap) -> (B, 1, L, C), with classifier-free-guidance dropout.

    In training, each sample's caption is replaced by the null embedding ``y_embedding``
    (L, C_cap) with probability ``uncond_prob``; ``force_drop_ids`` (B,) of 0/1 forces it (e.g. for
    the unconditional half of a CFG batch). Eval without force_drop_ids is deterministic.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, y: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.uncond_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.uncond_prob
        else:
            drop = None
        if drop is not None:
            if y.shape[2:] != self.y_embedding.shape:
                raise ValueError(
                    f"y: caption dropout needs y of shape (B, 1, {', '.join(map(str, self.y_embedding.shape))}), "
                    f"got {tuple(y.shape)}"
                )
            y = torch.where(drop[:, None, None, None], self.y_embedding.to(y.dtype), y)
        return self.y_proj(y)


class FinalLayer(nn.Module):
    """LN -> modulate with its own (2, C) table + t -> Linear(C, prod(patch) * C_out)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), t (B, C) -> (B, N, prod(patch) * C_out)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        return self.linear(modulate(self.norm_final(x), shift, scale))
