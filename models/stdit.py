"""STDiT: Open-Sora 1.0's spatial-temporal diffusion transformer, on the stdit.kernels attention API.

Written from the published architecture (Open-Sora 1.0 docs and report), not from its code,
and checked against golden weights/outputs of the reference (tests/models/test_stdit_golden.py):

- same constructor keywords, same parameter and buffer names and shapes, so Open-Sora 1.0
  checkpoints load with ``strict=True``;
- same forward math: an eval forward matches the reference to float32 rounding (~1e-6).

Reads top-down: sin-cos tables, embedders, the block, the final layer, the model, the presets.
Dimension alphabet: B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, H heads,
D head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from stdit.kernels import cross_attention, gated_residual, layernorm_modulate, spatial_attention, temporal_attention
from stdit.kernels.backends import BACKENDS
from stdit.kernels.fused_ops import FUSED_BACKENDS

from .sizes import SIZES

BACKEND_NAMES = ("auto", *BACKENDS)  # plus "sdpa:<flash|efficient|cudnn|math>"

__all__ = ["STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters"]


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


# ------------------------------------------------------------------------------------------------
# Attention modules (projections here, attention itself in stdit.kernels)
# ------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """qkv Linear -> spatial or temporal attention over (B, T*S) tokens -> proj. Keys qkv / proj."""

    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        self.num_heads, self.head_dim, self.kind = num_heads, dim // num_heads, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int, backend: str) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, T*S, 3, H, D)
        attend = spatial_attention if self.kind == "spatial" else temporal_attention
        out = attend(qkv, num_frames, backend=backend)  # (B, T*S, H, D)
        return self.proj(out.flatten(2))


class CrossAttention(nn.Module):
    """Video tokens attend to their sample's valid text tokens. Keys q_linear / kv_linear / proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_lens: torch.Tensor, backend: str) -> torch.Tensor:
        """x (B, N, C), y (B, L, C) with each sample's valid tokens first, y_lens (B,) -> (B, N, C)."""
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim)  # (B, N, H, D)
        kv = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, D)
        out = cross_attention(q, kv, y_lens, backend=backend)  # (B, N, H, D)
        return self.proj(out.flatten(2))


# ------------------------------------------------------------------------------------------------
# STDiT block and final layer
# ------------------------------------------------------------------------------------------------


