"""Sequence parallelism for STDiT over a process group, exactly equivalent to one device.

:class:`SequenceParallelSTDiT` wraps (does not copy) an :class:`stdit.models.stdit.STDiT`. Every rank
of the sequence-parallel (sp) group holds the same parameters and gets the SAME full inputs; each
rank does its share of the block work and, with ``gather_output=True``, returns the full output.

Two modes
---------
``"dsp"`` (Dynamic Sequence Parallelism, arXiv 2403.10266). Tokens are laid out (B, T, S, C).
    Each rank holds a slice of the FRAMES (all S positions of its frames) for everything that is
    per frame or per token: norm + modulate, spatial attention, cross-attention, MLP, gated
    residuals. Around temporal attention one all-to-all switches the block's temporal-attention
    INPUT x (C channels per token; not qkv, 3C) to a slice of the SPATIAL positions with all T
    frames; the temporal pos-emb (block 0 only) is added, qkv / temporal attention / proj run
    locally, and one all-to-all of the (C-wide) output switches back. Two all-to-alls per block.

``"ulysses"`` (DeepSpeed-Ulysses as Open-Sora applies it, but sharding the spatial positions S of
    every frame, so a spatial attention never mixes frames: Open-Sora 1.0 sharded the flattened
    T*S axis, issue #296). Each rank holds the same S slice of every frame. Around each
    self-attention (spatial AND temporal, as generic Ulysses does) the qkv projection (3C) is
    all-to-all'ed from sequence-sharded / all heads to full sequence / heads-sharded, attention runs
    on the full sequence for num_heads/sp heads, and the output (C) is all-to-all'ed back. Needs
    num_heads % sp == 0. Cross-attention needs no communication (queries local, text replicated).
    Four all-to-alls per block. (Under S sharding the temporal all-to-alls are not actually needed,
    each rank already has all frames of its positions; they are kept so the mode is the Ulysses
    baseline the DSP paper compares against.)

Uneven sizes
------------
T or S need not be divisible by sp: shards are contiguous and uneven (the first ``n % sp`` ranks
get one more, like ``torch.tensor_split``), and every all-to-all is a single flat
``all_to_all_single`` with per-rank ``input_split_sizes`` / ``output_split_sizes`` (gloo and nccl
support them). Nothing is padded, so every attention sees exactly the real tokens. The only refusal
is a shard that would be empty (T < sp in DSP mode, S < sp in either mode): ValueError naming sizes.

Gradients (why ``sync_grads`` SUMS)
-----------------------------------
All ranks compute the same loss from the same gathered output. The gathered output's backward
("all-gather forward, take my slice backward") hands each rank only the gradient of ITS shard.
Every all-to-all's backward is the reverse all-to-all, so gradients of tokens that moved are sent
back to the rank that produced them. Hence every piece of the single-device computation graph is
backpropagated exactly once, on exactly one rank:

- block work on a shard runs on one rank only;
- the embedders (patch / timestep / caption / t_block) run fully on every rank on replicated
  inputs, but rank r's backward through them carries only the gradient flowing from rank r's
  shard (the patch tokens are sliced to the shard; t, t0 and the caption features are used by the
  rank's own tokens only). Summed over ranks these give the single-device gradient, never more.

So the single-device gradient of the loss is the SUM over ranks of the per-rank parameter
gradients: :meth:`SequenceParallelSTDiT.sync_grads` all-reduces with SUM over the sp group (an
average would divide by sp). Data parallelism across sp groups averages separately, as usual.
The loss must be identical on every rank (same inputs, same noise: seed the ranks alike).

Communication accounting: :func:`comm_bytes_per_block` gives the bytes a rank sends to OTHER
ranks per block forward (the self chunk of an all-to-all is a local copy, not counted); the wrapper
counts the actual all-to-all payloads in ``comm_stats`` so the formula can be checked. Per rank, with
even sizes and N = B*T*S tokens: DSP 2*N*C*(sp-1)/sp^2 elements, Ulysses 8*N*C*(sp-1)/sp^2 (qkv 3C +
out C, for both attentions): DSP moves exactly 1/4 of Ulysses' bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

from stdit.kernels import spatial_attention, temporal_attention

__all__ = ["SequenceParallelSTDiT", "ShardInfo", "comm_bytes_per_block", "split_sizes", "MODES"]

MODES = ("dsp", "ulysses")


def split_sizes(n: int, parts: int) -> list[int]:
    """Contiguous uneven split of n items into ``parts`` (first n % parts get one more)."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def comm_bytes_per_block(
    mode: str,
    *,
    batch: int,
    frames: int,
    tokens_per_frame: int,
    hidden: int,
    sp: int,
    elem_bytes: int = 2,
    rank: int | None = None,
) -> float:
    """Bytes one rank sends to the other ranks of the sp group in one block's forward.

    Shards are the contiguous uneven splits of :func:`split_sizes` (T_r frames, S_r positions of
    rank r; C = hidden, heads split evenly so rank r holds C/sp channels of heads):

    - dsp: switch x to S-sharding sends B*T_r*(S - S_r)*C, switch back sends B*(T - T_r)*S_r*C.
    - ulysses, per self-attention (x2: spatial and temporal): qkv sends B*T*S_r*3C*(sp-1)/sp,
      the output back sends B*T*(S - S_r)*C/sp.

    ``rank=None`` returns the average over ranks (total bytes moved / sp), which is every rank's
    amount when T and S divide by sp: dsp 2*B*T*S*C*(sp-1)/sp^2, ulysses 4x that. Backward moves
    the same amount again.
    """
    _check_mode(mode)
    T, S, C, B = frames, tokens_per_frame, hidden, batch
    Ts, Ss = split_sizes(T, sp), split_sizes(S, sp)

    def one(r: int) -> float:
        if mode == "dsp":
            elems = B * Ts[r] * (S - Ss[r]) * C + B * (T - Ts[r]) * Ss[r] * C
        else:
            elems = 2 * (B * T * Ss[r] * 3 * C * (sp - 1) // sp + B * T * (S - Ss[r]) * C // sp)
        return elems * elem_bytes

    if rank is not None:
        return one(rank)
    return sum(one(r) for r in range(sp)) / sp


# ------------------------------------------------------------------------------------------------
# Differentiable communication
# ------------------------------------------------------------------------------------------------


def _exchange(chunks: list[torch.Tensor], recv_shapes: list[tuple], group) -> list[torch.Tensor]:
    """Send chunks[j] to rank j, receive a tensor of recv_shapes[i] from rank i (one flat
    all_to_all_single with uneven splits)."""
    ref = chunks[0]
    send = torch.cat([c.reshape(-1) for c in chunks]) if len(chunks) > 1 else ref.reshape(-1).contiguous()
    in_splits = [c.numel() for c in chunks]
    out_splits = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = torch.empty(sum(out_splits), dtype=ref.dtype, device=ref.device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return [p.view(s) for p, s in zip(recv.split(out_splits), recv_shapes)]


class _AllToAll(torch.autograd.Function):
    """chunks (one per destination rank) -> received tensors (one per source rank). Backward is the
    reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, group, rank, recv_shapes, stats, *chunks):
        ctx.group, ctx.rank, ctx.stats = group, rank, stats
        ctx.send_shapes = [tuple(c.shape) for c in chunks]
        ctx.recv_shapes = recv_shapes
        ctx.dtype, ctx.device = chunks[0].dtype, chunks[0].device
        if stats is not None:
            stats["forward_bytes"] += sum(c.numel() * c.element_size() for j, c in enumerate(chunks) if j != rank)
            stats["forward_calls"] += 1
        return tuple(_exchange([c.contiguous() for c in chunks], recv_shapes, group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [
            torch.zeros(s, dtype=ctx.dtype, device=ctx.device) if g is None else g.contiguous()
            for g, s in zip(grads, ctx.recv_shapes)
        ]
        if ctx.stats is not None:
            ctx.stats["backward_bytes"] += sum(
                g.numel() * g.element_size() for i, g in enumerate(grads) if i != ctx.rank
            )
        out = _exchange(grads, ctx.send_shapes, ctx.group)
        return (None, None, None, None, *out)


def _all_to_all(chunks, recv_shapes, group, rank, stats):
    return _AllToAll.apply(group, rank, [tuple(s) for s in recv_shapes], stats, *chunks)


class _GatherTakeSlice(torch.autograd.Function):
    """Forward: all ranks' shards -> the full tensor (concatenated along ``dim`` in rank order).
    Backward: take this rank's slice of the gradient (no communication). Correct because every rank
    computes the same loss from the same gathered tensor, see the module docstring."""

    @staticmethod
    def forward(ctx, shard, dim, sizes, group, rank, stats):
        ctx.dim, ctx.sizes, ctx.rank = dim, sizes, rank
        sp = len(sizes)
        shapes = []
        for n in sizes:
            s = list(shard.shape)
            s[dim] = n
            shapes.append(tuple(s))
        shard = shard.contiguous()
        if stats is not None:
            stats["gather_bytes"] += shard.numel() * shard.element_size() * (sp - 1)
        parts = _exchange([shard] * sp, shapes, group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]), None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------------


class ShardInfo:
    """Which part of the output a rank holds when ``gather_output=False``: the tensor is the final
    layer's per-token output (B, T_r, S_r, prod(patch) * out_channels) for patch-grid frames
    ``frames`` and flattened patch positions ``tokens`` (h*W' + w) of grid (T', H', W')."""

    def __init__(self, frames: slice, tokens: slice, grid: tuple[int, int, int], mode: str):
        self.frames, self.tokens, self.grid, self.mode = frames, tokens, grid, mode

    def __repr__(self) -> str:
        return f"ShardInfo(mode={self.mode!r}, frames={self.frames}, tokens={self.tokens}, grid={self.grid})"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class SequenceParallelSTDiT(nn.Module):
    """Sequence-parallel forward of a wrapped STDiT (parameters shared, replicated over ranks).

    Args:
        model: the STDiT (same parameters on every rank of ``group``, e.g. same seed or broadcast).
        group: the sp process group (None: the default group).
        mode: "dsp" or "ulysses" (see the module docstring).

    ``forward(x, timestep, y, mask=None, force_drop_ids=None, gather_output=True)`` takes the full
    inputs (identical on every rank) and returns the full output (B, out_C, T, H, W) float32, or with
    ``gather_output=False`` a pair (shard, :class:`ShardInfo`). After ``loss.backward()`` on every
    rank, :meth:`sync_grads` (SUM all-reduce) gives every rank the single-device gradients.

    ``comm_stats``: bytes sent to other ranks by the block all-to-alls (forward / backward, the
    latter includes checkpoint recomputation if model.checkpoint is on) and by the output gather.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None, mode: str = "dsp"):
        super().__init__()
        _check_mode(mode)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallelSTDiT needs an initialised torch.distributed process group")
        self.model = model
        self.group = group
        self.mode = mode
        self.sp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if mode == "ulysses" and model.num_heads % self.sp:
            raise ValueError(
                f"ulysses: num_heads = {model.num_heads} is not divisible by the sequence-parallel size "
                f"sp = {self.sp} (heads are split across ranks); use mode='dsp' or another sp size"
            )
        self.reset_comm_stats()

    def reset_comm_stats(self) -> None:
        self.comm_stats = {"forward_bytes": 0, "backward_bytes": 0, "forward_calls": 0, "gather_bytes": 0}

    # --------------------------------------------------------------------------------------------

    def _a2a(self, chunks, recv_shapes):
        return _all_to_all(chunks, recv_shapes, self.group, self.rank, self.comm_stats)

    def _dsp_to_spatial_shards(self, x, Ts, Ss):
        """(B, T_r, S, C) frame shard -> (B, T, S_r, C) position shard."""
        B, _, _, C = x.shape
        chunks = list(x.split(Ss, dim=2))  # to rank j: my frames, its positions
        recv = self._a2a(chunks, [(B, Ts[i], Ss[self.rank], C) for i in range(self.sp)])
        return torch.cat(recv, dim=1)

    def _dsp_to_frame_shards(self, x, Ts, Ss):
        """(B, T, S_r, C) position shard -> (B, T_r, S, C) frame shard."""
        B, _, _, C = x.shape
        chunks = list(x.split(Ts, dim=1))  # to rank j: its frames, my positions
        recv = self._a2a(chunks, [(B, Ts[self.rank], Ss[i], C) for i in range(self.sp)])
        return torch.cat(recv, dim=2)

    def _ulysses_attention(self, attn: nn.Module, x, Ss, tpe, backend):
        """x (B, T, S_r, C) -> attn's output (B, T, S_r, C): qkv all-to-all to the full sequence with
        num_heads/sp heads, attention, output all-to-all back, proj."""
        B, T, Sr, C = x.shape
        if tpe is not None:
            x = x + tpe[:, :, None]
        H, D, sp = attn.num_heads, attn.head_dim, self.sp
        Hl = H // sp
        qkv = attn.qkv(x).view(B, T, Sr, 3, H, D)
        chunks = list(qkv.split(Hl, dim=4))  # to rank j: my positions, its heads
        recv = self._a2a(chunks, [(B, T, Ss[i], 3, Hl, D) for i in range(sp)])
        qkv_full = torch.cat(recv, dim=2)  # (B, T, S, 3, Hl, D), positions in order
        S = qkv_full.shape[2]
        attend = spatial_attention if attn.kind == "spatial" else temporal_attention
        out = attend(qkv_full.reshape(B, T * S, 3, Hl, D), T, backend=backend).view(B, T, S, Hl, D)
        chunks = list(out.split(Ss, dim=2))  # to rank i: its positions, my heads
        recv = self._a2a(chunks, [(B, T, Sr, Hl, D) for _ in range(sp)])
        out = torch.cat(recv, dim=3)  # (B, T, S_r, H, D), heads in order
        return attn.proj(out.flatten(3))

    def _block(self, block, x, y, t0, y_lens, tpe, Ts, Ss, backend, fused):
        """One STDiT block on this rank's shard x (B, T_r, S_r, C) (dsp: S_r = S; ulysses: T_r = T)."""
        B, Tl, Sl, C = x.shape
        mods = block.scale_shift_table[None] + t0.reshape(B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
        flat = lambda z: z.reshape(B, -1, C)  # noqa: E731

        xn = block._norm_modulate(block.norm1, flat(x), shift_msa, scale_msa, fused)
        if self.mode == "dsp":
            x_s = block.attn(xn, Tl, backend)  # whole frames: spatial attention is local
        else:
            x_s = self._ulysses_attention(block.attn, xn.view(B, Tl, Sl, C), Ss, None, backend)
        x = block._gated_residual(flat(x), gate_msa, flat(x_s), fused).view(B, Tl, Sl, C)

        if self.mode == "dsp":
            x_t = self._dsp_to_spatial_shards(x, Ts, Ss)  # (B, T, S_r, C)
            T, Sr = x_t.shape[1], x_t.shape[2]
            if tpe is not None:
                x_t = x_t + tpe[:, :, None]
            out = block.attn_temp(flat(x_t), T, backend).view(B, T, Sr, C)
            out = self._dsp_to_frame_shards(out, Ts, Ss)  # (B, T_r, S, C)
        else:
            out = self._ulysses_attention(block.attn_temp, x, Ss, tpe, backend)
        x = block._gated_residual(flat(x), gate_msa, flat(out), fused)

        x = x + block.cross_attn(x, y, y_lens, backend)
        x_m = block.mlp(block._norm_modulate(block.norm2, x, shift_mlp, scale_mlp, fused))
        return block._gated_residual(x, gate_mlp, x_m, fused).view(B, Tl, Sl, C)

    def forward(self, x, timestep, y, mask=None, force_drop_ids=None, gather_output: bool = True):
        m = self.model
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            T0 = x.shape[2] // m.patch_size[0]
            S0 = (x.shape[3] // m.patch_size[1]) * (x.shape[4] // m.patch_size[2])
            if gather_output and ((self.mode == "dsp" and T0 < self.sp) or S0 < self.sp):
                # Too small to shard (e.g. images, T = 1, in a video stage): every rank runs the whole
                # model and its gradient is scaled by 1/sp, so the sum over ranks is still exact.
                return _ScaleGrad.apply(m(x, timestep, y, mask, force_drop_ids), 1.0 / self.sp)
        # embedders run fully on every rank (replicated inputs); see the module docstring for grads
        x, t, t0, y, y_lens, grid, tpe = m._embed(x, timestep, y, mask, force_drop_ids)
        B, _, C = x.shape
        T, S = grid[0], grid[1] * grid[2]
        if (self.mode == "dsp" and T < self.sp) or S < self.sp:
            raise ValueError(
                f"sequence parallel ({self.mode}): {T} frames x {S} positions per frame cannot be split "
                f"over sp = {self.sp} ranks without an empty shard (needs "
                f"{'frames >= sp and ' if self.mode == 'dsp' else ''}positions >= sp)"
            )
        Ts, Ss = split_sizes(T, self.sp), split_sizes(S, self.sp)
        To, So = _offsets(Ts), _offsets(Ss)
        r = self.rank
        x = x.view(B, T, S, C)
        if self.mode == "dsp":
            frames, tokens = slice(To[r], To[r + 1]), slice(0, S)
        else:
            frames, tokens = slice(0, T), slice(So[r], So[r + 1])
        x = x[:, frames, tokens]  # backward: zero outside this rank's shard

        backend, fused = m.attention_backend, m.fused_ops
        ckpt = m.checkpoint and m.training and torch.is_grad_enabled()
        for i, block in enumerate(m.blocks):
            args = (block, x, y, t0, y_lens, tpe if i == 0 else None, Ts, Ss, backend, fused)
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(self._block, *args, use_reentrant=False)
            else:
                x = self._block(*args)

        Tl, Sl = x.shape[1], x.shape[2]
        out = m.final_layer(x.reshape(B, Tl * Sl, C), t).view(B, Tl, Sl, -1)
        if not gather_output:
            return out, ShardInfo(frames, tokens, grid, self.mode)
        dim, sizes = (1, Ts) if self.mode == "dsp" else (2, Ss)
        full = _GatherTakeSlice.apply(out, dim, sizes, self.group, r, self.comm_stats)
        return m.unpatchify(full.reshape(B, T * S, -1), grid).float()

    @torch.no_grad()
    def sync_grads(self) -> None:
        """All-reduce (SUM) the parameter gradients over the sp group: each rank holds the gradient
        of its own shard's share of the loss, and the shares add up to the single-device gradient."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads or self.sp == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
