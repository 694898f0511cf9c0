"""Training checkpoints: one policy for every engine's checkpoints, and the single-process format.

Every checkpoint is a folder ``ROOT/step-000001000/`` whose ``meta.json``, written last, holds the
format, format_version, step, data_position, extra (e.g. the stage config), time, versions and
``files``: the size and SHA-256 of every other file in the folder. ``write_checkpoint`` fills a
temporary sibling folder and publishes it with one rename (stdit.common.files.publish_dir), so a
folder with a final name is complete and a killed writer leaves at most a temporary folder, which
the next writer deletes. Complete = meta.json parses and lists exactly the files present, with
their sizes (``verify``: and SHA-256s). ``latest`` is the complete folder with the highest step.

The kinds, as ROOT below a run's out_dir; none is loaded by unpickling:

  checkpoints/  one process (this module): model.safetensors, ema.safetensors, optimizer.safetensors
                (tensors + the state's structure and scalars as JSON), rng.safetensors + rng.json
  dcp/          torch.distributed (stdit.train.distributed_checkpoint): torch.distributed.checkpoint
                shards in safetensors + state.json, loadable on any world size
  colossal/     ColossalAI (stdit.train.colossal): the booster's sharded files; its optimizer shards are
                torch.save files, so every file must match meta.json's SHA-256 before the booster loads

Format version 1 of the single-process kind kept the optimizer in a torch.save file (optimizer.pt):
its model, EMA and RNG states still load, its optimizer state is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stdit.common.env import utc_now, versions
from stdit.common.files import dir_temp_name, file_digest, fsync_dir, publish_dir, remove_dir, sweep_dead_writers

from .ema import EMA
from . import state_files
from .state_files import encode_state, load_state, load_tree, match_state, rng_state, save_state, save_tree, split_state

__all__ = [
    "CheckpointKind", "CheckpointWarning", "FORMAT_VERSION", "checkpoint_dir_name", "checkpoint_weights",
    "is_complete", "latest", "latest_checkpoint", "load_checkpoint", "prune", "read_meta", "save_checkpoint",
    "write_checkpoint",
]  # fmt: skip

META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_TENSOR_FILE = "rng.safetensors"
RNG_JSON_FILE = "rng.json"
FORMAT_VERSION = 2
_PICKLED_OPTIMIZER_FILE = "optimizer.pt"  # format version 1

_FINAL_RE = re.compile(r"^step-(\d{9,})$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, repaired or only partly restored."""


@dataclass(frozen=True)
class CheckpointKind:
    """One engine's checkpoints: the folder below a run's out_dir and meta.json's format name."""

    subdir: str
    format: str
    version: int
    label: str
    """How a resumed run names it ("" for the single-process kind)."""
    required: tuple[str, ...] = ()
    """Files every complete checkpoint of this kind has."""


SINGLE = CheckpointKind("checkpoints", "stdit-checkpoint", FORMAT_VERSION, "", (MODEL_FILE,))
CHECKPOINT_SUBDIR = SINGLE.subdir


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


# ------------------------------------------------------------------------------------------ write


