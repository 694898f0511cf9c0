"""stdit.train.checkpoint: crash-safe training checkpoints (issue: training).

A checkpoint holds the model, an optional EMA, an optional optimizer, the step, every RNG state and the
data position. Nothing in it can execute code when loaded: tensors are safetensors, metadata is JSON,
and the optimizer's ``state_dict`` is a ``torch.save`` file checked at save time to contain only types
that ``torch.load(weights_only=True)`` accepts (and always loaded that way).

Public API
----------
``save_checkpoint(run_dir, *, step, model, ema=None, optimizer=None, data_position=None, extra=None,
keep_last=3) -> Path``
    Write ``run_dir/checkpoints/step-{step:09d}/`` atomically and prune to ``keep_last`` complete
    checkpoints (``None``: keep all). ``model`` is an ``nn.Module`` (or a state-dict mapping); ``ema``
    is an :class:`EMA`, an ``nn.Module`` (e.g. ``AveragedModel``) or anything with ``state_dict()``
    returning a flat mapping of tensors and JSON-able scalars; ``data_position`` and ``extra`` are any
    JSON-able values (``extra``: e.g. the stage config). Only one process (rank 0) should call it.
``latest_checkpoint(run_dir, *, verify=False) -> Path | None``
    The complete checkpoint with the highest step, or ``None`` (also when ``run_dir`` does not exist).
    Partial or corrupt ones are skipped with a :class:`CheckpointWarning` naming them. ``verify=True``
    also checks every file's SHA-256. Like ``save_checkpoint`` it first tidies up after dead writers
    (see below). Complete = final name, ``meta.json`` parseable, and every file it lists present with
    the listed size (and hash, with ``verify``).
``load_checkpoint(path_or_run_dir, *, model, ema=None, optimizer=None, map_location="cpu",
strict=True, restore_rng=True, verify=True) -> dict``
    ``path_or_run_dir``: a checkpoint directory, or a run directory (or its ``checkpoints/`` folder),
    whose latest complete checkpoint is used. Everything is read and validated before any object is
    modified. Returns ``meta.json``'s content (``step``, ``data_position``, ``extra``, ``time``,
    ``versions``, ``files`` ...) plus ``"path"`` (str). Errors name the argument: ``ValueError`` for a file given as a directory, an
    incomplete checkpoint, a newer ``format_version``, mismatching keys/shapes (missing/unexpected keys
    listed briefly; ``strict=False`` loads the common keys), an ``ema``/``optimizer`` the checkpoint has
    no state for; ``FileNotFoundError`` when there is no checkpoint.
``is_complete(path, *, verify=False) -> bool``
    Whether ``path`` is a complete checkpoint directory.
``checkpoint_dir_name(step)``, ``CheckpointWarning``, ``FORMAT_VERSION``
    The directory name for a step; the warning category; the format version this code writes.
``EMA(model, decay=0.9999)``
    fp32 shadow of the trainable parameters (exponential moving average) and of the buffers (copied):
    ``update(model, decay=None)``, ``copy_to(model)``, ``state_dict()``, ``load_state_dict()``,
    ``to(device)``. It lives here because the checkpoint is its only serialisation path.

Layout (``FORMAT_VERSION`` 1)
-----------------------------
::

    run_dir/checkpoints/
      step-000001000/
        model.safetensors   the model's state_dict (safetensors.torch.save_file: CPU, contiguous; views
                            sharing storage are copied); tied tensors (the same view under several
                            names) are stored once and listed in metadata "stdit.aliases" {alias: key},
                            unlike save_model, which drops such names silently
        ema.safetensors     EMA tensors; non-tensor entries as JSON in metadata "stdit.scalars"
        optimizer.pt        optimizer.state_dict(), loadable with torch.load(weights_only=True)
        rng.safetensors     "torch_cpu" and "torch_cuda_{i}" generator states (uint8)
        rng.json            Python ``random`` state and numpy's global (legacy) RNG state
        meta.json           format, format_version, step, data_position, extra, time, unix_time,
                            versions, contents, files: {name: {"size", "sha256"}}; written last
      .tmp-step-000001000-<pid>-<token>-<host>/     a writer in progress (or one that crashed)

Crash safety: every file is written into a ``.tmp-*`` directory next to the final one, fsynced, the
directory fsynced, then renamed to its final name (one atomic ``rename``), and the parent fsynced. A
final-named directory is therefore either absent or complete. Re-saving an existing step swaps the new
directory in with Linux ``renameat2(RENAME_EXCHANGE)`` (atomic); elsewhere the old one is first renamed
to ``.replaced-*``, and if the writer dies before the new one takes its place the next
``latest_checkpoint``/``save_checkpoint`` renames it back. Pruning renames a checkpoint to ``.trash-*``
before deleting it. Leftover ``.tmp-*``/``.trash-*`` directories are deleted only when they were made on
this host by a process that is no longer alive; otherwise they are ignored. "Latest" means the highest
step, not the newest file time.

RNG: ``load_checkpoint(restore_rng=True)`` restores torch's CPU generator, every CUDA device's
generator (when CUDA is available now; a device-count mismatch is warned about), numpy's global
``np.random`` state and Python's ``random`` state. Generators a program creates itself
(``np.random.default_rng``, ``torch.Generator``) are not global and are not covered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_NAME = "stdit-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_TENSOR_FILE = "rng.safetensors"
RNG_JSON_FILE = "rng.json"
META_FILE = "meta.json"

__all__ = [
    "EMA",
    "CheckpointWarning",
    "FORMAT_VERSION",
    "checkpoint_dir_name",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_FINAL_RE = re.compile(r"^step-(\d{9,})$")
_AUX_RE = re.compile(r"^\.(tmp|trash|replaced)-step-(\d{9,})-(\d+)-([0-9a-f]+)-(.*)$")
_SCALARS_KEY = "stdit.scalars"
_ALIASES_KEY = "stdit.aliases"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, repaired or only partly restored."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


# --------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's trainable parameters, kept in fp32.

    ``shadow`` maps names (as in ``model.named_parameters()``/``named_buffers()``) to tensors on the
    model's device: floating trainable parameters are averaged, ``s += (1 - decay) * (p - s)``;
    buffers are copied on every update (floating ones in fp32). Frozen parameters are not tracked.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.decay = _check_decay(decay, "decay")
        self.num_updates = 0
        self.param_names: list[str] = []
        self.buffer_names: list[str] = []
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self.param_names.append(name)
                    self.shadow[name] = _fp32_copy(p)
            for name, b in model.named_buffers():
                self.buffer_names.append(name)
                self.shadow[name] = _fp32_copy(b)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else _check_decay(decay, "decay")
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name in self.param_names:
            s = self.shadow[name]
            p = _lookup(params, name, "model", "parameter").detach().to(device=s.device, dtype=s.dtype)
            if s.is_floating_point():
                s.lerp_(p, 1.0 - d)
            else:
                s.copy_(p)
        for name in self.buffer_names:
            self.shadow[name].copy_(_lookup(buffers, name, "model", "buffer").detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters and buffers with the averages (cast to their dtype)."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name in self.param_names:
            _lookup(params, name, "model", "parameter").copy_(self.shadow[name])
        for name in self.buffer_names:
            _lookup(buffers, name, "model", "buffer").copy_(self.shadow[name])

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"decay": self.decay, "num_updates": self.num_updates,
                              "param_names": list(self.param_names), "buffer_names": list(self.buffer_names)}
        for name, t in self.shadow.items():
            sd["shadow." + name] = t
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        shadow = {k[len("shadow."):]: v for k, v in state_dict.items() if k.startswith("shadow.")}
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"state_dict: EMA names don't match: {_describe_mismatch(missing, unexpected)}")
        for name, t in shadow.items():
            if tuple(t.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"state_dict: EMA entry {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.decay = _check_decay(state_dict.get("decay", self.decay), "state_dict['decay']")
        self.num_updates = int(state_dict.get("num_updates", self.num_updates))


def _check_decay(decay: Any, name: str) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {decay!r}")
    return float(decay)


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()


def _lookup(d: Mapping[str, torch.Tensor], name: str, arg: str, what: str) -> torch.Tensor:
    try:
        return d[name]
    except KeyError:
        raise ValueError(f"{arg}: has no {what} {name!r} (the EMA was made from a different model)") from None


# ------------------------------------------------------------------------------- file-system helpers


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_file(path: Path) -> dict[str, Any]:
    """fsync ``path`` and return its size and SHA-256."""
    h = hashlib.sha256()
    size = 0
    with open(path, "r+b") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "xb") as f:
        f.write(data)
    return _finish_file(path)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _aux_name(kind: str, step: int) -> str:
    return f".{kind}-{checkpoint_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}-{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no safe liveness probe: treat as alive (leftovers are only ignored)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _writer_dead(m: re.Match) -> bool:
    """Whether the .tmp/.trash/.replaced directory was made on this host by a process now gone."""
    return m.group(5) == _host() and not _pid_alive(int(m.group(3)))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _renameat2 = getattr(_libc, "renameat2", None)
        if _renameat2 is not None:
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
    except OSError:  # pragma: no cover
        _renameat2 = None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _trash(path: Path, step: int) -> None:
    """Remove a final-named checkpoint so that it is never visible half-deleted."""
    trash = path.parent / _aux_name("trash", step)
    os.rename(path, trash)
    _remove_tree(trash)


def _housekeep(ckpt_dir: Path) -> None:
    """Restore ``.replaced-*`` orphans of dead writers; delete their dead ``.tmp-*``/``.trash-*`` leftovers."""
    try:
        entries = sorted(os.listdir(ckpt_dir))
    except FileNotFoundError:
        return
    for name in entries:
        m = _AUX_RE.match(name)
        if m is None or not _writer_dead(m):
            continue
        path = ckpt_dir / name
        kind, step = m.group(1), int(m.group(2))
        if kind == "replaced":
            final = ckpt_dir / checkpoint_dir_name(step)
            if not final.exists():
                try:
                    os.rename(path, final)
                    _fsync_dir(ckpt_dir)
                    warnings.warn(f"restored {final} from {name}: its writer died while replacing it",
                                  CheckpointWarning, stacklevel=3)
                except OSError:
                    pass
            elif _check(final, verify=False)[0] is not None:
                _remove_tree(path)  # superseded by a complete re-save
        else:
            _remove_tree(path)


# ------------------------------------------------------------------------------ state serialisation


def _state_to_tensors(state: Mapping[str, Any], arg: str, allow_scalars: bool):
    """Split a state dict into safetensors-ready tensors, tied-tensor aliases and JSON scalars."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{arg}: state_dict() must return a mapping, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    seen: dict[tuple, str] = {}  # exact view identity -> first key
    storages: dict[tuple, set] = {}  # storage identity -> distinct views of it
    for key, v in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{arg}: state_dict key {key!r} is not a string")
        if isinstance(v, torch.Tensor) and v.numel() > 0 and v.device.type != "meta":
            storages.setdefault(_storage_id(v), set()).add(_view_id(v))
    for key, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if v.device.type == "meta":
                raise ValueError(f"{arg}: entry {key!r} is a meta tensor (no data to save)")
            shared = False
            if v.numel() > 0:
                ident = _view_id(v)
                if ident in seen:  # tied weights: store once, record the alias
                    aliases[key] = seen[ident]
                    continue
                seen[ident] = key
                shared = len(storages[_storage_id(v)]) > 1
            t = v.to("cpu").contiguous()
            if shared:  # distinct views of one storage (safetensors refuses shared storage): copy
                t = t.clone()
            tensors[key] = t
        elif allow_scalars:
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{arg}: entry {key!r} is neither a tensor nor JSON-able ({e})") from None
            scalars[key] = v
        else:
            raise TypeError(f"{arg}: entry {key!r} is a {type(v).__name__}, not a tensor "
                            "(only tensors can be saved without pickle)")
    return tensors, aliases, scalars


