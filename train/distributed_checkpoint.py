"""Distributed checkpoints: torch.distributed.checkpoint (DCP) with safetensors storage.

Every rank writes the tensors it holds (its FSDP2 shards; replicated tensors are written once)
through DCP's ``HuggingFaceStorageWriter``; rank 0 adds ``state.json``, the structure and the
non-tensor values (the optimizer's param_groups, ...), and the folder is published under the policy
of stdit.train.checkpoint (``ROOT/step-NNNNNNNNN/meta.json`` listing every file). Loading reads it
back through ``HuggingFaceStorageReader``, resharded to however the model is sharded now: another
world size, or one process without a process group. No file is unpickled: DCP's default storage
keeps its metadata in a pickle (``.metadata``), this storage reads safetensors headers instead.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .checkpoint import CheckpointKind, read_meta, write_checkpoint
from .state_files import decode_tree, describe_mismatch, encode_tree, tree_refs

__all__ = ["DCP", "load_distributed", "save_distributed"]

DCP = CheckpointKind("dcp", "stdit-dcp", 1, "distributed checkpoint")
STATE_FILE = "state.json"


def _sharded_writer(path: Path) -> HuggingFaceStorageWriter:
    """DCP's safetensors writer with every rank writing its own shards. The flag is ``save_distributed``
    in recent torch and was ``save_sharded`` when the writer first appeared (torch 2.8)."""
    params = inspect.signature(HuggingFaceStorageWriter.__init__).parameters
    flag = "save_distributed" if "save_distributed" in params else "save_sharded"
    return HuggingFaceStorageWriter(str(path), **{flag: True})


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: dict | None) -> dict[str, Any]:
    """{"model": ..., "optim": ..., "ema": ...} with parameter names as keys (the same on any world size)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    if ema is not None:
        state["ema"] = dict(ema)
    return state


def save_distributed(
    root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
    ema: dict[str, torch.Tensor] | None = None, data_position: Any = None, extra: Any = None,
    keep_last: int | None = None,
) -> Path:  # fmt: skip
    """Save a (possibly FSDP2-sharded or DDP-wrapped) model, its optimizer and an EMA's name -> tensor
    dict (sharded like the parameters) as ``root/step-{step:09d}``; every rank calls it."""
    state = _state(model, optimizer, ema)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, tensors)

    def write(tmp: Path) -> dict:
        dcp.save(tensors, storage_writer=_sharded_writer(tmp))
        if not dist.is_initialized() or dist.get_rank() == 0:
            (tmp / STATE_FILE).write_text(json.dumps(tree, allow_nan=False))
        return {"state": STATE_FILE, "parts": sorted(state)}

    return write_checkpoint(root, step, DCP, write, data_position=data_position, extra=extra, keep_last=keep_last,
                            distributed=True)  # fmt: skip


def load_distributed(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
    ema: dict[str, torch.Tensor] | None = None, verify: bool = False,
) -> dict:  # fmt: skip
    """Load a ``save_distributed`` checkpoint into ``model`` / ``optimizer`` (and the ``ema`` dict's
    tensors, in place), sharded however they are now; every rank calls it. Returns its meta.json.

    ValueError when ``path`` is not a complete checkpoint (``verify``: also compare SHA-256s, which
    reads every file on every rank) or holds other tensors than these objects."""
    path = Path(path)
    meta = read_meta(path, DCP, verify)
    saved = json.loads((path / STATE_FILE).read_text())
    if not (isinstance(saved, dict) and isinstance(saved.get("dict"), list)
            and all(isinstance(kv, list) and len(kv) == 2 for kv in saved["dict"])):  # fmt: skip
        raise ValueError(f"path: {path / STATE_FILE} is not a saved state structure")
    parts = dict(saved["dict"])
    state = _state(model, optimizer, ema)
    for name, arg in (("optim", "optimizer"), ("ema", "ema")):
        if name in state and name not in parts:
            raise ValueError(f"{arg}: checkpoint {path} has no {arg} state (pass {arg}=None)")
    wanted = {name: parts[name] for name in state}
    targets: dict[str, torch.Tensor] = {}
    encode_tree(state, targets)
    refs = tree_refs(list(wanted.values()))
    if refs != set(targets):
        mismatch = describe_mismatch(sorted(set(targets) - refs), sorted(refs - set(targets)))
        raise ValueError(f"path: the tensors of {path} don't match the model's and optimizer's: {mismatch}")
    try:
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)))  # fills the targets in place
    except CheckpointException as e:  # a BaseException, raised on every rank: make it an ordinary error
        raise ValueError(f"path: {path} could not be read: {e}") from None
    loaded = {name: decode_tree(node, targets) for name, node in wanted.items()}
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=loaded["model"],
                   optim_state_dict=loaded.get("optim", {}))  # fmt: skip
    return meta
