"""STDiT3: Open-Sora 1.2's spatial-temporal diffusion transformer, on the stdit.kernels attention API.

Written from the published architecture and checked against golden weights/outputs of Open-Sora
v1.2.0's own code (tests/models/test_stdit3_golden.py): the same constructor keywords
(``STDiT3Config``'s), the same parameter and buffer names, shapes and order, so Open-Sora 1.2
checkpoints load with ``strict=True``, and the same forward math, quirks included.

What changes from STDiT (Open-Sora 1.0), in the order a forward meets it:

- no fixed position tables: a 2D sin-cos embedding is computed per input from its latent grid and
  its pixel size (``height[0]``, ``width[0]``), so any resolution, aspect ratio and frame count
  runs; latent sizes that are not multiples of the patch are zero-padded and the output cropped;
- the fps is embedded (``fps_embedder``) and added to the timestep embedding;
- ``x_mask`` (B, T) marks generated frames (True) and conditioning frames (False); the latter take
  their adaLN shift/scale/gate from timestep 0 (``t0``), in every block and in the final layer;
- ``depth`` spatial blocks and ``depth`` temporal blocks, run interleaved S0, T0, S1, T1, ...; each
  is a whole DiT block (self-attention, cross-attention, MLP) with its own adaLN table;
- q and k go through a per-head RMSNorm with learned gains (``qk_norm``) and, in temporal blocks,
  rotary position embedding over the frame index; both happen inside stdit.kernels (``QKNorm``,
  ``rope=``), which fuses them into our Triton kernels;
- the final layer normalises twice for conditioning frames (a reference defect reproduced by
  default; ``final_norm_quirk=False`` switches it off).

Reads top-down: the attention modules, the block, the model, the presets. Dimension alphabet:
B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, H heads, D head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stdit.common.dtypes import as_dtype
from stdit.kernels import QKNorm, full_attention, gated_residual, layernorm_modulate, spatial_attention
from stdit.kernels import temporal_attention

from .base import BACKEND_NAMES, VideoDiTBase, WholeSequence
from .layers import (
    CaptionEmbedder, DropPath, Mlp, PatchEmbed3D, RMSNorm, RotaryEmbedding, SizeEmbedder, T2IFinalLayer,
    TimestepEmbedder, modulate, resolution_pos_embed,
)  # fmt: skip
from .sizes import ModelSize, constructor_kwargs, family_sizes
from .stdit import AttentionCore, CrossAttention

__all__ = ["STDiT3", "STDIT3_PRESETS", "stdit3_from_preset", "NormedAttentionCore", "NormedSelfAttention", "STDiT3Block"]


# ------------------------------------------------------------------------------------------------
# Attention modules (projections and q/k gains here, attention in stdit.kernels behind the core)
# ------------------------------------------------------------------------------------------------


class NormedAttentionCore(AttentionCore):
    """STDiT's parameter-free attention core, also handing q/k RMSNorm gains and RoPE frequencies to
    stdit.kernels, which applies them to q and k before the attention (fused in our Triton kernels).

    forward(qkv (B, T*S, 3, H, D), num_frames, *, backend, qk_norm=None, rope=None) -> (B, T*S, H, D).
    A wrapper hooking the core sees qkv and num_frames as positional arguments, as with STDiT's.
    """

    def forward(self, qkv, num_frames, *, backend: str, qk_norm: QKNorm | None = None, rope=None):  # type: ignore[override]
        if self.kind == "spatial":
            return spatial_attention(qkv, num_frames, backend=backend, qk_norm=qk_norm, rope=rope)
        if self.kind == "temporal":
            return temporal_attention(qkv, num_frames, backend=backend, qk_norm=qk_norm, rope=rope)
        if self.kind == "full":
            return full_attention(qkv, backend=backend, qk_norm=qk_norm, rope=rope)
        raise ValueError(f"kind: a self-attention core is 'spatial', 'temporal' or 'full', not {self.kind!r}")


class NormedSelfAttention(nn.Module):
    """qkv Linear -> [q/k RMSNorm -> RoPE -> attention] (in stdit.kernels) -> proj.

    Keys qkv / q_norm / k_norm / proj, as Open-Sora 1.2's ``Attention``; without ``qk_norm`` the two
    norms are parameter-free identities, as there.
    """

    def __init__(self, dim: int, num_heads: int, kind: str, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.core = NormedAttentionCore(kind)
        self.proj = nn.Linear(dim, dim)

    @property
    def kind(self) -> str:
        return self.core.kind

    def forward(
        self, x: torch.Tensor, num_frames: int, backend: str, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T*S, C), rope (D/2,) frequencies or None -> (B, T*S, C)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, T*S, 3, H, D)
        qk_norm = None
        if isinstance(self.q_norm, RMSNorm):
            qk_norm = QKNorm(self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon)
        out = self.core(qkv, num_frames, backend=backend, qk_norm=qk_norm, rope=rope)  # (B, T*S, H, D)
        return self.proj(out.flatten(2))


# ------------------------------------------------------------------------------------------------
# STDiT3 block
# ------------------------------------------------------------------------------------------------


class STDiT3Block(nn.Module):
    """One STDiT3 block (spatial or temporal self-attention), adaLN-single with per-frame conditioning:

    x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))     spatial: within a frame;
                                                                    temporal: across frames, RoPE
    x += CrossAttn(x, text)                                         (no norm, no gate)
    x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    shift/scale/gate come from the block's (6, C) table plus t_mlp, or plus t0_mlp for frames whose
    x_mask is False. Choosing the modulation per frame before modulating gives bitwise what the
    reference gets by modulating twice and choosing afterwards (the same operations per element).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
        qk_norm: bool = True, temporal: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.temporal = temporal
        # Creation order = the reference's (its default init draws in this order).
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = NormedSelfAttention(hidden_size, num_heads, "temporal" if temporal else "spatial", qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t_mlp: torch.Tensor,
        y_lens: torch.Tensor,
        num_frames: int,
        x_mask: torch.Tensor | None,
        t0_mlp: torch.Tensor | None,
        rope: torch.Tensor | None,
        backend: str,
        fused: str | None = None,
    ) -> torch.Tensor:
        """x (B, T*S, C), y (B, L, C), t_mlp / t0_mlp (B, 6C), y_lens (B,), x_mask (B, T) bool or
        None, rope (D/2,) or None -> (B, T*S, C).

        ``fused``: None runs LayerNorm + modulate and the gated residuals as separate torch ops (the
        reference's path); a backend name routes them through stdit.kernels.layernorm_modulate /
        gated_residual (same math), one row of modulation per sample, or per frame with x_mask.
        """
        B, _, C = x.shape
        mods = self.scale_shift_table[None] + t_mlp.reshape(B, 6, C)  # (B, 6, C)
        if x_mask is not None:
            mods0 = self.scale_shift_table[None] + t0_mlp.reshape(B, 6, C)
            mods = torch.where(x_mask[:, :, None, None], mods[:, None], mods0[:, None])  # (B, T, 6, C)
            mods = mods.reshape(B * num_frames, 6, C)
        # R rows of modulation (samples, or frames of samples), each over N/R tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (R, 1, C) each

        h = self._norm_modulate(self.norm1, x, shift_msa, scale_msa, fused)
        x = self._gated_residual(x, gate_msa, self.attn(h, num_frames, backend, rope), fused)

        x = x + self.cross_attn(x, y, y_lens, backend)

        h = self._norm_modulate(self.norm2, x, shift_mlp, scale_mlp, fused)
        return self._gated_residual(x, gate_mlp, self.mlp(h), fused)

    @staticmethod
    def _norm_modulate(norm: nn.LayerNorm, x, shift, scale, fused: str | None) -> torch.Tensor:
        """x (B, N, C), shift/scale (R, 1, C) with R dividing B*N/... rows -> (B, N, C)."""
        B, N, C = x.shape
        rows = x.reshape(shift.shape[0], -1, C)  # (R, N*B/R, C)
        if fused is None:
            out = modulate(norm(rows), shift, scale)
        else:
            out = layernorm_modulate(rows, shift, scale, eps=norm.eps, backend=fused)
        return out.reshape(B, N, C)

    def _gated_residual(self, x, gate, y, fused: str | None) -> torch.Tensor:
        """x + drop_path(gate * y): x, y (B, N, C), gate (R, 1, C). drop_path scales a whole sample's
        branch by 0 or 1/keep, which commutes with the gate, so it applies to y per sample first."""
        B, N, C = x.shape
        R = gate.shape[0]
        if fused is None:
            return x + self.drop_path((gate * y.reshape(R, -1, C)).reshape(B, N, C))
        y = self.drop_path(y).reshape(R, -1, C)
        return gated_residual(x.reshape(R, -1, C), gate, y, backend=fused).reshape(B, N, C)


