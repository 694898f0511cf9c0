"""Optional ColossalAI engine for training (``[parallel] engine = "colossalai"``).

Open-Sora 1.0 trained STDiT with ColossalAI's ``Booster`` and ZeRO-2 (``LowLevelZeroPlugin``).
This module gives the same choice on top of our own model and optimizer, behind a few calls:

    model, optimizer, booster = boost(model, optimizer, plugin="zero2", device=device, bf16=True, grad_clip=1.0)
    loss = ...; optimizer.zero_grad(); backward(booster, loss, optimizer); optimizer.step()
    save(booster, model, optimizer, root, step) / load(booster, model, optimizer, latest(root))

Plugins (see ``make_plugin``): "zero2" (GPU only), "hybrid" and "ddp" (CPU with gloo, and GPU).
Every plugin clips gradients inside ``optimizer.step()``; ``grad_norm(optimizer)`` gives the norm
of the last step for logging. Run under torchrun: ``boost`` joins torchrun's process group.

Checkpoints go through the booster's own sharded checkpoint IO, published under the policy of
stdit.train.checkpoint. Its optimizer shards are ``torch.save`` files that ColossalAI reads with
``torch.load``, so ``load`` first checks every file against the size and SHA-256 that meta.json
recorded when this run saved it: only what the run itself wrote is ever unpickled.

ColossalAI pins torch <= 2.5.1; ``INSTALL`` installs it beside the torch there is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import CheckpointKind, read_meta, write_checkpoint
from .checkpoint import latest as latest_checkpoint_of
from .state_files import load_state, restore_rng, rng_state, save_state, split_state

PLUGINS = ("zero2", "hybrid", "ddp")
COLOSSAL = CheckpointKind("colossal", "stdit-colossalai", 1, "ColossalAI checkpoint")
EMA_FILE = "ema.safetensors"

INSTALL = (
    "pip install --no-deps colossalai==0.5.0 && "
    "pip install psutil && "
    "pip install --no-deps peft accelerate galore-torch bitsandbytes"
)
"""Command sequence that makes ``colossalai`` and its Booster importable beside the installed torch
(needs numpy, packaging, pyyaml, tqdm, rich, click, pydantic, safetensors, einops, transformers and
huggingface_hub, which the project installs anyway)."""


class ColossalAIUnavailable(ImportError):
    """colossalai (or one of its imports) is missing; the message carries the install command."""


def colossalai_available() -> str | None:
    """None when colossalai and its Booster import; otherwise the reason and the install command."""
    try:
        import colossalai  # noqa: F401
        from colossalai.booster import Booster  # noqa: F401
        from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin  # noqa: F401
    except Exception as e:  # ImportError, or a dependency failing at import time
        return (
            f"colossalai is not usable here ({type(e).__name__}: {e}). Install it without replacing torch "
            f"(colossalai 0.5.0 pins torch <= 2.5.1): {INSTALL}"
        )
    return None


def _require() -> None:
    reason = colossalai_available()
    if reason is not None:
        raise ColossalAIUnavailable(f"[parallel] engine = 'colossalai': {reason}")


# ----------------------------------------------------------------------------------------------------
# Launch and boost
# ----------------------------------------------------------------------------------------------------


def _cpu_accelerator():
    """ColossalAI's CPU accelerator with ``synchronize()`` a no-op (0.5.0 raises there, which breaks
    loading an optimizer checkpoint on CPU; CPU ops are synchronous, so nothing is lost)."""
    from colossalai.accelerator import CpuAccelerator

    class SyncCpuAccelerator(CpuAccelerator):
        def synchronize(self, device=None):
            return None

    return SyncCpuAccelerator()


def launch(device: torch.device) -> None:
    """Join torchrun's process group through ColossalAI (no-op when a group exists already), with
    ColossalAI's accelerator matching ``device`` ("cuda" or "cpu"); RNG states are left as they were."""
    _require()
    import colossalai
    from colossalai.accelerator import set_accelerator

    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: ColossalAI engine runs on 'cuda' or 'cpu', got {device}")
    set_accelerator(_cpu_accelerator() if device.type == "cpu" else "cuda")
    if dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", device.index or 0)))
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"[parallel] engine = 'colossalai' must be launched with torchrun (environment lacks {missing}); "
            "e.g. torchrun --nproc_per_node=N -m stdit.train train --config ... (N = 1 works too)"
        )
    state = rng_state()  # ColossalAI's launch seeds every RNG with 1024: keep the caller's streams
    colossalai.launch_from_torch(verbose=False)  # backend follows the accelerator: nccl on cuda, gloo on cpu
    restore_rng(*state, "colossalai.launch_from_torch", UserWarning)