def _storage_id(v: torch.Tensor) -> tuple:
    return (v.device, v.untyped_storage().data_ptr())


def _view_id(v: torch.Tensor) -> tuple:
    return (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride())


def _save_safetensors(path: Path, tensors, aliases, scalars) -> dict[str, Any]:
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    if scalars:
        metadata[_SCALARS_KEY] = json.dumps(scalars, sort_keys=True, allow_nan=False)
    save_file(tensors, str(path), metadata=metadata)
    return _finish_file(path)


def _load_safetensors(path: Path, device: str) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    for dup, canon in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        out[dup] = out[canon]
    out.update(json.loads(meta.get(_SCALARS_KEY, "{}")))
    return out


_WEIGHTS_ONLY_LEAVES = (torch.Tensor, int, float, bool, str, complex, type(None), torch.dtype, torch.device,
                        torch.Size)


def _check_weights_only(obj: Any, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"optimizer: key {k!r} at {where} cannot be loaded with weights_only=True")
            _check_weights_only(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
    elif isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"optimizer: {where} is a tensor subclass {type(obj).__name__}; "
                            "it cannot be loaded with weights_only=True")
    elif not isinstance(obj, _WEIGHTS_ONLY_LEAVES):
        raise TypeError(f"optimizer: {where} is a {type(obj).__name__}, which "
                        "torch.load(weights_only=True) cannot load")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s.cpu().clone()
    v, internal, gauss = random.getstate()
    js: dict[str, Any] = {"python_random": {"version": v, "state": list(internal), "gauss_next": gauss}}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        js["numpy"] = {"bit_generator": name, "keys": [int(k) for k in keys], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    js["cuda_device_count"] = sum(k.startswith("torch_cuda_") for k in tensors)
    return tensors, js


def _restore_rng(tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any], where: Path) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to("cpu", torch.uint8))
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(sum(k.startswith("torch_cuda_") for k in tensors))]
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(f"{where}: has CUDA RNG states but CUDA is not available; not restored",
                          CheckpointWarning, stacklevel=3)
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                warnings.warn(f"{where}: saved {len(cuda)} CUDA RNG states, {n} devices now; "
                              f"restoring {min(n, len(cuda))}", CheckpointWarning, stacklevel=3)
            for i in range(min(n, len(cuda))):
                torch.cuda.set_rng_state(cuda[i].to("cpu", torch.uint8), i)
    pr = js.get("python_random")
    if pr is not None:
        random.setstate((pr["version"], tuple(pr["state"]), pr["gauss_next"]))
    npj = js.get("numpy")
    if npj is not None:
        import numpy as np

        np.random.set_state((npj["bit_generator"], np.asarray(npj["keys"], dtype=np.uint32), npj["pos"],
                             npj["has_gauss"], npj["cached_gaussian"]))