class STDiTBlock(nn.Module):
    """One STDiT block (adaLN-single):

    x += gate_msa * SpatialAttn(modulate(LN(x), shift_msa, scale_msa))
    x += gate_msa * TemporalAttn(x [+ temporal pos-emb])      (no norm; reuses gate_msa)
    x += CrossAttn(x, text)                                   (no norm, no gate)
    x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        # Registration order = Open-Sora's state-dict order.
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, "spatial")
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.drop_path = DropPath(drop_path)
        self.attn_temp = SelfAttention(hidden_size, num_heads, "temporal")

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t0: torch.Tensor,
        y_lens: torch.Tensor,
        num_frames: int,
        tpe: torch.Tensor | None,
        backend: str,
        fused: str | None = None,
    ) -> torch.Tensor:
        """x (B, T*S, C), y (B, L, C), t0 (B, 6C), y_lens (B,), tpe (1, T, C) or None -> (B, T*S, C).

        ``fused``: None runs LayerNorm + modulate and the gated residuals as separate torch ops
        (Open-Sora's path); a backend name routes them through stdit.kernels.layernorm_modulate /
        gated_residual instead (same math).
        """
        B, N, C = x.shape
        mods = self.scale_shift_table[None] + t0.reshape(B, 6, C)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (B, 1, C) each

        x_s = self.attn(self._norm_modulate(self.norm1, x, shift_msa, scale_msa, fused), num_frames, backend)
        x = self._gated_residual(x, gate_msa, x_s, fused)

        x_t = x
        if tpe is not None:
            S = N // num_frames
            x_t = (x.view(B, num_frames, S, C) + tpe[:, :, None]).view(B, N, C)  # frame t gets tpe[t]
        x = self._gated_residual(x, gate_msa, self.attn_temp(x_t, num_frames, backend), fused)

        x = x + self.cross_attn(x, y, y_lens, backend)

        x_m = self.mlp(self._norm_modulate(self.norm2, x, shift_mlp, scale_mlp, fused))
        return self._gated_residual(x, gate_mlp, x_m, fused)

    @staticmethod
    def _norm_modulate(norm: nn.LayerNorm, x, shift, scale, fused: str | None) -> torch.Tensor:
        if fused is None:
            return modulate(norm(x), shift, scale)
        return layernorm_modulate(x, shift, scale, eps=norm.eps, backend=fused)

    def _gated_residual(self, x, gate, y, fused: str | None) -> torch.Tensor:
        # drop_path scales a sample's branch by 0 or 1/keep, which commutes with the per-sample gate
        if fused is None:
            return x + self.drop_path(gate * y)
        return gated_residual(x, gate, self.drop_path(y), backend=fused)


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
# The model
# ------------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    out = getattr(torch, aliases.get(name, name), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"dtype: expected a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return out


class VideoDiTBase(nn.Module):
    """What STDiT, DiT and Latte share: sizes, fixed position tables, the timestep / caption
    embedders and adaLN-single t_block, the PixArt-style init, embedding the inputs, running a block
    (with optional activation checkpointing) and unpatchifying. Subclasses add ``blocks`` and
    ``final_layer`` after ``_build_trunk`` and say which layers start at zero."""

    def _build_trunk(
        self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
        pred_sigma, drop_path, caption_channels, model_max_length, dtype, space_scale, time_scale,
        attention_backend, checkpoint, fused_ops,
    ) -> list[float]:  # fmt: skip
        """Validate sizes, set the shared attributes and create the trunk in Open-Sora's order
        (tables, x_embedder, t_embedder, t_block, y_embedder); returns per-block drop-path rates."""
        input_size, patch_size = tuple(input_size), tuple(patch_size)
        if attention_backend not in BACKEND_NAMES and not str(attention_backend).startswith("sdpa:"):
            raise ValueError(f"attention_backend: unknown backend {attention_backend!r}; expected one of {BACKEND_NAMES}")
        if fused_ops is not None and fused_ops not in FUSED_BACKENDS:
            raise ValueError(f"fused_ops: expected None or one of {FUSED_BACKENDS}, got {fused_ops!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: {hidden_size} is not a multiple of num_heads = {num_heads}")
        for size, p in zip(input_size, patch_size):
            if size % p:
                raise ValueError(f"input_size: {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.pred_sigma = pred_sigma
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.mlp_ratio = mlp_ratio
        self.space_scale, self.time_scale = space_scale, time_scale
        self.dtype = _as_dtype(dtype)
        self.attention_backend = attention_backend
        self.checkpoint = checkpoint
        self.fused_ops = fused_ops
        grid = tuple(s // p for s, p in zip(input_size, patch_size))  # (T', H', W')
        self._grid = grid

        self.register_buffer("pos_embed", spatial_pos_embed(hidden_size, grid[1], grid[2], space_scale))
        self.register_buffer("pos_embed_temporal", temporal_pos_embed(hidden_size, grid[0], time_scale))
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        return [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]

    def _silent_layers(self) -> list[nn.Linear]:
        """Block layers that start at zero (the final linear always does)."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Open-Sora 1.0's (PixArt-alpha's) init: xavier-uniform Linears with zero bias, xavier patch
        conv, N(0, 0.02) for the timestep/caption MLPs and t_block, zeros for _silent_layers() and
        the final linear."""
        if any(p.is_meta for p in self.parameters()):
            return  # nothing to initialise on the meta device
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for lin in [*self._silent_layers(), self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _pos_tables(self, grid: tuple[int, int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The spatial (1, S, C) and temporal (1, T, C) tables for a (T', H', W') patch grid: the
        buffers at the configured size, else rebuilt for this grid with the same scales."""
        T, Hg, Wg = grid
        if (Hg, Wg) == self._grid[1:]:
            pos = self.pos_embed
        else:
            pos = spatial_pos_embed(self.hidden_size, Hg, Wg, self.space_scale).to(like.device)
        if T == self._grid[0]:
            tpe = self.pos_embed_temporal
        else:
            tpe = temporal_pos_embed(self.hidden_size, T, self.time_scale).to(like.device)
        return pos.to(like.dtype), tpe.to(like.dtype)

    def _captions(
        self, y: torch.Tensor, mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, L, C) embedded captions and a 0/1 mask -> y (B, L, C) with each sample's valid
        tokens moved to the front (stable, so order is kept) and their counts y_lens (B,).

        Open-Sora packs the valid tokens of all samples into one sequence and uses a block-diagonal
        mask; padded kv with per-sample lengths is the same attention.
        """
        y = y.squeeze(1)  # (B, L, C)
        L = y.shape[1]
        if mask is None:
            return y, torch.full((batch,), L, dtype=torch.int64, device=y.device)
        mask = mask.reshape(mask.shape[0], -1)  # accepts (B, L) or (B, 1, 1, L)
        if mask.shape[0] != batch:  # a CFG batch reusing one mask per prompt, as Open-Sora allows
            if batch % mask.shape[0]:
                raise ValueError(f"mask: batch {mask.shape[0]} does not divide the input batch {batch}")
            mask = mask.repeat(batch // mask.shape[0], 1)
        if mask.shape[1] != L:
            raise ValueError(f"mask: expected shape ({batch}, {L}) to match y, got {tuple(mask.shape)}")
        keep = mask != 0
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # valid tokens first
        y = y.gather(1, order[:, :, None].expand_as(y))
        return y, keep.sum(dim=1)

    def _check_inputs(self, x, timestep, y, mask, force_drop_ids) -> torch.Tensor:
        """Raise a ValueError/TypeError naming the argument for inputs that do not fit the model;
        returns timestep as a (B,) tensor (a 0-d timestep is broadcast over the batch)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            got = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating (B, C={self.in_channels}, T, H, W) latent video, got {got}")
        B, C = x.shape[:2]
        if C != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        for name, size, p in zip("THW", x.shape[2:], self.patch_size):
            if size % p or size == 0:
                raise ValueError(f"x: {name} = {size} is not a positive multiple of the patch size {p} ({tuple(x.shape)})")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if tuple(timestep.shape) != (B,):
            raise ValueError(f"timestep: expected shape ({B},) (one step per sample), got {tuple(timestep.shape)}")
        cap, L_max = self.y_embedder.y_embedding.shape[1], self.y_embedder.y_embedding.shape[0]
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != 1 or y.shape[3] != cap:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected text features of shape (B, 1, L, caption_channels={cap}), got {got}")
        if y.shape[0] != B:
            raise ValueError(f"y: batch {y.shape[0]} does not match x's batch {B}")
        if not 1 <= y.shape[2] <= L_max:
            raise ValueError(f"y: {y.shape[2]} text tokens; expected 1 to model_max_length = {L_max}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.is_complex() or mask.dim() < 2:
                got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"mask: expected a 0/1 or bool tensor of shape (B, L), got {got}")
            if not torch.compiler.is_compiling():  # data-dependent checks stay out of compiled graphs
                if not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("mask: expected 0/1 (or bool) values marking real text tokens")
                flat = mask.reshape(mask.shape[0], -1)
                if flat.shape[1] == y.shape[2] and not (flat != 0).any(dim=1).all():
                    raise ValueError(
                        "mask: every sample needs at least one real text token (for an unconditional "
                        "sample pass force_drop_ids, which uses the null caption)"
                    )
        if force_drop_ids is not None and (
            not isinstance(force_drop_ids, torch.Tensor) or tuple(force_drop_ids.shape) != (B,)
        ):
            raise ValueError(f"force_drop_ids: expected a ({B},) tensor of 0/1, got {force_drop_ids!r:.80}")
        return timestep

    def _embed(self, x, timestep, y, mask, force_drop_ids):
        """Inputs -> (x (B, T*S, C) patch tokens + spatial pos-emb, t (B, C), t0 (B, 6C), y (B, L, C),
        y_lens (B,), grid (T', H', W'), temporal pos-emb (1, T, C))."""
        timestep = self._check_inputs(x, timestep, y, mask, force_drop_ids)
        x = x.to(self.dtype)
        timestep = timestep.to(self.dtype)  # as the reference: in bf16, step 711 becomes 712
        y = y.to(self.dtype)
        B, _, Tin, Hin, Win = x.shape
        grid = (Tin // self.patch_size[0], Hin // self.patch_size[1], Win // self.patch_size[2])
        T, S = grid[0], grid[1] * grid[2]

        x = self.x_embedder(x)  # (B, T*S, C)
        pos, tpe = self._pos_tables(grid, x)
        x = (x.reshape(B, T, S, -1) + pos[:, None]).reshape(B, T * S, -1)

        t = self.t_embedder(timestep, dtype=x.dtype)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)

        y = self.y_embedder(y, self.training, force_drop_ids)  # (B, 1, L, C)
        y, y_lens = self._captions(y, mask, B)  # (B, L, C), (B,)
        return x, t, t0, y, y_lens, grid, tpe

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """block(*args, attention backend, fused ops), checkpointed when asked for in training."""
        args = (*args, self.attention_backend, self.fused_ops)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, T'*H'*W', p_t*p_h*p_w*C_out) -> (B, C_out, T'*p_t, H'*p_h, W'*p_w).

        Each token's outputs are ordered (p_t, p_h, p_w, C_out), C_out fastest, as in Open-Sora.
        """
        B = x.shape[0]
        (T, Hg, Wg), (pt, ph, pw) = grid, self.patch_size
        x = x.view(B, T, Hg, Wg, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, T, p_t, H', p_h, W', p_w)
        return x.reshape(B, self.out_channels, T * pt, Hg * ph, Wg * pw)


class STDiT(VideoDiTBase):
    """Open-Sora 1.0's STDiT with its constructor keywords and state-dict names.

    Args (Open-Sora 1.0's, same defaults):
        input_size: latent (T, H, W) the fixed position tables are built for.
        in_channels: latent channels; out_channels = 2*in_channels if pred_sigma else in_channels.
        patch_size: (p_t, p_h, p_w).
        hidden_size, depth, num_heads, mlp_ratio: transformer size (head dim = hidden/heads).
        class_dropout_prob: caption drop probability for classifier-free guidance (train mode only).
        pred_sigma: also predict the learned-range variance (IDDPM), doubling the output channels.
        drop_path: stochastic depth, linearly increasing from 0 to this over the blocks.
        no_temporal_pos_emb: accepted and ignored, as in Open-Sora 1.0 (its forward never reads it:
            the temporal table is always added, in block 0, to the temporal-attention input).
        caption_channels, model_max_length: text feature width and token count (T5: 4096, 120).
        space_scale, time_scale: position divisors of the spatial / temporal sin-cos tables.
        freeze: None, "not_temporal" (train only attn_temp) or "text" (freeze cross_attn).
        dtype: the activation dtype inputs are cast to (parameters stay as created; cast the
            module yourself, e.g. ``.to(torch.bfloat16)``). The output is always float32.
        enable_flashattn, enable_layernorm_kernel, enable_sequence_parallelism: accepted for
            config compatibility and ignored. Attention is chosen by ``attention_backend``;
            LayerNorm is torch's; sequence parallelism lives in stdit.train, not in the model.

    Args (ours):
        attention_backend: backend name passed to every stdit.kernels call ("auto", "triton",
            "sdpa", "reference", ...); may be changed on the instance at any time.
        fused_ops: None (default) runs LayerNorm+modulate and the gated residuals as plain torch
            ops, as Open-Sora does; a backend name ("reference", "triton", "auto") routes them
            through stdit.kernels.layernorm_modulate / gated_residual.
        checkpoint: activation checkpointing per block (torch.utils.checkpoint, non-reentrant) in
            training mode.
    """

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
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        dtype: torch.dtype | str = torch.float32,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        freeze: str | None = None,
        enable_flashattn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        *,
        attention_backend: str = "auto",
        checkpoint: bool = False,
        fused_ops: str | None = None,
    ):
        super().__init__()
        if freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze: expected None, 'not_temporal' or 'text', got {freeze!r}")
        # Creation order matches Open-Sora's, so the default init draws the same random numbers
        # (e.g. y_embedding equals the reference's under the same seed).
        rates = self._build_trunk(
            input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
            pred_sigma, drop_path, caption_channels, model_max_length, dtype, space_scale, time_scale,
            attention_backend, checkpoint, fused_ops,
        )  # fmt: skip
        self.no_temporal_pos_emb = no_temporal_pos_emb  # unused, as in Open-Sora 1.0
        self.blocks = nn.ModuleList(STDiTBlock(hidden_size, num_heads, mlp_ratio, r) for r in rates)
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), self.out_channels)

        self.initialize_weights()
        if freeze == "not_temporal":
            for name, p in self.named_parameters():
                p.requires_grad_("attn_temp" in name)
        elif freeze == "text":
            for name, p in self.named_parameters():
                if "cross_attn" in name:
                    p.requires_grad_(False)

    def _silent_layers(self) -> list[nn.Linear]:
        """Zero-initialized: temporal and cross output projections (a stage-2 model starts as the
        image model), plus the final linear (added by initialize_weights)."""
        return [lin for block in self.blocks for lin in (block.attn_temp.proj, block.cross_attn.proj)]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (and the variance output) for a noisy latent video.

        x (B, C_in, T, H, W); timestep (B,) (int or float, 0..999); y (B, 1, L, caption_channels)
        text features; mask (B, L) with 1 for real tokens (None: all tokens are real);
        force_drop_ids (B,) 0/1 replaces captions by the null embedding where 1.
        Returns (B, out_channels, T, H, W) float32.
        """
        x, t, t0, y, y_lens, grid, tpe = self._embed(x, timestep, y, mask, force_drop_ids)
        for i, block in enumerate(self.blocks):  # temporal pos-emb: block 0's temporal input only
            x = self._run_block(block, x, y, t0, y_lens, grid[0], tpe if i == 0 else None)
        x = self.final_layer(x, t)  # (B, T*S, p_t*p_h*p_w*C_out)
        return self.unpatchify(x, grid).float()


# ------------------------------------------------------------------------------------------------
# Presets (the sizes live in stdit.models.sizes)
# ------------------------------------------------------------------------------------------------

STDIT_PRESETS: dict[str, dict] = {f"STDiT-{name}": size.kwargs() for name, size in SIZES.items()}


def stdit_from_preset(name: str, **overrides) -> STDiT:
    """Build a preset by name ("STDiT-XL/2", "STDiT-tiny", ...); keyword overrides win over the preset."""
    if name not in STDIT_PRESETS:
        raise ValueError(f"name: unknown STDiT preset {name!r}; expected one of {sorted(STDIT_PRESETS)}")
    return STDiT(**{**STDIT_PRESETS[name], **overrides})


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device; buffers not counted)."""
    return sum(p.numel() for p in model.parameters())
