"""Multi-process sampling under torchrun: classifier-free-guidance parallel and sequence parallel (DSP).

Both samplers (IDDPM for STDiT, rectified flow for STDiT3) evaluate the model once per step on a
doubled batch, the conditional half first. Two ways to spread that evaluation over processes, which
compose (world = cfg x sp, cfg in {1, 2}):

- CFG parallel (``cfg = 2``): the conditional half runs on one branch of ranks and the unconditional
  half on the other; :class:`CFGParallel` slices every batched argument (leading dim 2B) to its branch's
  half and all-gathers the two outputs back into the doubled batch, so the sampler is unchanged.
- Sequence parallel (``sp > 1``): within a branch, the ranks split the video's tokens with
  stdit.train.sequence_parallel.SequenceParallelSTDiT (DSP by default: frame shards, two all-to-alls
  per block); every rank gets the full output.

Rank r is (branch r // sp, position r % sp): sp groups are the ranks of one branch, cfg groups the
two ranks at one position. Every rank runs the same sampler loop from the same generator seed, so the
starting noise and per-step noise agree, and every rank ends with the same latents; rank 0 decodes
and writes the video. With stdit.models.accel.FastSampling, :meth:`ParallelSampling.reduce` sums the
step cache's change over all ranks, so each rank decides as one process would (broadcast decisions
depend only on the step). The result equals one process's up to the reduction order of the split
matmuls and sums (float64 on CPU: tests/train/test_parallel_sample.py).

Dimension alphabet: B batch (per branch), C channels, T frames, H, W latent height and width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .parallel import init_distributed
from .sequence_parallel import MODES, SequenceParallelSTDiT

__all__ = ["CFGParallel", "ParallelSampling", "build_layout", "init_parallel_sampling"]


@dataclass
class ParallelSampling:
    """This process's place in a cfg x sp sampling layout (see the module docstring)."""

    cfg: int
    sp: int
    sp_mode: str
    rank: int
    device: torch.device
    cfg_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    group: dist.ProcessGroup | None = None  # all ranks of the layout (None: the whole world)

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    @property
    def branch(self) -> int:
        """0: the conditional half, 1: the unconditional half (0 without CFG parallel)."""
        return self.rank // self.sp

    @property
    def writes(self) -> bool:
        """Whether this process decodes and writes the result (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The callable the sampler gets: ``model`` made sequence parallel over the sp group (in place
        when sp > 1) under a :class:`CFGParallel` (which splits the guidance halves when cfg is 2).
        Call before FastSampling."""
        inner = SequenceParallelSTDiT(model, self.sp_group, self.sp_mode) if self.sp > 1 else model
        return CFGParallel(inner, model, self.cfg_group if self.cfg > 1 else None, self.branch)

    def reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over every rank in place (FastSampling's step-cache statistics)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def describe(self) -> str:
        parts = [f"cfg-parallel x{self.cfg}"] if self.cfg > 1 else []
        parts += [f"{self.sp_mode} x{self.sp}"] if self.sp > 1 else []
        return " + ".join(parts) or "one process"


def init_parallel_sampling(cfg_parallel: bool = False, sp_size: int = 1, sp_mode: str = "dsp",
                           device: str | None = None) -> ParallelSampling:  # fmt: skip
    """Join torchrun's process group and build the cfg and sp groups.

    cfg_parallel: the two guidance halves on two branches of ranks; sp_size: ranks per branch that split
    the tokens; sp_mode: "dsp" (default), "ulysses" or "ulysses_generic". The world size torchrun set
    must be (2 if cfg_parallel else 1) * sp_size. Without torchrun and with nothing asked, one process.
    """
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size: expected an integer >= 1, got {sp_size!r}")
    if sp_mode not in MODES:
        raise ValueError(f"sp_mode: expected one of {MODES}, got {sp_mode!r}")
    cfg = 2 if cfg_parallel else 1
    wanted = cfg * sp_size
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if wanted > 1 and not launched:
        raise RuntimeError(f"parallel sampling ({'cfg-parallel x2, ' if cfg_parallel else ''}sp {sp_size}) needs "
                           f"{wanted} processes: run it as `torchrun --nproc-per-node {wanted} -m stdit.train sample ...`")
    if launched and int(os.environ["WORLD_SIZE"]) != wanted:
        raise ValueError(f"world size: torchrun started {os.environ['WORLD_SIZE']} processes, but --cfg-parallel "
                         f"({cfg}) x --sp-size ({sp_size}) needs {wanted}; use --nproc-per-node {wanted}")
    rank, world, dev = init_distributed(device)
    if world == 1:
        return ParallelSampling(1, 1, sp_mode, 0, dev, None, None, None)
    return build_layout(list(range(world)), cfg, sp_size, sp_mode, dev)


def build_layout(ranks: list[int], cfg: int, sp: int, sp_mode: str, device: torch.device) -> ParallelSampling | None:
    """The cfg x sp layout over the global ``ranks`` (len = cfg * sp, in layout order) in an initialised
    process group: its groups are created (every process of the world must call this, with the same
    arguments, in the same order) and this process's place is returned, or None when it is not one of
    ``ranks``."""
    if cfg not in (1, 2) or sp < 1 or len(ranks) != cfg * sp:
        raise ValueError(f"ranks: a cfg ({cfg}) x sp ({sp}) layout needs {cfg * sp} ranks, got {len(ranks)}")
    me = dist.get_rank()
    whole = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else None
    sp_group = cfg_group = None
    for branch in range(cfg):
        g = dist.new_group([ranks[branch * sp + j] for j in range(sp)])
        if me in ranks and ranks.index(me) // sp == branch:
            sp_group = g
    for j in range(sp):
        g = dist.new_group([ranks[branch * sp + j] for branch in range(cfg)])
        if me in ranks and ranks.index(me) % sp == j:
            cfg_group = g
    if me not in ranks:
        return None
    return ParallelSampling(cfg, sp, sp_mode, ranks.index(me), device, cfg_group, sp_group, whole)


class CFGParallel(nn.Module):
    """The model's call on the doubled batch (2B, conditional half first) for the samplers.

    With ``group`` (CFG parallel) every tensor argument whose leading dim is 2B is cut to this
    ``branch``'s B rows, ``module`` runs, and the halves are all-gathered over ``group`` into the (2B, ...)
    output; without it ``module`` gets the whole batch. ``module`` is the model or its
    SequenceParallelSTDiT; attributes the samplers read (``y_embedder`` for STDiT3's null caption,
    ``in_channels``, ...) come from ``model``."""

    def __init__(self, module: nn.Module, model: nn.Module, group: dist.ProcessGroup | None = None, branch: int = 0):
        super().__init__()
        self.module = module
        self.group, self.branch = group, branch
        self._model = [model]  # a list: not registered a second time

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._model[0], name)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.group is None:
            return self.module(x, timestep, *args, **kwargs)
        B2 = x.shape[0]
        if B2 % 2:
            raise ValueError(f"x: CFG parallel needs the doubled batch (conditional + unconditional halves), got "
                             f"batch {B2}")
        B = B2 // 2
        lo = self.branch * B

        def half(v):
            return v[lo:lo + B] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B2 else v

        out = self.module(half(x), half(timestep), *(half(a) for a in args), **{k: half(v) for k, v in kwargs.items()})
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts)