# ------------------------------------------------------------------------------------------- save


def _resolve_run_dir(run_dir: Any, arg: str) -> Path:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a path, got {type(run_dir).__name__}")
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{arg}: {p} exists and is not a directory")
    ck = p / CHECKPOINT_SUBDIR
    if ck.exists() and not ck.is_dir():
        raise ValueError(f"{arg}: {ck} exists and is not a directory")
    return p


def _json_arg(value: Any, arg: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: must be JSON-serialisable ({e})") from None


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    ema: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    data_position: Any = None,
    extra: Any = None,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step-{step:09d}/``; return its path. See the module docstring."""
    run = _resolve_run_dir(run_dir, "run_dir")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
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
    data_position = _json_arg(data_position, "data_position")
    extra = _json_arg(extra, "extra")

    # Serialise everything in memory-light form and validate before touching the disk.
    model_parts = _state_to_tensors(model_state, "model", allow_scalars=False)
    ema_parts = None
    if ema is not None:
        ema_parts = _state_to_tensors(ema.state_dict(), "ema", allow_scalars=not isinstance(ema, nn.Module))
    opt_state = None
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        _check_weights_only(opt_state, "state_dict()")
    rng_tensors, rng_json = _rng_state()

    ckpt_dir = run / CHECKPOINT_SUBDIR
    created = []
    d = ckpt_dir
    while not d.exists():
        created.append(d)
        d = d.parent
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for d in created:  # make the new directories' entries durable too
        _fsync_dir(d.parent)
    _housekeep(ckpt_dir)

    final = ckpt_dir / checkpoint_dir_name(step)
    tmp = ckpt_dir / _aux_name("tmp", step)
    os.mkdir(tmp)
    try:
        files: dict[str, dict[str, Any]] = {}
        files[MODEL_FILE] = _save_safetensors(tmp / MODEL_FILE, *model_parts)
        if ema_parts is not None:
            files[EMA_FILE] = _save_safetensors(tmp / EMA_FILE, *ema_parts)
        if opt_state is not None:
            torch.save(opt_state, tmp / OPTIMIZER_FILE)
            files[OPTIMIZER_FILE] = _finish_file(tmp / OPTIMIZER_FILE)
        files[RNG_TENSOR_FILE] = _save_safetensors(tmp / RNG_TENSOR_FILE, rng_tensors, {}, {})
        files[RNG_JSON_FILE] = _write_bytes(tmp / RNG_JSON_FILE, json.dumps(rng_json).encode())
        now = time.time()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": data_position,
            "extra": extra,
            "time": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
            "unix_time": now,
            "versions": _versions(),
            "contents": {"model": MODEL_FILE, "ema": EMA_FILE if ema_parts is not None else None,
                         "optimizer": OPTIMIZER_FILE if opt_state is not None else None,
                         "rng": [RNG_TENSOR_FILE, RNG_JSON_FILE]},
            "files": files,
        }
        _write_bytes(tmp / META_FILE, json.dumps(meta, indent=2, allow_nan=False).encode())
        _fsync_dir(tmp)
        _publish(tmp, final, step)
    except BaseException:
        _remove_tree(tmp)
        raise
    _fsync_dir(ckpt_dir)
    if keep_last is not None:
        _prune(ckpt_dir, keep_last, keep=final)
    return final


def _publish(tmp: Path, final: Path, step: int) -> None:
    """Make the complete ``tmp`` visible as ``final``; an existing ``final`` is replaced, never lost."""
    try:
        os.rename(tmp, final)  # atomic; fails if final exists and is non-empty
        return
    except OSError:
        if not final.exists():
            raise
    if _rename_exchange(tmp, final):  # tmp now holds the old checkpoint
        _fsync_dir(final.parent)
        _remove_tree(tmp)
        return
    # Fallback: two renames; a crash between them leaves the old one as .replaced-*, restored later.
    replaced = final.parent / _aux_name("replaced", step)
    os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _remove_tree(replaced)


def _prune(ckpt_dir: Path, keep_last: int, keep: Path) -> None:
    complete = [(s, p) for s, p in _final_dirs(ckpt_dir) if _check(p, verify=False)[0] is not None]
    complete.sort(reverse=True)
    kept = {p for _, p in complete[:keep_last]} | {keep}
    for s, p in complete:
        if p not in kept:
            try:
                _trash(p, s)
            except OSError as e:
                warnings.warn(f"could not prune {p}: {e}", CheckpointWarning, stacklevel=3)


def _versions() -> dict[str, str]:
    try:
        from stdit import __version__ as stdit_version
    except ImportError:  # pragma: no cover
        stdit_version = "unknown"
    out = {"stdit": stdit_version, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import safetensors

        out["safetensors"] = safetensors.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ----------------------------------------------------------------------------- discover and verify


def _final_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return out
    for name in names:
        m = _FINAL_RE.match(name)
        if m and (ckpt_dir / name).is_dir():
            out.append((int(m.group(1)), ckpt_dir / name))
    return out


def _check(path: Path, verify: bool) -> tuple[dict | None, str]:
    """(meta, "") when ``path`` is a complete checkpoint, else (None, reason)."""
    try:
        raw = (path / META_FILE).read_bytes()
    except FileNotFoundError:
        return None, f"no {META_FILE}"
    except OSError as e:
        return None, f"cannot read {META_FILE}: {e}"
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, f"{META_FILE} is not valid JSON"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return None, f"{META_FILE} is not a {FORMAT_NAME} file"
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return None, f"{META_FILE} has no integer format_version"
    if version > FORMAT_VERSION:
        return meta, ""  # complete as far as we can tell; load_checkpoint explains the version
    m = _FINAL_RE.match(path.name)
    if m and meta.get("step") != int(m.group(1)):
        return None, f"{META_FILE} says step {meta.get('step')!r}, the directory name says {int(m.group(1))}"
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        return None, f"{META_FILE} lists no files"
    for name, info in files.items():
        f = path / name
        if not isinstance(info, dict) or "/" in name or name.startswith("."):
            return None, f"{META_FILE} has a bad entry for {name!r}"
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return None, f"{name} is missing"
        if size != info.get("size"):
            return None, f"{name} has {size} bytes, expected {info.get('size')}"
        if verify and _sha256(f) != info.get("sha256"):
            return None, f"{name} fails its SHA-256 check"
    return meta, ""


def is_complete(path: str | os.PathLike, *, verify: bool = False) -> bool:
    """Whether ``path`` is a complete checkpoint directory (``verify``: also check SHA-256s)."""
    return _check(Path(path), verify)[0] is not None


def latest_checkpoint(run_dir: str | os.PathLike, *, verify: bool = False) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir/checkpoints``, or None."""
    run = _resolve_run_dir(run_dir, "run_dir")
    return _latest_in(run / CHECKPOINT_SUBDIR, verify)


def _latest_in(ckpt_dir: Path, verify: bool) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    _housekeep(ckpt_dir)
    for _, path in sorted(_final_dirs(ckpt_dir), reverse=True):
        meta, why = _check(path, verify)
        if meta is not None:
            return path
        warnings.warn(f"skipping incomplete or corrupt checkpoint {path}: {why}", CheckpointWarning, stacklevel=2)
    return None


# ------------------------------------------------------------------------------------------- load


def load_checkpoint(
    path_or_run_dir: str | os.PathLike,
    *,
    model: nn.Module | None,
    ema: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint (or a run directory's latest) into the given objects; return its metadata."""
    if not isinstance(path_or_run_dir, (str, os.PathLike)):
        raise TypeError(f"path_or_run_dir: expected a path, got {type(path_or_run_dir).__name__}")
    p = Path(path_or_run_dir)
    if not p.exists():
        raise FileNotFoundError(f"path_or_run_dir: {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"path_or_run_dir: {p} is not a directory")
    if not (p / META_FILE).exists():
        # A run directory, or its checkpoints/ folder itself.
        ckpt_dir = p / CHECKPOINT_SUBDIR if (p / CHECKPOINT_SUBDIR).is_dir() or not _final_dirs(p) else p
        if ckpt_dir.exists() and not ckpt_dir.is_dir():
            raise ValueError(f"path_or_run_dir: {ckpt_dir} exists and is not a directory")
        found = _latest_in(ckpt_dir, verify)
        if found is None:
            raise FileNotFoundError(f"path_or_run_dir: no complete checkpoint under {ckpt_dir}")
        p = found
    meta, why = _check(p, verify)
    if meta is None:
        raise ValueError(f"path_or_run_dir: {p} is not a complete checkpoint: {why}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"path_or_run_dir: {p} has format_version {meta['format_version']}, newer than this "
                         f"code's {FORMAT_VERSION}; upgrade stdit to load it")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    device = str(torch.device(map_location))
    files = meta["files"]

    # 1. Read and validate everything; nothing is modified until all of it succeeded.
    model_sd = None
    if model is not None:
        model_sd = _load_safetensors(p / MODEL_FILE, device)
        _match_state(model.state_dict(), model_sd, strict, "model")
    ema_sd = None
    if ema is not None:
        if EMA_FILE not in files:
            raise ValueError(f"ema: checkpoint {p} has no EMA state (pass ema=None)")
        ema_sd = _load_safetensors(p / EMA_FILE, device)
        if isinstance(ema, nn.Module):
            _match_state(ema.state_dict(), ema_sd, strict, "ema")
        elif isinstance(ema, EMA):
            _match_state({k: v for k, v in ema.state_dict().items() if k.startswith("shadow.")},
                         {k: v for k, v in ema_sd.items() if k.startswith("shadow.")}, True, "ema")
    opt_sd = None
    if optimizer is not None:
        if OPTIMIZER_FILE not in files:
            raise ValueError(f"optimizer: checkpoint {p} has no optimizer state (pass optimizer=None)")
        opt_sd = torch.load(p / OPTIMIZER_FILE, map_location=device, weights_only=True)
        saved_groups = opt_sd.get("param_groups", [])
        groups = optimizer.param_groups
        if len(saved_groups) != len(groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups)
        ):
            raise ValueError(
                "optimizer: parameter groups don't match the checkpoint's: saved sizes "
                f"{[len(g['params']) for g in saved_groups]}, optimizer has {[len(g['params']) for g in groups]}"
            )
    rng = None
    if restore_rng:
        from safetensors.torch import load_file

        rng = (load_file(str(p / RNG_TENSOR_FILE)), json.loads((p / RNG_JSON_FILE).read_text()))

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
        _restore_rng(rng[0], rng[1], p)
    out = dict(meta)
    out["path"] = str(p)
    return out


def _describe_mismatch(missing: list[str], unexpected: list[str], n: int = 5) -> str:
    def brief(keys: list[str]) -> str:
        more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
        return ", ".join(keys[:n]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} [{brief(missing)}]")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} [{brief(unexpected)}]")
    return "; ".join(parts)


def _match_state(expected: Mapping[str, Any], saved: Mapping[str, Any], strict: bool, arg: str) -> None:
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"{arg}: keys don't match the checkpoint's: {_describe_mismatch(missing, unexpected)}")
    bad = [
        f"{k!r} {tuple(a.shape)} vs {tuple(saved[k].shape)}"
        for k, a in expected.items()
        if k in saved and isinstance(a, torch.Tensor) and isinstance(saved[k], torch.Tensor)
        and tuple(a.shape) != tuple(saved[k].shape)
    ]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{arg}: shapes don't match the checkpoint's (yours vs saved): {', '.join(bad[:5])}{more}")