def _no_shard_policy():
    from colossalai.shardformer.policies.base_policy import Policy

    class NoShardPolicy(Policy):
        """Leaves the model as it is (tp_size = pp_size = 1): STDiT has no built-in ShardFormer policy."""

        def config_sanity_check(self):
            pass

        def preprocess(self):
            return self.model

        def module_policy(self):
            return {}

        def postprocess(self):
            return self.model

    return NoShardPolicy()


def _clipping_wrapper(optimizer: torch.optim.Optimizer, max_norm: float):
    """An OptimizerWrapper whose step() clips the gradient norm first (for TorchDDPPlugin, whose
    wrapper does not clip); DDP gradients are already averaged, so the local norm is the global one."""
    from colossalai.interface import OptimizerWrapper

    class ClippingOptimizerWrapper(OptimizerWrapper):
        def __init__(self, optim, max_norm):
            super().__init__(optim)
            self.max_norm = float(max_norm)
            self._grad_norm = None

        def step(self, *args, **kwargs):
            params = [p for g in self.optim.param_groups for p in g["params"] if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm if self.max_norm > 0 else float("inf"))
                self._grad_norm = float(norm)
            return self.optim.step(*args, **kwargs)

        def get_grad_norm(self, norm_type=2, **kwargs):
            return self._grad_norm

    return ClippingOptimizerWrapper(optimizer, max_norm)


def make_plugin(plugin: str, device: torch.device, *, bf16: bool = False, grad_clip: float = 1.0):
    """The ColossalAI plugin object for ``plugin`` (after ``launch``).

    * "zero2": ``LowLevelZeroPlugin(stage=2)``, Open-Sora's: optimizer states and gradients sharded
      over the ranks, parameters replicated; ``bf16`` keeps bf16 working and fp32 master weights.
      GPU only: ColossalAI's ZeRO optimizer does not run on CPU (gloo), so a CPU device raises.
    * "hybrid": ``HybridParallelPlugin(tp_size=1, pp_size=1, zero_stage=0)``: data parallel through
      ColossalAI's hybrid wrapper (torch DDP inside), with a no-op ShardFormer policy (STDiT has
      none). Its optimizer wrapper carries the gradient norm as a float32 number, so the clip factor
      is float32-rounded: the only difference from torch's clip_grad_norm_.
    * "ddp": ``TorchDDPPlugin``: torch DDP under ColossalAI's checkpoint IO; its bf16 is a stub, so
      run the forward under ``torch.autocast`` (the trainer does on GPU); clipped by
      ``_clipping_wrapper``.
    """
    _require()
    from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    device = torch.device(device)
    max_norm = float(grad_clip) if grad_clip and grad_clip > 0 else 0.0
    if plugin == "zero2":
        if device.type != "cuda":
            raise RuntimeError(
                "plugin 'zero2' (ColossalAI LowLevelZeroPlugin, ZeRO stage 2) needs CUDA: ColossalAI's ZeRO "
                f"optimizer does not run on {device.type}. On CPU use plugin 'hybrid' or 'ddp'."
            )
        return LowLevelZeroPlugin(stage=2, precision="bf16" if bf16 else "fp32", max_norm=max_norm)
    if plugin == "hybrid":
        return HybridParallelPlugin(
            tp_size=1, pp_size=1, zero_stage=0, precision="bf16" if bf16 else "fp32", max_norm=max_norm,
            custom_policy=_no_shard_policy(),
        )  # fmt: skip
    if plugin == "ddp":
        return TorchDDPPlugin()
    raise ValueError(f"plugin: expected one of {PLUGINS}, got {plugin!r}")