# ------------------------------------------------------------------------------------------------
# STDiT3
# ------------------------------------------------------------------------------------------------


class STDiT3(VideoDiTBase):
    """Open-Sora 1.2's STDiT3 with its constructor keywords (``STDiT3Config``'s) and state-dict names.

    Args (Open-Sora 1.2's, same defaults):
        input_size: accepted and ignored, as in the reference (positions come from each input).
        input_sq_size: the pixel side the position scale is relative to: scale = sqrt(h*w) / 512.
        in_channels: latent channels; out_channels = 2*in_channels if pred_sigma else in_channels.
        patch_size: (p_t, p_h, p_w).
        hidden_size, depth, num_heads, mlp_ratio: transformer size; ``depth`` spatial and ``depth``
            temporal blocks (head dim = hidden/heads, even, for RoPE; hidden a multiple of 4).
        class_dropout_prob: caption drop probability for classifier-free guidance (train mode only).
        pred_sigma: 2*in_channels outputs. The reference's default and every v1.2 config keep it on;
            rectified flow uses the first in_channels only.
        drop_path: stochastic depth, linearly increasing from 0 to this over the blocks.
        caption_channels, model_max_length: text feature width and token count (T5: 4096, 300).
        qk_norm: per-head RMSNorm with learned gains on q and k (keys ``attn.q_norm.weight`` /
            ``attn.k_norm.weight``); False leaves q and k as they are, with no such keys.
        only_train_temporal: only the temporal blocks' parameters require grad.
        freeze_y_embedder: the caption embedder's parameters do not require grad.
        skip_y_embedder: ``y`` arrives already embedded and packed, (1, sum(L_b), C), with ``mask``
            the per-sample token counts (B,) (a list or integer tensor), as the reference takes it.
        enable_flash_attn, enable_layernorm_kernel, enable_sequence_parallelism: accepted for
            config compatibility and ignored: attention is chosen by ``attention_backend``,
            LayerNorm is torch's (every LayerNorm here is affine-free, so no keys change), and
            sequence parallelism lives in stdit.train, hooking ``model.sequence`` and the cores.

    Args (ours, keyword-only):
        attention_backend: backend name passed to every stdit.kernels call ("auto", "triton",
            "sdpa", "reference", ...); may be changed on the instance at any time.
        checkpoint: activation checkpointing per block (non-reentrant) in training mode.
        fused_ops: None (default) runs LayerNorm+modulate and the gated residuals as plain torch
            ops, as the reference does; a backend name ("reference", "triton", "auto") routes them
            through stdit.kernels.layernorm_modulate / gated_residual.
        dtype: the activation dtype inputs are cast to; None (default) follows the patch embedding's
            weight dtype, as the reference does (cast the module with ``.to(torch.bfloat16)``). The
            output is always float32.
        final_norm_quirk: True (default, the reference's behaviour) normalises conditioning frames
            twice in the final layer (the second LayerNorm acts on the already modulated tokens);
            False normalises once, so an all-False x_mask equals timestep 0. Attribute of the same
            name on the instance.
    """

    family = "STDiT3"  # its name in presets ("STDiT3-tiny")

    def __init__(
        self,
        input_size: tuple = (None, None, None),
        input_sq_size: int = 512,
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
        model_max_length: int = 300,
        qk_norm: bool = True,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        only_train_temporal: bool = False,
        freeze_y_embedder: bool = False,
        skip_y_embedder: bool = False,
        *,
        attention_backend: str = "auto",
        checkpoint: bool = False,
        fused_ops: str | None = None,
        dtype: torch.dtype | str | None = None,
        final_norm_quirk: bool = True,
    ):
        super().__init__()
        patch_size = tuple(patch_size)
        self._check_config(
            input_size, input_sq_size, patch_size, hidden_size, depth, num_heads, attention_backend, fused_ops
        )
        self.input_size, self.input_sq_size, self.patch_size = tuple(input_size), input_sq_size, patch_size
        self.in_channels, self.pred_sigma = in_channels, pred_sigma
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size, self.num_heads, self.depth, self.mlp_ratio = hidden_size, num_heads, depth, mlp_ratio
        self.qk_norm, self.skip_y_embedder = qk_norm, skip_y_embedder
        self.enable_flash_attn, self.enable_layernorm_kernel = enable_flash_attn, enable_layernorm_kernel
        self.enable_sequence_parallelism = enable_sequence_parallelism  # ignored (see the docstring)
        self.dtype = None if dtype is None else as_dtype(dtype)
        self.attention_backend, self.checkpoint, self.fused_ops = attention_backend, checkpoint, fused_ops
        self.final_norm_quirk = final_norm_quirk
        self.sequence = WholeSequence()

        # Creation order = the reference's: rope.freqs is the first state-dict key, and a seeded
        # construction draws the reference's random numbers (tests compare y_embedding).
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, r, qk_norm, temporal=False) for r in rates
        )
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, r, qk_norm, temporal=True) for r in rates
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(patch_size), self.out_channels)

        self.initialize_weights()
        if only_train_temporal:
            for name, p in self.named_parameters():
                p.requires_grad_(name.startswith("temporal_blocks."))
        if freeze_y_embedder:
            self.y_embedder.requires_grad_(False)

    @staticmethod
    def _check_config(input_size, input_sq_size, patch_size, hidden_size, depth, num_heads, backend, fused_ops):
        if backend not in BACKEND_NAMES and not str(backend).startswith("sdpa:"):
            raise ValueError(f"attention_backend: unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
        from stdit.kernels.fused_ops import FUSED_BACKENDS

        if fused_ops is not None and fused_ops not in FUSED_BACKENDS:
            raise ValueError(f"fused_ops: expected None or one of {FUSED_BACKENDS}, got {fused_ops!r}")
        if len(tuple(input_size)) != 3:
            raise ValueError(f"input_size: expected 3 entries (T, H, W; ignored, as in Open-Sora 1.2), got {input_size!r}")
        if len(patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in patch_size):
            raise ValueError(f"patch_size: expected 3 positive ints (p_t, p_h, p_w), got {patch_size!r}")
        if not input_sq_size > 0:
            raise ValueError(f"input_sq_size: expected a positive pixel size, got {input_sq_size!r}")
        if depth < 1:
            raise ValueError(f"depth: expected at least 1 (spatial + temporal) block pair, got {depth}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: {hidden_size} is not a multiple of num_heads = {num_heads}")
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"num_heads: head dim {hidden_size} / {num_heads} must be even (rotary embedding)")
        if hidden_size % 4:
            raise ValueError(f"hidden_size: {hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")

    @property
    def size(self) -> ModelSize:
        """The sizes this model was built with (``depth`` counts spatial/temporal block pairs)."""
        text_len, caption_channels = self.y_embedder.y_embedding.shape
        return ModelSize(
            depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads, patch_size=self.patch_size,
            in_channels=self.in_channels, caption_channels=caption_channels, model_max_length=text_len,
            mlp_ratio=self.mlp_ratio, pred_sigma=self.pred_sigma,
        )  # fmt: skip

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Open-Sora 1.2's init: xavier-uniform Linears with zero bias (the patch conv keeps torch's
        default), N(0, 0.02) for the fps MLP's first layer and zeros for its second, and zero weights
        for the temporal blocks' attention, cross-attention and fc2 projections (a new temporal block
        starts as the identity). The final linear is not zeroed (unlike Open-Sora 1.0)."""
        if any(p.is_meta for p in self.parameters()):
            return  # nothing to initialise on the meta device
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[0].bias)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        for block in self.temporal_blocks:
            for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(lin.weight)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: torch.Tensor | float | None = None,
        width: torch.Tensor | float | None = None,
        force_drop_ids: torch.Tensor | None = None,
        *,
        ar=None,
        num_frames=None,
    ) -> torch.Tensor:
        """Predict the velocity (and the unused pred_sigma half) for a noisy latent video.

        x (B, C_in, T, H, W), any T, H, W (padded up to the patch, the output cropped back);
        timestep (B,) float in [0, 1000] (or a 0-d / number for all samples); y (B, 1, L,
        caption_channels) text features; mask (B, L) 0/1, 1 for real tokens (None: all real);
        x_mask (B, T') bool, T' = latent frames / p_t, True for frames to generate, False for
        conditioning frames (treated as timestep 0); fps (B,) or one number: frames per second;
        height, width (B,) or one number: the video's size in pixels (only the first entry is read:
        it sets the position scale sqrt(h*w)/input_sq_size); force_drop_ids (B,) 0/1 replaces
        captions by the null embedding where 1. ``ar`` and ``num_frames`` are accepted and ignored:
        Open-Sora's trainer and sampler pass them with the other keywords, and its model ignores
        them too (they feed the rectified-flow timestep transform only).
        Returns (B, out_channels, T, H, W) float32.
        """
        tokens, grid = self.forward_tokens(x, timestep, y, mask, x_mask, fps, height, width, force_drop_ids)
        out = self.unpatchify(self.sequence.gather(tokens, grid), grid)
        T, H, W = x.shape[2:]
        return out[:, :, :T, :H, :W].float()

    def forward_tokens(
        self, x: torch.Tensor, timestep, y: torch.Tensor, mask=None, x_mask=None, fps=None, height=None,
        width=None, force_drop_ids=None,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:  # fmt: skip
        """The forward up to and including the final layer: (tokens (B, N, p_t*p_h*p_w*C_out), grid
        (T', H', W') of the padded input). N = T'*H'*W', or this process's share of the tokens when a
        sequence-parallel layout is set."""
        x, t, t_mlp, t0, t0_mlp, y, y_lens, x_mask, grid = self._embed3(
            x, timestep, y, mask, x_mask, fps, height, width, force_drop_ids
        )
        # All tokens unless sequence-parallel; x_mask, a per-frame table, keeps the rows of the frames held.
        x, frames, x_mask = self.sequence.split(x, grid, x_mask)

        def blocks(x: torch.Tensor) -> torch.Tensor:
            for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
                x = self._run_block(spatial, x, y, t_mlp, y_lens, frames, x_mask, t0_mlp, None)
                x = self._run_block(temporal, x, y, t_mlp, y_lens, frames, x_mask, t0_mlp, self.rope.freqs)
            return x

        x = self._run_blocks(x, blocks, self.spatial_blocks[0], t_mlp)
        return self.final_layer(x, t, x_mask, t0, frames, double_norm=self.final_norm_quirk), grid

    def _embed3(self, x, timestep, y, mask, x_mask, fps, height, width, force_drop_ids):
        """Inputs -> (x (B, T*S, C) patch tokens + position embedding, t (B, C) timestep + fps
        embedding, t_mlp (B, 6C), t0 / t0_mlp (timestep 0's, None without x_mask), y (B, L, C),
        y_lens (B,), x_mask, grid (T', H', W'))."""
        timestep, fps, scale = self._check_inputs3(x, timestep, y, mask, x_mask, fps, height, width, force_drop_ids)
        dtype = self.dtype if self.dtype is not None else self.x_embedder.proj.weight.dtype
        x = x.to(dtype)
        timestep = timestep.to(dtype)  # as the reference: in bf16 the timestep is rounded to bf16
        B = x.shape[0]
        pads = [(-size) % p for size, p in zip(x.shape[2:], self.patch_size)]  # (T, H, W) up to the patch
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))
        T, Hg, Wg = grid

        x = self.x_embedder(x)  # (B, T*S, C)
        pos = resolution_pos_embed(self.hidden_size, Hg, Wg, scale, round(math.sqrt(Hg * Wg)))  # (1, S, C)
        x = (x.view(B, T, Hg * Wg, -1) + pos.to(x.dtype)[:, None]).view(B, T * Hg * Wg, -1)

        fps_emb = self.fps_embedder(fps, B)  # (B, C)
        t = self.t_embedder(timestep, dtype=x.dtype) + fps_emb  # (B, C)
        t_mlp = self.t_block(t)  # (B, 6C)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        if self.skip_y_embedder:
            y, y_lens = self._unpack_captions(y.to(dtype), mask, B)
        else:
            y = self.y_embedder(y.to(dtype), self.training, force_drop_ids)  # (B, 1, L, C)
            y, y_lens = self._captions(y, mask, B)  # (B, L, C) valid tokens first, (B,)
        return x, t, t_mlp, t0, t0_mlp, y, y_lens, x_mask, grid

    def _unpack_captions(self, y: torch.Tensor, lens, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """skip_y_embedder: packed embedded captions y (1, sum(L_b), C) and their counts (B,) -> the
        padded (B, max L_b, C) form the kernels take, and the counts as a (B,) tensor."""
        counts = [int(n) for n in (lens.tolist() if isinstance(lens, torch.Tensor) else lens)]
        parts = y.reshape(-1, y.shape[-1]).split(counts)
        L = max(counts)
        padded = torch.stack([F.pad(p, (0, 0, 0, L - p.shape[0])) for p in parts])  # (B, L, C)
        return padded, torch.tensor(counts, dtype=torch.int64, device=y.device)

    def _check_inputs3(self, x, timestep, y, mask, x_mask, fps, height, width, force_drop_ids):
        """Raise a ValueError/TypeError naming the argument for inputs that do not fit; returns
        timestep (B,), fps (B' dividing B,) float32 and the position scale (0-d float32 tensor)."""
        self._check_video(x, pad_to_patch=True)
        B = x.shape[0]
        timestep = self._check_timestep(timestep, x)
        if self.skip_y_embedder:
            self._check_packed_text(y, mask, B)
        else:
            self._check_text(y, mask, B)
        self._check_force_drop_ids(force_drop_ids, B)
        if x_mask is not None:
            frames = -(-x.shape[2] // self.patch_size[0])
            if not isinstance(x_mask, torch.Tensor) or x_mask.dtype != torch.bool:
                got = x_mask.dtype if isinstance(x_mask, torch.Tensor) else type(x_mask).__name__
                raise TypeError(f"x_mask: expected a bool tensor of shape (B, T) = ({B}, {frames}), got {got}")
            if tuple(x_mask.shape) != (B, frames):
                raise ValueError(
                    f"x_mask: expected shape (B, T) = ({B}, {frames}) (one flag per latent frame), got {tuple(x_mask.shape)}"
                )
        fps = self._per_sample("fps", fps, x, B)
        height = self._per_sample("height", height, x, B)
        width = self._per_sample("width", width, x, B)
        h0, w0 = height.reshape(-1)[0].double(), width.reshape(-1)[0].double()
        if not torch.compiler.is_compiling() and not bool((h0 > 0) & (w0 > 0)):
            raise ValueError(f"height, width: expected positive pixel sizes, got {h0.item()} and {w0.item()}")
        scale = (torch.sqrt(h0 * w0) / self.input_sq_size).float()  # as the reference: double, then float32
        return timestep, fps, scale

    @staticmethod
    def _per_sample(name: str, value, x: torch.Tensor, B: int) -> torch.Tensor:
        """A number or tensor of shape (), (B',) or (B', 1) with B' dividing B -> a float32 (B',) tensor."""
        if value is None:
            raise ValueError(f"{name}: required (one number per sample, or one for all); Open-Sora 1.2 always passes it")
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            raise TypeError(f"{name}: expected a tensor of shape ({B},) or a number, got {type(value).__name__}")
        value = torch.as_tensor(value, device=x.device)
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected real numbers, got dtype {value.dtype}")
        if value.dim() == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] == 0 or B % value.shape[0]:
            raise ValueError(
                f"{name}: expected shape ({B},), or (B',) with B' dividing {B}, or one number; got {tuple(value.shape)}"
            )
        return value.float()

    def _check_packed_text(self, y, lens, B: int) -> None:
        C = self.hidden_size
        if not isinstance(y, torch.Tensor) or y.dim() not in (3, 4) or y.shape[-1] != C or math.prod(y.shape[:-2]) != 1:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: with skip_y_embedder expected embedded captions packed as (1, sum(L), {C}), got {got}")
        if lens is None:
            raise ValueError("mask: with skip_y_embedder expected the per-sample caption token counts (B,), got None")
        counts = lens.tolist() if isinstance(lens, torch.Tensor) else list(lens)
        if len(counts) != B or any(int(n) < 1 for n in counts) or sum(int(n) for n in counts) != y.shape[-2]:
            raise ValueError(
                f"mask: with skip_y_embedder expected {B} token counts >= 1 summing to y's {y.shape[-2]} tokens, "
                f"got {counts}"
            )


# ------------------------------------------------------------------------------------------------
# Presets (the sizes live in stdit.models.sizes)
# ------------------------------------------------------------------------------------------------

STDIT3_PRESETS: dict[str, dict] = {
    f"STDiT3-{name}": constructor_kwargs("STDiT3", size) for name, size in family_sizes("STDiT3").items()
}


def stdit3_from_preset(name: str, **overrides) -> STDiT3:
    """Build a preset by name ("STDiT3-XL/2", "STDiT3-tiny", ...); keyword overrides win over the preset."""
    if name not in STDIT3_PRESETS:
        raise ValueError(f"name: unknown STDiT3 preset {name!r}; expected one of {sorted(STDIT3_PRESETS)}")
    return STDiT3(**{**STDIT3_PRESETS[name], **overrides})
