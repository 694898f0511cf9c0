"""The layers every video DiT here shares: fixed sin-cos tables, the patch / timestep / caption
embedders, the MLP, stochastic depth and the final layer, with Open-Sora 1.0's parameter names;
and what Open-Sora 1.2's STDiT3 adds: the per-input 2D position embedding, the rotary frequency
table, the q/k RMSNorm gains, the fps embedder and the final layer with per-frame conditioning.

Dimension alphabet: B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CaptionEmbedder", "DropPath", "FinalLayer", "Mlp", "PatchEmbed3D", "TimestepEmbedder", "modulate", "sincos_1d",
    "spatial_pos_embed", "temporal_pos_embed", "timestep_sinusoid", "RMSNorm", "RotaryEmbedding", "SizeEmbedder",
    "T2IFinalLayer", "frame_select", "resolution_pos_embed",
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


# ------------------------------------------------------------------------------------------------
# Open-Sora 1.2 (STDiT3) additions
# ------------------------------------------------------------------------------------------------


def resolution_pos_embed(
    dim: int, grid_h: int, grid_w: int, scale: torch.Tensor, base_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Open-Sora 1.2's 2D sin-cos table for one input size -> (1, grid_h*grid_w, dim) float32.

    Token h*grid_w + w. Laid out [sin(c*f) | cos(c*f) | sin(r*f) | cos(r*f)], each dim/4 wide, with
    f_k = 10000^(-2k/(dim/2)); the column comes first: c = w/scale * (base_size/grid_w) and
    r = h/scale * (base_size/grid_h). ``scale`` is a 0-d float32 tensor (sqrt(height*width)/512 of
    the video in pixels), so no value is read back to the host. Built in float32 with the reference's
    order of operations (its table differs from a float64 build by ~1e-6).
    """
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4 for the 2D sin-cos table, got {dim}")
    device = scale.device if device is None else device
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))  # (dim/4,)

    def axis(n: int) -> torch.Tensor:  # (n,) positions, float32 as the reference rounds them
        return torch.arange(n, device=device, dtype=torch.float32) / scale * (base_size / n)

    def sincos(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2)
        angles = pos[:, None] * inv_freq[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    cols = axis(grid_w)[None, :].expand(grid_h, grid_w).reshape(-1)  # (S,) column of token h*W' + w
    rows = axis(grid_h)[:, None].expand(grid_h, grid_w).reshape(-1)  # (S,) its row
    return torch.cat([sincos(cols), sincos(rows)], dim=-1)[None]


class RMSNorm(nn.Module):
    """Per-head RMS normalisation with a learned gain (LlamaRMSNorm's names: ``weight``, eps in
    ``variance_epsilon``): weight * (x / sqrt(mean(x^2) + eps)), the statistics in float32.

    STDiT3's attention passes its gains to stdit.kernels (``QKNorm``), which applies this inside the
    attention; ``forward`` is the plain-PyTorch definition, x (..., D) -> (..., D).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class RotaryEmbedding(nn.Module):
    """The rotary frequency table theta_i = 10000^(-2i/D), i < D/2, float32, as rotary-embedding-torch
    (which Open-Sora 1.2 uses) stores it: a parameter named ``freqs`` with requires_grad=False, so it
    is in the state dict. The rotation (interleaved pairs, positions 0..T-1) happens in stdit.kernels'
    temporal attention, which takes this table as ``rope=``.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: rotary embedding needs an even head dim, got {dim}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # (D/2,)
        self.freqs = nn.Parameter(freqs, requires_grad=False)


class SizeEmbedder(TimestepEmbedder):
    """A scalar per sample (Open-Sora 1.2: the fps) -> the timestep sinusoid -> Linear -> SiLU -> Linear
    -> (B, C). Keys mlp.0 / mlp.2.

    Open-Sora's SizeEmbedder calls TimestepEmbedder's constructor and then builds its MLP a second
    time; so does this one, so a seeded construction draws the reference's random numbers.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__(hidden_size, frequency_embedding_size)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:  # type: ignore[override]
        """s (B',) with B' dividing ``batch`` (tiled, e.g. for a CFG-doubled batch) -> (batch, C)."""
        s = s.reshape(-1)
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0])
        freq = timestep_sinusoid(s, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def frame_select(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per frame, x where x_mask is True, else x_zero: x_mask (B, T) bool, x / x_zero (B, T*S, C)."""
    B, N, C = x.shape
    keep = x_mask[:, :, None, None]  # (B, T, 1, 1)
    out = torch.where(keep, x.view(B, num_frames, -1, C), x_zero.view(B, num_frames, -1, C))
    return out.view(B, N, C)


class T2IFinalLayer(FinalLayer):
    """Open-Sora 1.2's final layer: FinalLayer plus per-frame conditioning.

    Frames with x_mask False take shift and scale from t0 (the embedding of timestep 0). The
    reference then normalises the *already modulated* x a second time for those frames
    (``double_norm=True``, its behaviour, needed to reproduce its outputs); ``double_norm=False``
    normalises the block output once, which makes an all-False x_mask equal to timestep 0.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None, t0: torch.Tensor | None = None,
        num_frames: int | None = None, double_norm: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """x (B, T*S, C), t / t0 (B, C), x_mask (B, T) bool or None -> (B, T*S, prod(patch) * C_out)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        out = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            out0 = modulate(self.norm_final(out if double_norm else x), shift0, scale0)
            out = frame_select(x_mask, out, out0, num_frames)
        return self.linear(out)
