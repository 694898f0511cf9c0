"""Sequence parallelism for STDiT and STDiT3 over a process group, exactly equivalent to one device.

:class:`SequenceParallelSTDiT` never copies the model's code. It sets the model's token layout
(``model.sequence``: which tokens this rank holds, and how the output is gathered) and hooks the
attention modules that need other ranks' tokens, the way torch's tensor-parallel styles prepare a
module's inputs and outputs with forward hooks. Every rank of the sequence-parallel (sp) group holds
the same parameters and gets the same full inputs.

- ``"dsp"`` (Dynamic Sequence Parallelism, arXiv 2403.10266): a rank holds whole frames. Everything
  per frame or per token runs locally; around each temporal attention module one all-to-all moves
  its C-wide input from frame shards to position shards (all T frames of S/sp positions) and one moves
  its output back. Two all-to-alls per block, 2C per token.
- ``"ulysses"`` (DeepSpeed-Ulysses where STDiT needs it): a rank holds the same S/sp positions of
  every frame, so temporal attention (one position, all T frames) is local. Around the spatial
  attention core the qkv (3C) all-to-all trades positions for heads and the output (C) comes back;
  needs num_heads % sp == 0. Two all-to-alls per block, 4C per token.
- ``"ulysses_generic"``: the same plus the pair around the temporal core, as DeepSpeed-Ulysses
  applied to every attention does (the DSP paper's baseline). Four all-to-alls per block, 8C.

"Block" is a unit of depth: an STDiT block (spatial and temporal attention inside), or an STDiT3
pair ``spatial_blocks[i]``, ``temporal_blocks[i]``; the exchanges are the same. For STDiT3 the hooked
modules are the temporal blocks' ``attn`` (dsp) and the spatial (and temporal) blocks' ``attn.core``
(ulysses); what else differs is per frame and stays local:
- the per-frame conditioning ``x_mask`` (B, T) follows the frames: the model hands it to
  ``model.sequence.split`` as its per-frame table, and a frame shard gets its own frames' rows;
- RoPE rotates by frame index inside temporal attention, which always sees all T frames in order
  (dsp moves to position shards before it, Ulysses keeps every frame), so positions stay 0..T-1;
- q/k RMSNorm gains are per head dim, the same for every head, so a rank holding H/sp heads
  applies them unchanged (their gradients add up over ranks as every other parameter's);
- inputs padded up to the patch (STDiT3 takes any size) are split on the padded patch grid.

T or S need not divide by sp: shards are contiguous and uneven (:func:`split_sizes`), every exchange
is one ``all_to_all_single`` with per-rank split sizes, and nothing is padded. Why the per-rank
gradients add up (not average) to the single-device gradient is explained at :meth:`sync_grads`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MODES", "SequenceParallelSTDiT", "ShardInfo", "comm_bytes_per_block", "split_sizes"]

MODES = ("dsp", "ulysses", "ulysses_generic")


def split_sizes(n: int, parts: int) -> list[int]:
    """Contiguous uneven split of n items into ``parts`` (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


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

    With T_r frames and S_r positions on rank r (:func:`split_sizes`) and C = hidden:
    - dsp: to position shards sends B*T_r*(S - S_r)*C, back to frame shards B*(T - T_r)*S_r*C;
    - ulysses, around spatial attention: qkv sends B*T*S_r*3C*(sp-1)/sp, the output B*T*(S - S_r)*C/sp;
    - ulysses_generic: that twice (spatial and temporal attention).
    A block is one unit of depth: an STDiT block or an STDiT3 spatial + temporal block pair (T and S
    on the patch grid, padded sizes for STDiT3). The self chunk of an all-to-all is a local copy and
    not counted. ``rank=None`` averages over ranks, which is every rank's amount when T and S divide
    by sp: dsp 2*B*T*S*C*(sp-1)/sp^2, ulysses 2x and ulysses_generic 4x that. The backward moves the
    same amount again.
    """
    _check_mode(mode)
    T, S, C, B = frames, tokens_per_frame, hidden, batch
    Ts, Ss = split_sizes(T, sp), split_sizes(S, sp)
    attentions = 2 if mode == "ulysses_generic" else 1  # self-attentions wrapped in all-to-alls

    def one(r: int) -> float:
        if mode == "dsp":
            elems = B * Ts[r] * (S - Ss[r]) * C + B * (T - Ts[r]) * Ss[r] * C
        else:
            elems = attentions * (B * T * Ss[r] * 3 * C * (sp - 1) // sp + B * T * (S - Ss[r]) * C // sp)
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
    """chunks (one per destination rank) -> received tensors (one per source rank). The backward is
    the reverse exchange, so a moved token's gradient returns to the rank that produced it."""

    @staticmethod
    def forward(ctx, group, rank, recv_shapes, stats, *chunks):
        ctx.group, ctx.rank, ctx.stats = group, rank, stats
        ctx.send_shapes = [tuple(c.shape) for c in chunks]
        ctx.recv_shapes = recv_shapes
        ctx.dtype, ctx.device = chunks[0].dtype, chunks[0].device
        stats["forward_bytes"] += sum(c.numel() * c.element_size() for j, c in enumerate(chunks) if j != rank)
        stats["forward_calls"] += 1
        return tuple(_exchange([c.contiguous() for c in chunks], recv_shapes, group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [
            torch.zeros(s, dtype=ctx.dtype, device=ctx.device) if g is None else g.contiguous()
            for g, s in zip(grads, ctx.recv_shapes)
        ]
        ctx.stats["backward_bytes"] += sum(g.numel() * g.element_size() for i, g in enumerate(grads) if i != ctx.rank)
        return (None, None, None, None, *_exchange(grads, ctx.send_shapes, ctx.group))


class _GatherTakeSlice(torch.autograd.Function):
    """Forward: every rank's shard -> the full tensor (concatenated along ``dim`` in rank order).
    Backward: this rank's slice of the gradient, no communication (see sync_grads for why)."""

    @staticmethod
    def forward(ctx, shard, dim, sizes, group, rank, stats):
        ctx.dim, ctx.sizes, ctx.rank = dim, sizes, rank
        shapes = [tuple(n if d == dim else s for d, s in enumerate(shard.shape)) for n in sizes]
        shard = shard.contiguous()
        stats["gather_bytes"] += shard.numel() * shard.element_size() * (len(sizes) - 1)
        return torch.cat(_exchange([shard] * len(sizes), shapes, group), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]), None, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# ------------------------------------------------------------------------------------------------
# The layout: which tokens a rank holds, and the hooks that exchange them
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """Which part of the final-layer output (B, T_r, S_r, prod(patch) * out_channels) a rank holds:
    patch-grid frames ``frames`` and flattened patch positions ``tokens`` (h*W' + w) of ``grid``."""

    frames: slice
    tokens: slice
    grid: tuple[int, int, int]
    mode: str


@dataclass(frozen=True)
class _Plan:
    """One forward's split: T frames of S positions, per-rank sizes Ts / Ss; ``replicated`` when the
    input is too small to shard (every rank then computes everything)."""

    T: int
    S: int
    Ts: list[int]
    Ss: list[int]
    replicated: bool


class _ShardedSequence:
    """``model.sequence`` under sequence parallelism (the interface of stdit.models.base.WholeSequence).

    ``split`` records the current forward's plan and the hooks read it. An activation-checkpointed
    block recomputes in the backward, possibly after a forward of another shape: checkpoint_contexts
    hands the recomputation the plan its own forward used.
    """

    def __init__(self, group, mode: str, sp: int, rank: int, stats: dict):
        self.group, self.mode, self.sp, self.rank, self.stats = group, mode, sp, rank, stats
        self.plan: _Plan | None = None

    def plan_for(self, grid: tuple[int, int, int]) -> _Plan:
        T, S = grid[0], grid[1] * grid[2]
        small = (self.mode == "dsp" and T < self.sp) or S < self.sp
        return _Plan(T, S, split_sizes(T, self.sp), split_sizes(S, self.sp), small)

    def shard_slices(self, plan: _Plan) -> tuple[slice, slice]:
        r = self.rank
        if self.mode == "dsp":
            t0 = sum(plan.Ts[:r])
            return slice(t0, t0 + plan.Ts[r]), slice(0, plan.S)
        s0 = sum(plan.Ss[:r])
        return slice(0, plan.T), slice(s0, s0 + plan.Ss[r])

    def split(self, x: torch.Tensor, grid: tuple[int, int, int], per_frame: torch.Tensor | None):
        """x (B, T*S, C) -> (this rank's tokens (B, T_r*S_r, C), T_r, per_frame[:, this rank's frames]).

        ``per_frame``: a tensor whose dim 1 runs over the T frames (STDiT's temporal table (1, T, C),
        STDiT3's x_mask (B, T)) or None; its rows follow the frames the rank holds."""
        self.plan = plan = self.plan_for(grid)
        if plan.replicated:  # e.g. images (T = 1) in a video stage: see _ScaleGrad in gather
            return x, plan.T, per_frame
        frames, tokens = self.shard_slices(plan)
        B, _, C = x.shape
        x = x.view(B, plan.T, plan.S, C)[:, frames, tokens]  # the backward is zero outside this shard
        return x.reshape(B, -1, C), x.shape[1], None if per_frame is None else per_frame[:, frames]

    def gather(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        plan = self._current(grid)
        if plan.replicated:
            # Every rank computed the whole output; the sum of the ranks' gradients must count it once.
            return _ScaleGrad.apply(tokens, 1.0 / self.sp)
        B, _, P = tokens.shape
        Tl, Sl = (plan.Ts[self.rank], plan.S) if self.mode == "dsp" else (plan.T, plan.Ss[self.rank])
        dim, sizes = (1, plan.Ts) if self.mode == "dsp" else (2, plan.Ss)
        full = _GatherTakeSlice.apply(tokens.view(B, Tl, Sl, P), dim, sizes, self.group, self.rank, self.stats)
        return full.reshape(B, plan.T * plan.S, P)

    def checkpoint_contexts(self):
        plan = self.plan  # the plan of the forward that is checkpointing a block now
        return contextlib.nullcontext(), self._using(plan)

    @contextlib.contextmanager
    def _using(self, plan: _Plan | None):
        saved, self.plan = self.plan, plan
        try:
            yield
        finally:
            self.plan = saved

    def _current(self, grid=None) -> _Plan:
        if self.plan is None or (grid is not None and (self.plan.T, self.plan.S) != (grid[0], grid[1] * grid[2])):
            raise RuntimeError("sequence parallel: no split of this input; call the model, not its blocks")
        return self.plan

    def _a2a(self, chunks: list[torch.Tensor], recv_shapes: list[tuple]) -> list[torch.Tensor]:
        return _AllToAll.apply(self.group, self.rank, [tuple(s) for s in recv_shapes], self.stats, *chunks)

    # dsp: around each temporal attention module (its input x is C wide, not the 3C of qkv)
    def dsp_in(self, module, args, kwargs):
        """x (B, T_r*S, C), T_r frames -> x (B, T*S_r, C), T frames."""
        p = self._current()
        if p.replicated:
            return None
        x, _num_frames, *rest = args
        B, _, C = x.shape
        r = self.rank
        chunks = list(x.view(B, p.Ts[r], p.S, C).split(p.Ss, dim=2))  # to rank j: my frames, its positions
        recv = self._a2a(chunks, [(B, p.Ts[i], p.Ss[r], C) for i in range(self.sp)])
        return (torch.cat(recv, dim=1).reshape(B, p.T * p.Ss[r], C), p.T, *rest), kwargs

    def dsp_out(self, module, args, out):
        """out (B, T*S_r, C) -> (B, T_r*S, C), back to frame shards."""
        p = self._current()
        if p.replicated:
            return None
        B, _, C = out.shape
        r = self.rank
        chunks = list(out.view(B, p.T, p.Ss[r], C).split(p.Ts, dim=1))  # to rank j: its frames, my positions
        recv = self._a2a(chunks, [(B, p.Ts[r], p.Ss[i], C) for i in range(self.sp)])
        return torch.cat(recv, dim=2).reshape(B, p.Ts[r] * p.S, C)

    # ulysses: around the spatial attention core (ulysses_generic: the temporal one too)
    def ulysses_in(self, module, args, kwargs):
        """qkv (B, T*S_r, 3, H, D) -> (B, T*S, 3, H/sp, D): all positions, this rank's heads."""
        p = self._current()
        if p.replicated:
            return None
        qkv, num_frames = args
        B, _, _, H, D = qkv.shape
        r, Hl = self.rank, H // self.sp
        chunks = list(qkv.view(B, p.T, p.Ss[r], 3, H, D).split(Hl, dim=4))  # to rank j: my positions, its heads
        recv = self._a2a(chunks, [(B, p.T, p.Ss[i], 3, Hl, D) for i in range(self.sp)])
        return (torch.cat(recv, dim=2).reshape(B, p.T * p.S, 3, Hl, D), num_frames), kwargs

    def ulysses_out(self, module, args, out):
        """out (B, T*S, H/sp, D) -> (B, T*S_r, H, D): this rank's positions, all heads."""
        p = self._current()
        if p.replicated:
            return None
        B, _, Hl, D = out.shape
        r = self.rank
        chunks = list(out.view(B, p.T, p.S, Hl, D).split(p.Ss, dim=2))  # to rank i: its positions, my heads
        recv = self._a2a(chunks, [(B, p.T, p.Ss[r], Hl, D) for _ in range(self.sp)])
        return torch.cat(recv, dim=3).reshape(B, p.T * p.Ss[r], Hl * self.sp, D)


# ------------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(spatial, temporal) self-attention modules, one of each per unit of depth: STDiT's
    ``blocks[i].attn`` / ``blocks[i].attn_temp``, STDiT3's ``spatial_blocks[i].attn`` /
    ``temporal_blocks[i].attn``. Each has a parameter-free ``core`` between its projections."""
    if hasattr(model, "spatial_blocks") and hasattr(model, "temporal_blocks"):
        return [b.attn for b in model.spatial_blocks], [b.attn for b in model.temporal_blocks]
    if hasattr(model, "blocks") and all(hasattr(b, "attn_temp") for b in model.blocks):
        return [b.attn for b in model.blocks], [b.attn_temp for b in model.blocks]
    raise TypeError(
        f"model: sequence parallelism takes STDiT (blocks with attn / attn_temp) or STDiT3 (spatial_blocks / "
        f"temporal_blocks), got {type(model).__name__}"
    )


class SequenceParallelSTDiT(nn.Module):
    """Sequence-parallel forward of an STDiT or STDiT3 (parameters replicated over the ranks of ``group``).

    Args:
        model: the STDiT or STDiT3 (same parameters on every rank, e.g. same seed or broadcast). It is
            changed in place: its token layout is set and its attention modules are hooked.
        group: the sp process group (None: the default group).
        mode: "dsp", "ulysses" or "ulysses_generic" (see the module docstring).

    ``forward(x, timestep, *args, gather_output=True, **kwargs)`` takes the model's own arguments
    (full inputs, identical on every rank: STDiT's ``y, mask, force_drop_ids``, STDiT3's ``y, mask,
    x_mask, fps, height, width, ...``) and returns the full output (B, out_C, T, H, W) float32, or
    with ``gather_output=False`` a pair (this rank's final-layer tokens (B, T_r, S_r, P),
    :class:`ShardInfo`). After ``loss.backward()`` on every rank, :meth:`sync_grads` gives every rank
    the single-device gradients. ``comm_stats``: bytes sent to other ranks by the all-to-alls
    (forward, including recomputation under activation checkpointing; backward) and by the output
    gather.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None, mode: str = "dsp"):
        super().__init__()
        _check_mode(mode)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallelSTDiT needs an initialised torch.distributed process group")
        spatial, temporal = _attention_modules(model)
        self.model, self.group, self.mode = model, group, mode
        self.sp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if mode != "dsp" and model.num_heads % self.sp:
            raise ValueError(
                f"{mode}: num_heads = {model.num_heads} is not divisible by the sequence-parallel size "
                f"sp = {self.sp} (heads are split across ranks); use mode='dsp' or another sp size"
            )
        self.comm_stats: dict[str, int] = {}
        self.reset_comm_stats()
        self.layout = _ShardedSequence(group, mode, self.sp, self.rank, self.comm_stats)
        model.sequence = self.layout
        if mode == "dsp":
            for attn in temporal:
                attn.register_forward_pre_hook(self.layout.dsp_in, with_kwargs=True)
                attn.register_forward_hook(self.layout.dsp_out)
        else:
            for attn in spatial + (temporal if mode == "ulysses_generic" else []):
                attn.core.register_forward_pre_hook(self.layout.ulysses_in, with_kwargs=True)
                attn.core.register_forward_hook(self.layout.ulysses_out)

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's blocks (data parallelism shards them one by one): STDiT's ``blocks``, STDiT3's
        spatial and temporal blocks in the order they run."""
        if hasattr(self.model, "spatial_blocks"):
            pairs = zip(self.model.spatial_blocks, self.model.temporal_blocks)
            return nn.ModuleList([block for pair in pairs for block in pair])
        return self.model.blocks

    def reset_comm_stats(self) -> None:
        self.comm_stats.update(forward_bytes=0, backward_bytes=0, forward_calls=0, gather_bytes=0)

    def forward(self, x, timestep, *args, gather_output: bool = True, **kwargs):
        if gather_output:
            return self.model(x, timestep, *args, **kwargs)
        # the patch grid of the (for STDiT3: padded) input
        grid = tuple(-(-n // p) for n, p in zip(x.shape[2:], self.model.patch_size))
        if self.layout.plan_for(grid).replicated:
            T, S = grid[0], grid[1] * grid[2]
            raise ValueError(
                f"sequence parallel ({self.mode}): {T} frames x {S} positions per frame cannot be split "
                f"over sp = {self.sp} ranks without an empty shard (needs "
                f"{'frames >= sp and ' if self.mode == 'dsp' else ''}positions >= sp)"
            )
        for key in ("ar", "num_frames"):  # forward() accepts and ignores them (STDiT3); forward_tokens does not
            kwargs.pop(key, None)
        tokens, grid = self.model.forward_tokens(x, timestep, *args, **kwargs)
        frames, positions = self.layout.shard_slices(self.layout.plan)
        B = tokens.shape[0]
        shard = tokens.view(B, frames.stop - frames.start, positions.stop - positions.start, -1)
        return shard, ShardInfo(frames, positions, grid, self.mode)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """All-reduce (SUM) the parameter gradients over the sp group.

        Every rank computes the same loss from the same gathered output. The gather's backward hands
        each rank the gradient of its own shard only, and every all-to-all's backward returns a moved
        token's gradient to the rank that produced it, so each piece of the single-device graph is
        backpropagated exactly once, on one rank. The embedders run on every rank, but rank r's
        backward through them carries only the gradient flowing from rank r's shard. Summed over the
        ranks these are the single-device gradient (an average would divide it by sp); data
        parallelism across sp groups averages separately, as usual.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads or self.sp == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
