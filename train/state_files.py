"""State as safetensors + JSON, so that loading a checkpoint never unpickles anything.

A flat state dict (a model's, an EMA's) becomes one safetensors file: tensors under their names,
tied tensors stored once and named in the metadata "stdit.aliases", non-tensor entries as JSON in
"stdit.scalars". Any other state (an optimizer's nested ``state_dict()``) is split by
``encode_tree`` into tensors, stored under their path ("state/0/exp_avg"), and a JSON tree that
holds the structure and the scalars, in the metadata "stdit.tree". The RNG states of a run are a
safetensors file (torch generators) and a JSON file (Python's and numpy's).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "decode_tree", "describe_mismatch", "encode_state", "encode_tree", "load_state", "load_tree", "match_state", "restore_rng",
    "rng_state", "save_state", "save_tree", "split_state", "tree_refs",
]  # fmt: skip

_SCALARS_KEY = "stdit.scalars"
_ALIASES_KEY = "stdit.aliases"
_TREE_KEY = "stdit.tree"


# --------------------------------------------------------------------------------- flat state dicts


def split_state(state: Mapping[str, Any], arg: str, allow_scalars: bool):
    """(tensors, aliases, scalars) of a flat state dict: safetensors-ready CPU tensors (tied views
    stored once, views sharing a storage copied, as safetensors refuses shared storage), the tied
    names {alias: key} and the JSON-able non-tensor entries."""
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
                if ident in seen:
                    aliases[key] = seen[ident]
                    continue
                seen[ident] = key
                shared = len(storages[_storage_id(v)]) > 1
            t = v.to("cpu").contiguous()
            tensors[key] = t.clone() if shared else t
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


def _write(path: Path, tensors, aliases, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", **metadata}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)


def save_state(path: Path, parts) -> None:
    """Write ``split_state``'s parts to ``path``."""
    tensors, aliases, scalars = parts
    _write(path, tensors, aliases, {_SCALARS_KEY: json.dumps(scalars, sort_keys=True, allow_nan=False)} if scalars else {})