def _json_arg(value: Any, arg: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: must be JSON-serialisable ({e})") from None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _make_dirs(path: Path) -> None:
    """mkdir -p, with the new directories' own entries made durable too."""
    created, d = [], path
    while not d.exists():
        created.append(d)
        d = d.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in created:
        fsync_dir(d.parent)


def _sweep(root: Path) -> None:
    for final in sweep_dead_writers(root):
        warnings.warn(f"restored {final}: its writer died while replacing it", CheckpointWarning, stacklevel=3)


def _listing(folder: Path) -> list[str]:
    """Every file below ``folder`` except its meta.json, as relative POSIX paths."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    return sorted(n for n in names if n != META_FILE)


def write_checkpoint(
    root: str | os.PathLike, step: int, kind: CheckpointKind, write: Callable[[Path], Any], *,
    data_position: Any = None, extra: Any = None, keep_last: int | None = None, distributed: bool = False,
) -> Path:  # fmt: skip
    """Publish ``root/step-{step:09d}`` of ``kind``; return its path.

    ``write(tmp)`` fills the temporary folder ``tmp`` (on every rank when ``distributed``: all ranks
    call this) and returns meta.json's "contents". Rank 0 then records every file's size and SHA-256
    in meta.json, publishes the folder (an existing one of the same step is replaced) and prunes to
    the newest ``keep_last`` complete checkpoints (None: keep all; the one just written is kept).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
    data_position, extra = _json_arg(data_position, "data_position"), _json_arg(extra, "extra")
    root = Path(root)
    parallel = distributed and _distributed()
    rank0 = not parallel or dist.get_rank() == 0
    final = root / checkpoint_dir_name(step)
    # The ranks of one job must agree on the folder: a fixed name, which only this job writes.
    tmp = root / f".{final.name}.tmp-distributed" if distributed else dir_temp_name(final)
    if rank0:
        _make_dirs(root)
        _sweep(root)
        for stale in root.glob(".*.tmp-distributed") if distributed else ():  # a killed job's; this job's ranks
            shutil.rmtree(stale, ignore_errors=True)  # have not started writing: they wait below
        tmp.mkdir()
    if parallel:
        dist.barrier()
    try:
        contents = write(tmp)
        if parallel:
            dist.barrier()
        if rank0:
            now = time.time()
            meta = {
                "format": kind.format, "format_version": kind.version, "step": step, "data_position": data_position,
                "extra": extra, "time": utc_now(), "unix_time": now, "versions": versions(), "contents": contents,
                "files": {name: file_digest(tmp / name) for name in _listing(tmp)},
            }  # fmt: skip
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
            publish_dir(tmp, final)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank0 and keep_last is not None:
        prune(root, kind, keep_last, keep=final)
    if parallel:
        dist.barrier()
    return final


def prune(root: Path, kind: CheckpointKind, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints of ``kind`` (and ``keep``)."""
    complete = sorted(((s, p) for s, p in _final_dirs(root) if check(p, kind)[0] is not None), reverse=True)
    kept = {p for _, p in complete[:keep_last]} | {keep}
    for _, p in complete:
        if p not in kept:
            try:
                remove_dir(p)
            except OSError as e:
                warnings.warn(f"could not prune {p}: {e}", CheckpointWarning, stacklevel=3)


# ------------------------------------------------------------------------------ discover and verify


def _final_dirs(root: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(int(m.group(1)), root / n) for n in names if (m := _FINAL_RE.match(n)) and (root / n).is_dir()]


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and all(part and not part.startswith(".") for part in name.split("/"))


def check(path: Path, kind: CheckpointKind, verify: bool = False) -> tuple[dict | None, str]:
    """(meta, "") when ``path`` is a complete checkpoint of ``kind``, else (None, the reason)."""
    try:
        meta = json.loads((path / META_FILE).read_bytes())
    except FileNotFoundError:
        return None, f"no {META_FILE}"
    except OSError as e:
        return None, f"cannot read {META_FILE}: {e}"
    except (ValueError, UnicodeDecodeError):
        return None, f"{META_FILE} is not valid JSON"
    if not isinstance(meta, dict) or meta.get("format") != kind.format:
        return None, f"{META_FILE} is not a {kind.format} file"
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return None, f"{META_FILE} has no integer format_version"
    if version > kind.version:
        return meta, ""  # complete as far as we can tell; read_meta explains the version
    m = _FINAL_RE.match(path.name)
    if m and meta.get("step") != int(m.group(1)):
        return None, f"{META_FILE} says step {meta.get('step')!r}, the directory name says {int(m.group(1))}"
    files = meta.get("files")
    if not isinstance(files, dict) or not files or any(name not in files for name in kind.required):
        return None, f"{META_FILE} lists no files"
    for name, info in files.items():
        if not isinstance(info, dict) or not _safe_name(name):
            return None, f"{META_FILE} has a bad entry for {name!r}"
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return None, f"{name} is missing"
        if size != info.get("size"):
            return None, f"{name} has {size} bytes, expected {info.get('size')}"
        if verify and file_digest(path / name)["sha256"] != info.get("sha256"):
            return None, f"{name} fails its SHA-256 check"
    unlisted = sorted(set(_listing(path)) - set(files))
    if unlisted:
        return None, f"{unlisted[0]} is not listed in {META_FILE}"
    return meta, ""


def read_meta(path: Path, kind: CheckpointKind, verify: bool, arg: str = "path") -> dict:
    """meta.json of the complete checkpoint ``path`` of ``kind``; ValueError naming ``arg`` otherwise."""
    meta, why = check(Path(path), kind, verify)
    if meta is None:
        raise ValueError(f"{arg}: {path} is not a complete {kind.format} checkpoint: {why}")
    if meta["format_version"] > kind.version:
        raise ValueError(f"{arg}: {path} has format_version {meta['format_version']}, newer than this code's "
                         f"{kind.version}; upgrade stdit to load it")
    return meta


def latest(root: str | os.PathLike, kind: CheckpointKind, verify: bool = False) -> Path | None:
    """The complete checkpoint of ``kind`` with the highest step in ``root``, or None. Incomplete or
    corrupt ones are skipped with a CheckpointWarning; dead writers' leftovers are tidied first."""
    root = Path(root)
    if not root.is_dir():
        return None
    _sweep(root)
    for _, path in sorted(_final_dirs(root), reverse=True):
        meta, why = check(path, kind, verify)
        if meta is not None:
            return path
        warnings.warn(f"skipping incomplete or corrupt checkpoint {path}: {why}", CheckpointWarning, stacklevel=2)
    return None


# ------------------------------------------------------------------------- the single-process kind


def _resolve_run_dir(run_dir: Any, arg: str) -> Path:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a path, got {type(run_dir).__name__}")
    p = Path(run_dir)
    for d in (p, p / SINGLE.subdir):
        if d.exists() and not d.is_dir():
            raise ValueError(f"{arg}: {d} exists and is not a directory")
    return p


def save_checkpoint(
    run_dir: str | os.PathLike, *, step: int, model: nn.Module | Mapping[str, torch.Tensor], ema: Any = None,
    optimizer: torch.optim.Optimizer | None = None, data_position: Any = None, extra: Any = None,
    keep_last: int | None = 3,
) -> Path:  # fmt: skip
    """Write ``run_dir/checkpoints/step-{step:09d}/`` atomically and prune to ``keep_last``; return its path.

    ``model``: an nn.Module or a state dict; ``ema``: anything with ``state_dict()`` returning tensors
    and JSON-able scalars (an :class:`EMA`, an ``AveragedModel``); ``data_position``, ``extra``: any
    JSON-able values. Everything is serialised and validated before the disk is touched. Only one
    process (rank 0) calls it.
    """
    run = _resolve_run_dir(run_dir, "run_dir")
    if isinstance(model, nn.Module):
        model_state = model.state_dict()
    elif isinstance(model, Mapping):
        model_state = model
    else:
        raise TypeError(f"model: expected an nn.Module or a state dict, got {type(model).__name__}")
    if ema is not None and not callable(getattr(ema, "state_dict", None)):
        raise TypeError(f"ema: expected an object with state_dict(), got {type(ema).__name__}")
    if optimizer is not None and not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(f"optimizer: expected an optimizer, got {type(optimizer).__name__}")
    model_parts = split_state(model_state, "model", allow_scalars=False)
    ema_parts = split_state(ema.state_dict(), "ema", allow_scalars=True) if ema is not None else None
    opt_encoded = encode_state(optimizer.state_dict(), "optimizer") if optimizer is not None else None
    rng_tensors, rng_json = rng_state()

    def write(tmp: Path) -> dict:
        save_state(tmp / MODEL_FILE, model_parts)
        if ema_parts is not None:
            save_state(tmp / EMA_FILE, ema_parts)
        if opt_encoded is not None:
            save_tree(tmp / OPTIMIZER_FILE, opt_encoded)
        save_state(tmp / RNG_TENSOR_FILE, (rng_tensors, {}, {}))
        (tmp / RNG_JSON_FILE).write_text(json.dumps(rng_json))
        return {"model": MODEL_FILE, "ema": EMA_FILE if ema_parts is not None else None,
                "optimizer": OPTIMIZER_FILE if opt_encoded is not None else None, "rng": [RNG_TENSOR_FILE, RNG_JSON_FILE]}

    return write_checkpoint(run / SINGLE.subdir, step, SINGLE, write, data_position=data_position, extra=extra,
                            keep_last=keep_last)  # fmt: skip


def is_complete(path: str | os.PathLike, *, verify: bool = False) -> bool:
    """Whether ``path`` is a complete single-process checkpoint (``verify``: also check SHA-256s)."""
    return check(Path(path), SINGLE, verify)[0] is not None


def latest_checkpoint(run_dir: str | os.PathLike, *, verify: bool = False) -> Path | None:
    """The complete single-process checkpoint with the highest step under ``run_dir/checkpoints``, or None."""
    return latest(_resolve_run_dir(run_dir, "run_dir") / SINGLE.subdir, SINGLE, verify)


def load_checkpoint(
    path_or_run_dir: str | os.PathLike, *, model: nn.Module | None, ema: Any = None,
    optimizer: torch.optim.Optimizer | None = None, map_location: str | torch.device = "cpu", strict: bool = True,
    restore_rng: bool = True, verify: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Load a checkpoint (or a run directory's latest) into the given objects; return its meta.json
    plus "path".

    Everything is read and validated before any object is modified. ``restore_rng``: torch's CPU and
    CUDA generators, numpy's and Python's global states. ValueError (naming the argument) for an
    incomplete or newer checkpoint, keys or shapes that don't match (``strict=False`` loads the
    common keys), an ``ema``/``optimizer`` the checkpoint has no state for; FileNotFoundError when
    there is no checkpoint.
    """
    if not isinstance(path_or_run_dir, (str, os.PathLike)):
        raise TypeError(f"path_or_run_dir: expected a path, got {type(path_or_run_dir).__name__}")
    p = Path(path_or_run_dir)
    if not p.exists():
        raise FileNotFoundError(f"path_or_run_dir: {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"path_or_run_dir: {p} is not a directory")
    if not (p / META_FILE).exists():  # a run directory, or its checkpoints/ folder itself
        root = p / SINGLE.subdir if (p / SINGLE.subdir).is_dir() or not _final_dirs(p) else p
        if root.exists() and not root.is_dir():
            raise ValueError(f"path_or_run_dir: {root} exists and is not a directory")
        found = latest(root, SINGLE, verify)
        if found is None:
            raise FileNotFoundError(f"path_or_run_dir: no complete checkpoint under {root}")
        p = found
    meta = read_meta(p, SINGLE, verify, "path_or_run_dir")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    device = str(torch.device(map_location))
    files = meta["files"]

    # 1. Read and validate everything; nothing is modified until all of it succeeded.
    model_sd = None
    if model is not None:
        model_sd = load_state(p / MODEL_FILE, device)
        match_state(model.state_dict(), model_sd, strict, "model")
    ema_sd = None
    if ema is not None:
        if EMA_FILE not in files:
            raise ValueError(f"ema: checkpoint {p} has no EMA state (pass ema=None)")
        ema_sd = load_state(p / EMA_FILE, device)
        if isinstance(ema, nn.Module):
            match_state(ema.state_dict(), ema_sd, strict, "ema")
        elif isinstance(ema, EMA):
            match_state({k: v for k, v in ema.state_dict().items() if k.startswith("shadow.")},
                        {k: v for k, v in ema_sd.items() if k.startswith("shadow.")}, True, "ema")
    opt_sd = None
    if optimizer is not None:
        if _PICKLED_OPTIMIZER_FILE in files:
            raise ValueError(f"optimizer: checkpoint {p} (format_version {meta['format_version']}) keeps the optimizer "
                             f"state in a pickle ({_PICKLED_OPTIMIZER_FILE}), which is never loaded; pass optimizer=None")
        if OPTIMIZER_FILE not in files:
            raise ValueError(f"optimizer: checkpoint {p} has no optimizer state (pass optimizer=None)")
        opt_sd = load_tree(p / OPTIMIZER_FILE, device)
        saved_groups = opt_sd.get("param_groups", []) if isinstance(opt_sd, dict) else []
        groups = optimizer.param_groups
        if len(saved_groups) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups)):
            raise ValueError(
                "optimizer: parameter groups don't match the checkpoint's: saved sizes "
                f"{[len(g['params']) for g in saved_groups]}, optimizer has {[len(g['params']) for g in groups]}"
            )
    rng = None
    if restore_rng:
        rng = (load_state(p / RNG_TENSOR_FILE), json.loads((p / RNG_JSON_FILE).read_text()))

    # 2. Apply.
    if model_sd is not None:
        model.load_state_dict(model_sd, strict=strict)
    if ema_sd is not None:
        if isinstance(ema, nn.Module):
            ema.load_state_dict(ema_sd, strict=strict)
        else:
            ema.load_state_dict(ema_sd)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if rng is not None:
        state_files.restore_rng(rng[0], rng[1], p, CheckpointWarning)
    return {**meta, "path": str(p)}


def checkpoint_weights(ckpt: Path, *, prefer_ema: bool = True, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of a single-process checkpoint: model.safetensors with the EMA averages laid
    over it (the EMA tracks trainable parameters and buffers; frozen ones come from the model)."""
    weights = {k: v for k, v in load_state(Path(ckpt) / MODEL_FILE, device).items() if torch.is_tensor(v)}
    ema_file = Path(ckpt) / EMA_FILE
    if prefer_ema and ema_file.is_file():
        for k, v in load_state(ema_file, device).items():
            name = k.removeprefix("shadow.")
            if k.startswith("shadow.") and torch.is_tensor(v) and name in weights:
                weights[name] = v.to(weights[name].dtype)
    return weights
