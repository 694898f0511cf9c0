"""What STDiT, DiT and Latte share: sizes, fixed position tables, the embedders and adaLN-single
``t_block``, the PixArt-style init, input checks, embedding the inputs, running a block (with
optional activation checkpointing) and unpatchifying; and the default token layout.

Dimension alphabet: B batch, T frames, S tokens per frame, N = T*S tokens, L text tokens, C channels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.utils.checkpoint

from stdit.common.dtypes import as_dtype
from stdit.kernels import BACKENDS
from stdit.kernels.fused_ops import FUSED_BACKENDS

from .layers import CaptionEmbedder, PatchEmbed3D, TimestepEmbedder, modulate, spatial_pos_embed, temporal_pos_embed
from .sizes import ModelSize

__all__ = ["BACKEND_NAMES", "VideoDiTBase", "WholeSequence"]

BACKEND_NAMES = ("auto", *BACKENDS)  # plus "sdpa:<flash|efficient|cudnn|math>"


class WholeSequence:
    """Where STDiT's tokens live: all of them in this process (the default layout).

    Sequence parallelism (stdit.train.sequence_parallel) sets ``model.sequence`` to a layout whose
    ``split`` keeps this process's shard of the tokens and whose ``gather`` reassembles the output;
    it hooks the attention modules that need other processes' tokens, so the blocks never change.
    DiT and Latte keep the default (their forward does not split).
    """

    def split(self, x: torch.Tensor, grid: tuple[int, int, int], tpe: torch.Tensor):
        """x (B, T*S, C), grid (T, H', W'), tpe (1, T, C) or None (STDiT3 has no temporal table) ->
        (this process's tokens, their frame count, the temporal table rows of those frames)."""
        return x, grid[0], tpe

    def gather(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """This process's final-layer tokens -> all T*S tokens."""
        return tokens

    def checkpoint_contexts(self):
        """Contexts for an activation-checkpointed block's forward and its recomputation."""
        return contextlib.nullcontext(), contextlib.nullcontext()


class VideoDiTBase(nn.Module):
    """What STDiT, DiT and Latte share: sizes, fixed position tables, the timestep / caption
    embedders and adaLN-single t_block, the PixArt-style init, embedding the inputs, running a block
    (with optional activation checkpointing) and unpatchifying. Subclasses add ``blocks`` and
    ``final_layer`` after ``_build_trunk`` and say which layers start at zero."""

    fast_sampling = None  # the open stdit.models.accel.FastSampling context, if any

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
        self.dtype = as_dtype(dtype)
        self.attention_backend = attention_backend
        self.checkpoint = checkpoint
        self.fused_ops = fused_ops
        grid = tuple(s // p for s, p in zip(input_size, patch_size))  # (T', H', W')
        self._grid = grid
        self.sequence = WholeSequence()

        self.register_buffer("pos_embed", spatial_pos_embed(hidden_size, grid[1], grid[2], space_scale))
        self.register_buffer("pos_embed_temporal", temporal_pos_embed(hidden_size, grid[0], time_scale))
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        return [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]

    @property
    def size(self) -> ModelSize:
        """The sizes this model was built with (what the cost model counts)."""
        text_len, caption_channels = self.y_embedder.y_embedding.shape
        return ModelSize(
            depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads, patch_size=self.patch_size,
            in_channels=self.in_channels, caption_channels=caption_channels, model_max_length=text_len,
            mlp_ratio=self.mlp_ratio, pred_sigma=self.pred_sigma, input_size=self.input_size,
            space_scale=self.space_scale, time_scale=self.time_scale,
        )  # fmt: skip

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
        self._check_video(x)
        timestep = self._check_timestep(timestep, x)
        self._check_text(y, mask, x.shape[0])
        self._check_force_drop_ids(force_drop_ids, x.shape[0])
        return timestep

    def _check_video(self, x, pad_to_patch: bool = False) -> None:
        """x must be a floating (B, in_channels, T, H, W) video whose T, H, W are positive multiples
        of the patch size (with ``pad_to_patch``: positive, the model pads them up)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            got = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating (B, C={self.in_channels}, T, H, W) latent video, got {got}")
        C = x.shape[1]
        if C != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        for name, size, p in zip("THW", x.shape[2:], self.patch_size):
            if size == 0 or (size % p and not pad_to_patch):
                raise ValueError(f"x: {name} = {size} is not a positive multiple of the patch size {p} ({tuple(x.shape)})")

    @staticmethod
    def _check_timestep(timestep, x: torch.Tensor) -> torch.Tensor:
        """timestep: one per sample, (B,), or a 0-d tensor / number broadcast over the batch -> (B,)."""
        B = x.shape[0]
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if tuple(timestep.shape) != (B,):
            raise ValueError(f"timestep: expected shape ({B},) (one step per sample), got {tuple(timestep.shape)}")
        return timestep

    def _check_text(self, y, mask, B: int) -> None:
        """y (B, 1, L, caption_channels) with 1 <= L <= model_max_length; mask None or (B, L) of 0/1
        with at least one real token per sample (a data-dependent check, skipped while compiling)."""
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

    @staticmethod
    def _check_force_drop_ids(force_drop_ids, B: int) -> None:
        if force_drop_ids is not None and (
            not isinstance(force_drop_ids, torch.Tensor) or tuple(force_drop_ids.shape) != (B,)
        ):
            raise ValueError(f"force_drop_ids: expected a ({B},) tensor of 0/1, got {force_drop_ids!r:.80}")

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

    def _run_blocks(self, x: torch.Tensor, blocks, first: nn.Module, t6: torch.Tensor) -> torch.Tensor:
        """blocks(x): the block stack on tokens x (B, N, C), or what an open stdit.models.accel.FastSampling
        context's step cache gives instead. Its change signal, computed only there, is block ``first``'s
        modulated input: LayerNorm, then the shift / scale of its table plus t6 (B, 6C)."""
        fast = self.fast_sampling
        if fast is None:
            return blocks(x)

        def probe() -> torch.Tensor:
            shift, scale = (first.scale_shift_table[None, :2] + t6.reshape(t6.shape[0], 6, -1)[:, :2]).chunk(2, 1)
            return modulate(first.norm1(x), shift, scale)

        return fast.run_blocks(x, probe, blocks)

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """block(*args, attention backend, fused ops), checkpointed when asked for in training."""
        args = (*args, self.attention_backend, self.fused_ops)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            # The layout's contexts let a recomputation see the token split of its own forward.
            return torch.utils.checkpoint.checkpoint(
                block, *args, use_reentrant=False, context_fn=self.sequence.checkpoint_contexts
            )
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