def _read(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        out = {k: f.get_tensor(k) for k in f.keys()}
    for dup, canon in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        out[dup] = out[canon]
    return out, meta


def load_state(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A flat state dict written by ``save_state`` (tensors on ``device``, aliases and scalars restored)."""
    out, meta = _read(path, device)
    out.update(json.loads(meta.get(_SCALARS_KEY, "{}")))
    return out


# ------------------------------------------------------------------------------------- nested state


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON for ``obj`` with each tensor replaced by ``{"tensor": PATH}`` and put in ``tensors[PATH]``.

    Tuples become ``{"tuple": [...]}`` and dicts ``{"dict": [[key, value], ...]}`` (keys str or
    int), so that ``decode_tree`` gives back the same types (any dict as a dict); other objects raise
    TypeError."""
    where = path or "the root"
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"state: two entries are both stored as {path!r}")
        tensors[path] = obj
        return {"tensor": path}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if type(obj) in (list, tuple):
        items = [encode_tree(v, tensors, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"tuple": items}
    if isinstance(obj, dict):
        bad = [k for k in obj if isinstance(k, bool) or not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"state: key {bad[0]!r} at {where} is neither a string nor an int")
        return {"dict": [[k, encode_tree(v, tensors, f"{path}/{k}" if path else str(k))] for k, v in obj.items()]}
    raise TypeError(f"state: {where} is a {type(obj).__name__}, which cannot be saved without pickle "
                    "(expected tensors, numbers, strings, None, lists, tuples and dicts)")


def decode_tree(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``encode_tree``: ``node`` with its tensor references looked up in ``tensors``."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode_tree(v, tensors) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (tag, value), = node.items()
        if tag == "tensor" and isinstance(value, str):
            if value not in tensors:
                raise ValueError(f"state: the structure names a tensor {value!r} that was not stored")
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == "tuple" and isinstance(value, list):
            return tuple(decode_tree(v, tensors) for v in value)
        if tag == "dict" and isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in value):
            return {k: decode_tree(v, tensors) for k, v in value}
    raise ValueError(f"state: unexpected node {str(node)[:80]!r} in a saved structure")


def tree_refs(node: Any) -> set[str]:
    """The tensor paths an ``encode_tree`` structure refers to."""
    if isinstance(node, list):
        return set().union(*map(tree_refs, node)) if node else set()
    if isinstance(node, dict):
        if isinstance(node.get("tensor"), str):
            return {node["tensor"]}
        return tree_refs(list(node.values()))
    return set()


def encode_state(obj: Any, arg: str) -> tuple[str, tuple]:
    """(structure as JSON, ``split_state`` parts of its tensors) of any state made of tensors, numbers,
    strings, None, lists, tuples and dicts; TypeError naming ``arg`` for anything else."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = encode_tree(obj, tensors)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{arg}: {e}") from None
    return json.dumps(tree, allow_nan=False), split_state(tensors, arg, allow_scalars=False)


def save_tree(path: Path, encoded: tuple[str, tuple]) -> None:
    """Write ``encode_state``'s result to ``path``."""
    tree, (tensors, aliases, _) = encoded
    _write(path, tensors, aliases, {_TREE_KEY: tree})


def load_tree(path: Path, device: str = "cpu") -> Any:
    """The state ``save_tree`` wrote to ``path``."""
    tensors, meta = _read(path, device)
    if _TREE_KEY not in meta:
        raise ValueError(f"{path}: has no {_TREE_KEY} structure")
    return decode_tree(json.loads(meta[_TREE_KEY]), tensors)


# ----------------------------------------------------------------------------------- comparisons


def describe_mismatch(missing: list[str], unexpected: list[str], n: int = 5) -> str:
    def brief(keys: list[str]) -> str:
        more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
        return ", ".join(keys[:n]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} [{brief(missing)}]")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} [{brief(unexpected)}]")
    return "; ".join(parts)


def match_state(expected: Mapping[str, Any], saved: Mapping[str, Any], strict: bool, arg: str) -> None:
    """Raise ValueError naming ``arg`` when ``saved`` does not fit ``expected`` (keys when strict, shapes)."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"{arg}: keys don't match the checkpoint's: {describe_mismatch(missing, unexpected)}")
    bad = [
        f"{k!r} {tuple(a.shape)} vs {tuple(saved[k].shape)}"
        for k, a in expected.items()
        if k in saved and isinstance(a, torch.Tensor) and isinstance(saved[k], torch.Tensor)
        and tuple(a.shape) != tuple(saved[k].shape)
    ]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{arg}: shapes don't match the checkpoint's (yours vs saved): {', '.join(bad[:5])}{more}")


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states: torch's CPU and CUDA generators (tensors), Python's and numpy's (JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s.cpu().clone()
    v, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    js: dict[str, Any] = {
        "python_random": {"version": v, "state": list(internal), "gauss_next": gauss},
        "numpy": {"bit_generator": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "cuda_device_count": len(tensors) - 1,
    }  # fmt: skip
    return tensors, js


def restore_rng(tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any], where: Path, warning: type[Warning]) -> None:
    """Set the global RNG states ``rng_state`` returned (CUDA ones as far as this machine has devices)."""
    torch.set_rng_state(tensors["torch_cpu"].to("cpu", torch.uint8))
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(sum(k.startswith("torch_cuda_") for k in tensors))]
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(f"{where}: has CUDA RNG states but CUDA is not available; not restored", warning, stacklevel=3)
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                warnings.warn(f"{where}: saved {len(cuda)} CUDA RNG states, {n} devices now; "
                              f"restoring {min(n, len(cuda))}", warning, stacklevel=3)
            for i in range(min(n, len(cuda))):
                torch.cuda.set_rng_state(cuda[i].to("cpu", torch.uint8), i)
    pr = js.get("python_random")
    if pr is not None:
        random.setstate((pr["version"], tuple(pr["state"]), pr["gauss_next"]))
    npj = js.get("numpy")
    if npj is not None:
        np.random.set_state((npj["bit_generator"], np.asarray(npj["keys"], dtype=np.uint32), npj["pos"],
                             npj["has_gauss"], npj["cached_gaussian"]))
