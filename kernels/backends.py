"""The attention backend registry: names, availability (with the reason and the fix), and "auto".

A backend is a module with three functions:

    availability(device: torch.device) -> str | None
        None when the backend runs on ``device``; otherwise why not and how to get it.
    self_attention(qkv, kind, num_frames, scale) -> out
        kind is "spatial", "temporal" or "full"; qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D).
    cross_attention(q, kv, kv_lens, scale) -> out
        q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D).

Inputs arrive validated (see validate.py). Optional packages are imported lazily inside each module,
never at import time of :mod:`stdit.kernels`. ``sdpa`` accepts a pinned sub-backend as
``"sdpa:flash"``, ``"sdpa:efficient"``, ``"sdpa:cudnn"`` or ``"sdpa:math"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module (relative to this package) implementing the backend
_MODULES = {
    "triton": ".triton_attention",
    "sdpa": ".sdpa_attention",
    "flex": ".flex_attention",
    "flash_attn": ".flash_attn_adapter",
    "xformers": ".xformers_adapter",
    "reference": ".reference",
}
BACKENDS: tuple[str, ...] = tuple(_MODULES)


class BackendUnavailable(RuntimeError):
    """Raised when a backend was asked for by name but cannot run on the input's device."""


_LOADED: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    """The backend's module, imported once. Dispatch reads the ``_LOADED`` dict directly so that
    torch.compile traces it (importlib itself is opaque to Dynamo)."""
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(_MODULES[name], __package__)
    return mod


def split_name(backend: str) -> tuple[str, str | None]:
    """'sdpa:flash' -> ('sdpa', 'flash'); 'triton' -> ('triton', None)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
    base, _, sub = backend.partition(":")
    if base != "auto" and base not in _MODULES:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
    if sub and base != "sdpa":
        raise ValueError(f"backend: only 'sdpa' takes a sub-backend (e.g. 'sdpa:flash'), got {backend!r}")
    return base, (sub or None)


def availability(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason and how to get it."""
    base, sub = split_name(name)
    if base == "auto":
        return None
    try:
        mod = _module(base)
    except ImportError as e:
        return f"cannot import its module: {e}"
    if sub is not None:
        return mod.availability(torch.device(device), sub)
    return mod.availability(torch.device(device))


def auto_backend(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """The backend "auto" picks for an input on ``device`` (with ``dtype`` and ``head_dim`` if known).

    CUDA: our Triton kernels, for the dtypes and head dims they take (16-bit and fp32, D <= 128),
    else SDPA. CPU: SDPA (Triton runs on CPU only through its interpreter, a correctness tool).
    """
    from .triton_common import triton_takes

    if device.type != "cuda" or not triton_takes(dtype, head_dim):
        return "sdpa"
    if torch.compiler.is_compiling() or availability("triton", device) is None:
        return "triton"
    return "sdpa"


def resolve(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> tuple[ModuleType, str | None]:
    """Turn a backend name into its module (and sdpa sub-backend), or raise why it cannot run.

    Under torch.compile the availability check (package look-ups, environment, probes) is skipped:
    the same call has already run eagerly or fails inside the backend with its own error, and the
    dispatch itself is then a dict look-up that Dynamo traces without a graph break.
    """
    base, sub = split_name(backend)
    if base == "auto":
        base, sub = auto_backend(device, dtype, head_dim), None
    if torch.compiler.is_compiling():
        return _LOADED[base], sub
    reason = availability(base if sub is None else f"{base}:{sub}", device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reason}")
    return _module(base), sub


def _preload() -> None:
    """Import every backend module now (optional packages stay lazy inside them), so that dispatch
    never imports under torch.compile. A backend whose module cannot import (e.g. no triton) is
    left out of _LOADED and reports the import error through availability()."""
    for name in _MODULES:
        try:
            _module(name)
        except ImportError:
            pass


def report(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """{backend name: None if available on ``device`` else the reason}, for ``stdit info``."""
    return {name: availability(name, device) for name in BACKENDS}
