"""Training engines: the ways a stage can run, behind one interface.

``make_engine(cfg, device)`` picks one from the launch and ``[parallel]``:

  Engine                  one process, no torchrun (the others override what differs)
  TorchDistributedEngine  torchrun with engine = "torch": FSDP2 or DDP over all ranks, optionally
                          sequence parallelism (DSP / Ulysses) inside each dp group
  ColossalEngine          engine = "colossalai": ColossalAI's Booster owns data parallelism

Each one ``start``s (wraps the model, builds the optimizer and the EMA, resumes or initialises),
takes a ``step`` (backward, clipping, optimizer step, EMA update), ``save``s a checkpoint of its own
kind and names its ``latest``. Resuming takes the newest checkpoint in the run's folder that the
engine reads: its own kind fully (weights, optimizer, EMA, step, data position), and one process
also a distributed checkpoint (any world size); the distributed engines take only the weights of a
newer single-process checkpoint, restarting optimizer and EMA.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import colossal
from .build import build_optimizer, init_from_previous
from .checkpoint import SINGLE, CheckpointKind, latest, load_checkpoint, save_checkpoint
from .colossal import COLOSSAL
from .config import ConfigError, StageConfig
from .distributed_checkpoint import DCP, load_distributed, save_distributed
from .ema import EMA
from .parallel import build_mesh, init_distributed, loss_scale, wrap_data_parallel
from .sequence_parallel import SequenceParallelSTDiT

__all__ = ["ColossalEngine", "Engine", "Start", "TorchDistributedEngine", "make_engine"]


class _Found(NamedTuple):
    kind: CheckpointKind
    path: Path
    fully: bool  # False: take the weights only


@dataclass
class Start:
    """Where a stage starts: its step, data position and a note on the weights it starts from."""

    step: int
    data_position: dict | None
    note: str


class Engine:
    """The interface ``train_stage`` uses, implemented for one process: the model itself, bitwise
    resumable checkpoints (RNG states included)."""

    saves: CheckpointKind = SINGLE
    resumes: tuple[tuple[CheckpointKind, bool], ...] = ((SINGLE, True), (DCP, True))
    """(kind, fully) in the order that breaks a tie of steps; not fully: the weights only."""
    loss_scale = 1.0

    def __init__(self, cfg: StageConfig, device: torch.device, rank: int = 0, world: int = 1, mesh=None):
        self.cfg, self.device, self.rank, self.world, self.mesh = cfg, device, rank, world, mesh
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        self.dp = cfg.parallel.dp if world > 1 else 1  # samples of a step = batch_size x dp
        self.bf16 = device.type == "cuda" and cfg.run.dtype == "bf16"
        self.model: nn.Module | None = None  # the plain model (what EMA, evaluation and checkpoints read)
        self.net: nn.Module | None = None  # what the forward calls (the model, or its wrapper)
        self.optimizer = None
        self.ema: EMA | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def evaluates(self) -> bool:
        """Whether the fixed-batch evaluation runs: it needs the whole model in one process."""
        return self.world == 1

    def describe(self) -> str:
        return str(self.device)

    def start(self, model: nn.Module, out: Path) -> Start:
        """Wrap ``model``, build optimizer and EMA, then resume from the newest checkpoint in ``out``
        or, without one, load ``[stage] init_from``."""
        found = self._newest(out)
        note = "random init"
        if found is not None and not found.fully:
            load_checkpoint(found.path, model=model, map_location=str(self.device), restore_rng=False)
            note = f"weights from {found.path} (optimizer and EMA restart: single-process -> distributed)"
        elif found is None and self.cfg.stage.init_from:
            note = init_from_previous(model, self.cfg.stage.init_from, self.cfg.stage.zero_temporal)
        self.model = model
        self._prepare(model)
        if found is None or not found.fully:
            return Start(0, None, note)
        meta = self._load(found.kind, found.path)
        note = f"resumed from {found.path}" + (f" ({found.kind.label})" if found.kind.label else "")
        return Start(int(meta["step"]), meta.get("data_position"), note)

    def _newest(self, out: Path) -> _Found | None:
        """The highest-step checkpoint in ``out`` of the kinds this engine resumes from (the first kind
        wins a tie); ConfigError if one of them is a run of another configuration."""
        best, best_step = None, -1
        for kind, fully in self.resumes:
            path = latest(out / kind.subdir, kind)
            if path is not None:
                _check_resumable(self.cfg, path)
                step = int(path.name.removeprefix("step-"))
                if step > best_step:
                    best, best_step = _Found(kind, path, fully), step
        return best

    def _prepare(self, model: nn.Module) -> None:
        self.net = model
        self.ema = EMA(model, decay=self.cfg.optim.ema_decay)
        self.optimizer = build_optimizer(self.cfg, [p for p in model.parameters() if p.requires_grad], self.device)

    def _load(self, kind: CheckpointKind, path: Path) -> dict:
        if kind is SINGLE:
            return load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                   map_location=str(self.device))  # fmt: skip
        return load_distributed(path, self.model, self.optimizer, ema=self.ema.shadow)

    def step(self, loss: torch.Tensor, lr: float):
        """Backward, clip, optimizer step at learning rate ``lr``, EMA update; returns the gradient norm
        before clipping (a tensor or a float: reading it may wait for the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:  # always: a resumed optimizer's stored rate never wins
            group["lr"] = lr
        grad_norm = self._backward_and_step(loss)
        self.ema.update(self.model)
        return grad_norm

    def _backward_and_step(self, loss: torch.Tensor):
        (loss * self.loss_scale).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return grad_norm

    def save(self, out: Path, step: int, *, data_position: dict, extra: dict) -> Path:
        return save_checkpoint(out, step=step, model=self.model, ema=self.ema, optimizer=self.optimizer,
                               data_position=data_position, extra=extra, keep_last=self.cfg.run.keep_last)  # fmt: skip

    def latest(self, out: Path) -> Path | None:
        """This engine's newest complete checkpoint in ``out``."""
        return latest(out / self.saves.subdir, self.saves)


class TorchDistributedEngine(Engine):
    """torchrun, engine = "torch": sequence parallelism (sp > 1) inside each dp group, then FSDP2 or
    DDP over all ranks (stdit.train.parallel); distributed checkpoints."""

    saves = DCP
    resumes = ((SINGLE, False), (DCP, True))

    def __init__(self, cfg: StageConfig, device: torch.device, rank: int, world: int, mesh):
        super().__init__(cfg, device, rank, world, mesh)
        self.loss_scale = loss_scale(cfg.parallel)

    def describe(self) -> str:
        pc = self.cfg.parallel
        return f"{self.device}, {self.world} processes (dp {pc.dp} x sp {pc.sp} {pc.sp_mode}, {pc.data_parallel})"

    def _prepare(self, model: nn.Module) -> None:
        pc = self.cfg.parallel
        pc.validate(world_size=self.world, num_heads=model.num_heads)
        net = SequenceParallelSTDiT(model, self.mesh["sp"].get_group(), pc.sp_mode) if pc.sp > 1 else model
        self.net = wrap_data_parallel(net, pc, self.device, bf16=self.bf16)
        self.ema = EMA(model, decay=self.cfg.optim.ema_decay)  # after wrapping: FSDP2 shards the averages too
        self.optimizer = build_optimizer(self.cfg, [p for p in self.net.parameters() if p.requires_grad], self.device)

    def save(self, out: Path, step: int, *, data_position: dict, extra: dict) -> Path:
        return save_distributed(out / DCP.subdir, step, self.model, self.optimizer, ema=self.ema.shadow,
                                data_position=data_position, extra=extra, keep_last=self.cfg.run.keep_last)  # fmt: skip


class ColossalEngine(Engine):
    """engine = "colossalai" under torchrun: ColossalAI's Booster (stdit.train.colossal) wraps model
    and optimizer and clips inside ``optimizer.step()``; ColossalAI checkpoints."""

    saves = COLOSSAL
    resumes = ((COLOSSAL, True), (SINGLE, False))

    def describe(self) -> str:
        return f"{self.device}" + (f", {self.world} processes (colossalai {self.cfg.parallel.plugin})" if self.world > 1 else "")

    def _prepare(self, model: nn.Module) -> None:
        optimizer = build_optimizer(self.cfg, [p for p in model.parameters() if p.requires_grad], self.device)
        self.net, self.optimizer, self.booster = colossal.boost(
            model, optimizer, plugin=self.cfg.parallel.plugin, device=self.device, bf16=self.bf16,
            grad_clip=self.cfg.optim.grad_clip,
        )  # fmt: skip
        self.model = self.net.unwrap()
        self.ema = EMA(self.model, decay=self.cfg.optim.ema_decay)

    def _load(self, kind: CheckpointKind, path: Path) -> dict:
        return colossal.load(self.booster, self.net, self.optimizer, path, ema=self.ema.shadow)

    def _backward_and_step(self, loss: torch.Tensor):
        colossal.backward(self.booster, loss.float(), self.optimizer)
        self.optimizer.step()  # clips first
        return colossal.grad_norm(self.optimizer) or float("nan")

    def save(self, out: Path, step: int, *, data_position: dict, extra: dict) -> Path:
        return colossal.save(self.booster, self.net, self.optimizer, out / COLOSSAL.subdir, step, ema=self.ema.shadow,
                             data_position=data_position, extra=extra, keep_last=self.cfg.run.keep_last)  # fmt: skip


def make_engine(cfg: StageConfig, device: torch.device) -> Engine:
    """The engine for this launch (joins torchrun's process group when there is one)."""
    rank, world, device = init_distributed(device.type)
    pc = cfg.parallel
    if world == 1 and pc.dp * pc.sp != 1:
        raise ConfigError(f"{cfg.source}: [parallel] dp x sp = {pc.dp * pc.sp} needs that many processes: launch with "
                          f"torchrun --nproc_per_node={pc.dp * pc.sp} -m stdit.train train --config ...")  # fmt: skip
    if pc.engine == "colossalai" and "RANK" not in os.environ:
        raise ConfigError(f"{cfg.source}: [parallel] engine = 'colossalai' runs under torchrun (even for one process): "
                          f"torchrun --nproc_per_node={pc.dp} -m stdit.train train --config ...")  # fmt: skip
    mesh = build_mesh(pc, device) if world > 1 else None
    if pc.engine == "colossalai":
        return ColossalEngine(cfg, device, rank, world, mesh)
    if world > 1:
        return TorchDistributedEngine(cfg, device, rank, world, mesh)
    return Engine(cfg, device)


def _check_resumable(cfg: StageConfig, ckpt: Path) -> None:
    """A checkpoint in ``[run] out_dir`` must come from the same model and data shape, or resuming it would
    fail deep in load_state_dict (or, worse, succeed on the wrong data): say so plainly instead."""
    try:
        stored = json.loads((ckpt / "meta.json").read_text())["extra"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a `stdit train` checkpoint: loading it reports what is wrong with it
    now, default = cfg.to_dict(), StageConfig().to_dict()  # a key a run predates had its default value
    keys = (("model", "preset"), ("data", "num_frames"), ("data", "image_size"), ("encoders", "model_max_length"),
            ("diffusion", "kind"), ("data", "buckets"), ("data", "aspect_ratios"))  # fmt: skip
    then = {(t, k): stored.get(t, {}).get(k, default[t][k]) for t, k in keys}
    diff = [f"[{t}] {k} {then[t, k]!r} there, {now[t][k]!r} here" for t, k in keys if then[t, k] != now[t][k]]
    if diff:
        raise ConfigError(f"{cfg.source}: [run] out_dir {ckpt.parent.parent} holds a run of another configuration "
                          f"({'; '.join(diff)}); delete it or choose another out_dir")
