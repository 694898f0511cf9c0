"""STDiT: Open-Sora 1.0's spatial-temporal diffusion transformer, on the stdit.kernels attention API.

Written from the published architecture (Open-Sora 1.0 docs and report), not from its code,
and checked against golden weights/outputs of the reference (tests/models/test_stdit_golden.py):
the same constructor keywords and parameter and buffer names and shapes, so Open-Sora 1.0
checkpoints load with ``strict=True``, and the same forward math (an eval forward matches the
reference to float32 rounding).

Reads top-down: the attention modules (projections here, attention in stdit.kernels), the block,
the model, the presets; the embedders and the shared trunk are in layers.py and base.py.
Dimension alphabet: B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, H heads,
D head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from stdit.kernels import (
    cross_attention, full_attention, gated_residual, layernorm_modulate, spatial_attention, temporal_attention,
)  # fmt: skip

from .base import VideoDiTBase
from .layers import DropPath, FinalLayer, Mlp, modulate
from .sizes import SIZES

ATTENTION_KINDS = ("spatial", "temporal", "full", "cross")

__all__ = [
    "STDiT", "STDIT_PRESETS", "stdit_from_preset", "count_parameters", "AttentionCore", "SelfAttention",
    "CrossAttention", "STDiTBlock",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Attention modules (projections here, attention itself in stdit.kernels behind AttentionCore)
# ------------------------------------------------------------------------------------------------


class AttentionCore(nn.Module):
    """The attention itself, between the projections: a parameter-free module so that a wrapper can
    hook or replace it (sequence parallelism exchanges heads around it) without touching weights.

    kind "spatial" / "temporal" / "full": forward(qkv (B, T*S, 3, H, D), num_frames, backend) -> (B, T*S, H, D).
    kind "cross": forward(q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,), backend) -> (B, N, H, D);
    the lengths were checked once per model forward, so no block reads them on the host.
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind: expected one of {ATTENTION_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, *args, backend: str) -> torch.Tensor:
        if self.kind == "cross":
            q, kv, kv_lens = args
            return cross_attention(q, kv, kv_lens, backend=backend, check_lens=False)
        qkv, num_frames = args
        if self.kind == "spatial":
            return spatial_attention(qkv, num_frames, backend=backend)
        if self.kind == "temporal":
            return temporal_attention(qkv, num_frames, backend=backend)
        return full_attention(qkv, backend=backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class SelfAttention(nn.Module):
    """qkv Linear -> spatial, temporal or full attention over (B, T*S) tokens -> proj. Keys qkv / proj."""

    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        if kind == "cross":
            raise ValueError("kind: a self-attention is 'spatial', 'temporal' or 'full', not 'cross'")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.core = AttentionCore(kind)
        self.proj = nn.Linear(dim, dim)

    @property
    def kind(self) -> str:
        return self.core.kind

    def forward(self, x: torch.Tensor, num_frames: int, backend: str) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, T*S, 3, H, D)
        out = self.core(qkv, num_frames, backend=backend)  # (B, T*S, H, D), any head count a wrapper leaves
        return self.proj(out.flatten(2))


class CrossAttention(nn.Module):
    """Video tokens attend to their sample's valid text tokens. Keys q_linear / kv_linear / proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.core = AttentionCore("cross")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_lens: torch.Tensor, backend: str) -> torch.Tensor:
        """x (B, N, C), y (B, L, C) with each sample's valid tokens first, y_lens (B,) -> (B, N, C)."""
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim)  # (B, N, H, D)
        kv = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, D)
        out = self.core(q, kv, y_lens, backend=backend)  # (B, N, H, D)
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

    family = "STDiT"  # its name in presets ("STDiT-tiny") and, lower-cased, in the cost model

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
        tokens, grid = self.forward_tokens(x, timestep, y, mask, force_drop_ids)
        return self.unpatchify(self.sequence.gather(tokens, grid), grid).float()

    def forward_tokens(
        self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:  # fmt: skip
        """The forward up to the final layer: (tokens (B, N, p_t*p_h*p_w*C_out), grid (T', H', W')).

        N = T'*H'*W', or this process's share of the tokens when a sequence-parallel layout is set.
        """
        x, t, t0, y, y_lens, grid, tpe = self._embed(x, timestep, y, mask, force_drop_ids)
        x, frames, tpe = self.sequence.split(x, grid, tpe)  # all tokens unless sequence-parallel

        def blocks(x: torch.Tensor) -> torch.Tensor:
            for i, block in enumerate(self.blocks):  # temporal pos-emb: block 0's temporal input only
                x = self._run_block(block, x, y, t0, y_lens, frames, tpe if i == 0 else None)
            return x

        return self.final_layer(self._run_blocks(x, blocks, self.blocks[0], t0), t), grid


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
