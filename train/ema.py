"""Exponential moving average (EMA) of a model's weights, the weights sampling and the next stage use.

The engines update it after every optimizer step; checkpoints store ``state_dict()`` (tensors under
``shadow.NAME`` plus JSON-able scalars). Under FSDP2 the averages are DTensors sharded like the
parameters they follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .state_files import describe_mismatch

__all__ = ["EMA"]


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
            p = _lookup(params, name, "parameter").detach().to(device=s.device, dtype=s.dtype)
            if s.is_floating_point():
                s.lerp_(p, 1.0 - d)
            else:
                s.copy_(p)
        for name in self.buffer_names:
            self.shadow[name].copy_(_lookup(buffers, name, "buffer").detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters and buffers with the averages (cast to their dtype)."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name in self.param_names:
            _lookup(params, name, "parameter").copy_(self.shadow[name])
        for name in self.buffer_names:
            _lookup(buffers, name, "buffer").copy_(self.shadow[name])

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
            raise ValueError(f"state_dict: EMA names don't match: {describe_mismatch(missing, unexpected)}")
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


def _lookup(d: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    try:
        return d[name]
    except KeyError:
        raise ValueError(f"model: has no {what} {name!r} (the EMA was made from a different model)") from None
