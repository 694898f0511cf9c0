"""Hybrid parallelism on torch.distributed: one validated dp x sp layout on a DeviceMesh and data
parallel wrapping (FSDP2 or DDP); checkpoints are stdit.train.distributed_checkpoint's.

Launch with torchrun (single- or multi-node); nothing here launches processes or implements
collectives itself:

    torchrun --nproc_per_node=8 -m stdit.train train --config stage.toml   # [parallel] dp = 4, sp = 2

Layout. ``world = dp * sp``; the mesh has dims ("dp", "sp"), sp innermost, so an sp group is
``sp`` consecutive ranks (one node's NVLink domain when sp <= GPUs per node). Every rank of an sp
group sees the same batch (the data loader is sharded by dp rank); each computes its share of the
sequence (stdit.train.sequence_parallel) and its parameter gradients cover only its share.

Gradients. The data-parallel wrapper (FSDP2 or DDP) spans ALL ranks and averages gradients over
the world. Each sp rank's gradient is its shard's contribution, so the average over the world is
(1/sp) x the dp-average of the full gradients; ``loss_scale(cfg)`` = sp undoes that (multiply the
loss by it before backward). This keeps one data-parallel group and no custom all-reduce.

Wrapping order (fixed, documented so memory and speed are reproducible): activation checkpointing
(the model's own ``checkpoint`` flag, per block) -> torch.compile per block (``compile_blocks``)
-> FSDP2 ``fully_shard`` per block, then on the root (ZeRO-3 style; bf16 parameters with fp32
gradient reduction on GPU) | or DDP on the root. Sequence parallelism only hooks the blocks'
attention modules, so FSDP2 shards per block under it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .sequence_parallel import MODES as SP_MODES

DATA_PARALLEL = ("fsdp2", "ddp")
ENGINES = ("torch", "colossalai")


@dataclass
class ParallelConfig:
    dp: int = 1
    sp: int = 1
    sp_mode: str = "dsp"
    data_parallel: str = "fsdp2"
    engine: str = "torch"
    plugin: str = "zero2"  # engine = "colossalai": "zero2" (LowLevelZero stage 2, Open-Sora's), "hybrid", "ddp"
    compile_blocks: bool = False

    def validate(self, world_size: int | None = None, num_heads: int | None = None) -> ParallelConfig:
        """Raise ValueError naming the field for a layout that cannot run; returns self."""
        for name in ("dp", "sp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name}: expected an int >= 1, got {v!r}")
        if self.sp_mode not in SP_MODES:
            raise ValueError(f"parallel.sp_mode: expected one of {SP_MODES}, got {self.sp_mode!r}")
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(f"parallel.data_parallel: expected one of {DATA_PARALLEL}, got {self.data_parallel!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"parallel.engine: expected one of {ENGINES}, got {self.engine!r}")
        if self.plugin not in ("zero2", "hybrid", "ddp"):
            raise ValueError(f"parallel.plugin: expected one of ('zero2', 'hybrid', 'ddp'), got {self.plugin!r}")
        if self.engine == "colossalai" and self.sp > 1:
            raise ValueError("parallel.sp: sequence parallelism runs on engine = 'torch' only; use sp = 1 with colossalai")
        if world_size is not None and self.dp * self.sp != world_size:
            raise ValueError(
                f"parallel: dp x sp = {self.dp} x {self.sp} = {self.dp * self.sp} must equal the number of "
                f"processes ({world_size}); launch with torchrun --nproc_per_node=... to match"
            )
        if num_heads is not None and self.sp > 1 and self.sp_mode != "dsp" and num_heads % self.sp:
            raise ValueError(
                f"parallel.sp: {self.sp_mode} splits attention heads, so num_heads = {num_heads} must be a "
                f"multiple of sp = {self.sp}; use sp_mode = 'dsp' (no such constraint) or another sp"
            )
        return self


def loss_scale(cfg: ParallelConfig) -> float:
    """Multiply the loss by this so world-averaged gradients equal dp-averaged full gradients."""
    return float(cfg.sp)


# ----------------------------------------------------------------------------------------------------
# Process group and mesh
# ----------------------------------------------------------------------------------------------------


def init_distributed(device_type: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (env://): NCCL on GPUs, gloo on CPUs.

    Returns (rank, world_size, device). A plain single process (no torchrun) returns (0, 1, device)
    without creating a group.
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device_type)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_mesh(cfg: ParallelConfig, device: torch.device):
    """The ("dp", "sp") DeviceMesh for this world (validated)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg.validate(world_size=world)
    return init_device_mesh(device.type, (cfg.dp, cfg.sp), mesh_dim_names=("dp", "sp"))


# ----------------------------------------------------------------------------------------------------
# Data parallel wrapping
# ----------------------------------------------------------------------------------------------------


def wrap_data_parallel(model: nn.Module, cfg: ParallelConfig, device: torch.device, *, bf16: bool = False) -> nn.Module:
    """FSDP2 (``fully_shard`` per block then root) or DDP over every rank (see the module docstring).

    ``bf16``: FSDP2 mixed precision with bf16 parameters/compute and fp32 gradient reduction.
    Returns the module to call (the model itself for FSDP2, a DDP wrapper for DDP).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if cfg.compile_blocks:
        for block in getattr(model, "blocks", []):
            block.compile()
    if cfg.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("world",))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