def boost(model: nn.Module, optimizer: torch.optim.Optimizer, *, plugin: str = "zero2", device: torch.device | str,
          bf16: bool = False, grad_clip: float = 1.0):  # fmt: skip
    """Launch from torchrun's environment (if needed), build a Booster for ``plugin`` and boost.

    ``bf16`` with "zero2"/"hybrid": bf16 parameters and activations with fp32 master weights in the
    optimizer (a model with a ``dtype`` attribute, as STDiT has, gets ``dtype = torch.bfloat16``);
    with "ddp" it does nothing (use torch.autocast around the forward).

    Returns ``(model, optimizer, booster)``: the boosted model (a ColossalAI ModelWrapper; call it
    like the model, ``model.unwrap()`` is the plain module) and optimizer wrapper (``step()`` clips
    to ``grad_clip``). Build the optimizer on ``model.parameters()`` before calling this.
    """
    if plugin not in PLUGINS:
        raise ValueError(f"plugin: expected one of {PLUGINS}, got {plugin!r}")
    _require()
    from colossalai.booster import Booster

    device = torch.device(device)
    if plugin == "zero2" and device.type != "cuda":
        make_plugin(plugin, device, bf16=bf16, grad_clip=grad_clip)  # raises the clear error, before launching
    launch(device)
    if bf16 and plugin != "ddp" and isinstance(getattr(model, "dtype", None), torch.dtype):
        # the plugin casts parameters (and floating inputs) to bf16; STDiT casts its inputs to its own
        # ``dtype`` attribute (Open-Sora configured the model with dtype bf16 for the same reason)
        model.dtype = torch.bfloat16
    if plugin == "ddp":
        optimizer = _clipping_wrapper(optimizer, grad_clip)
    booster = Booster(plugin=make_plugin(plugin, device, bf16=bf16, grad_clip=grad_clip))
    model, optimizer, *_ = booster.boost(model, optimizer)
    return model, optimizer, booster


def backward(booster, loss: torch.Tensor, optimizer) -> None:
    """``booster.backward``: the plugin's backward (ZeRO: gradient reduce-scatter into shards)."""
    booster.backward(loss, optimizer)


def grad_norm(optimizer) -> float | None:
    """Total gradient norm (before clipping) of the last ``optimizer.step()``, when the plugin tracks it."""
    norm = optimizer.get_grad_norm() if hasattr(optimizer, "get_grad_norm") else None
    return None if norm is None else float(norm)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(booster, model, optimizer, root: str | Path, step: int, *, ema: dict[str, torch.Tensor] | None = None,
         data_position: Any = None, extra: Any = None, keep_last: int | None = None) -> Path:  # fmt: skip
    """Save the boosted model and optimizer as ``root/step-{step:09d}`` (all ranks call).

    Layout: ``model/`` (index + safetensors shards, the plain module's names), ``optimizer/`` (index
    + torch.save shards), ``ema.safetensors`` (rank 0's copy of a name -> tensor dict, e.g. an EMA's
    shadow of the replicated model) and meta.json.
    """

    def write(tmp: Path) -> dict:
        booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
        booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
        if ema is not None and _rank() == 0:
            save_state(tmp / EMA_FILE, split_state(ema, "ema", allow_scalars=False))
        return {"model": "model", "optimizer": "optimizer", "ema": EMA_FILE if ema is not None else None}

    return write_checkpoint(root, step, COLOSSAL, write, data_position=data_position, extra=extra,
                            keep_last=keep_last, distributed=True)  # fmt: skip


def load(booster, model, optimizer, path: str | Path, *, ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Load a ``save`` checkpoint into the boosted model and optimizer (all ranks call); the ``ema``
    dict's tensors are filled in place when given. Returns its meta.json.

    Every file is checked against meta.json's size and SHA-256 before the booster reads any of it
    (ValueError if one differs, is missing or is not listed)."""
    path = Path(path)
    meta = read_meta(path, COLOSSAL, verify=True)
    saved = load_state(path / EMA_FILE) if ema is not None else None
    if saved is not None and set(ema) - set(saved):
        raise KeyError(f"path: {path} has no EMA entries for {sorted(set(ema) - set(saved))[:5]}")
    booster.load_model(model, str(path / "model"))
    if optimizer is not None:
        booster.load_optimizer(optimizer, str(path / "optimizer"))
    if saved is not None:
        with torch.no_grad():
            for k, v in ema.items():
                v.copy_(saved[k].to(v.device, v.dtype))
    _barrier()
    return meta


def latest(root: str | Path) -> Path | None:
    """The highest-step complete checkpoint ``save`` wrote under ``root``, or None."""
    return latest_checkpoint_of(root, COLOSSAL)
