"""Optional ColossalAI engine for training (``[parallel] engine = "colossalai"``).

Open-Sora 1.0 trained STDiT with ColossalAI's ``Booster`` and ZeRO-2 (``LowLevelZeroPlugin``).
This module gives the same choice on top of our own model and optimizer, behind three calls:

    model, optimizer, booster = boost(model, optimizer, plugin="zero2", device=device, bf16=True, grad_clip=1.0)
    ...
    loss = ...; optimizer.zero_grad(); backward(booster, loss, optimizer); optimizer.step()
    ...
    save(booster, model, optimizer, path) / load(booster, model, optimizer, path)

Plugins (``plugin=``):

* ``"zero2"`` -- ``LowLevelZeroPlugin(stage=2)``: optimizer states and gradients sharded over the
  ranks, parameters replicated; ``bf16=True`` keeps bf16 working weights and fp32 master weights
  (Open-Sora's setting). **GPU only**: ColossalAI's ZeRO optimizer did not run on CPU (gloo) here,
  so on a CPU device ``boost`` raises a ``RuntimeError`` that says so (use "hybrid" or "ddp"
  there). Not exercised by the CPU test suite; check it on a GPU machine.
* ``"hybrid"`` -- ``HybridParallelPlugin(tp_size=1, pp_size=1, zero_stage=0)``: plain data
  parallel through ColossalAI's hybrid wrapper (torch DDP inside) with gradient clipping in its
  optimizer wrapper. No tensor or pipeline parallelism (STDiT has no ShardFormer policy; a no-op
  policy is supplied). ``bf16=True`` casts the model to bf16 with fp32 master weights. **Runs on
  CPU (gloo) and GPU.** Its optimizer wrapper carries the gradient norm as a float32 number, so
  the clip factor is float32-rounded (the only difference from torch's clip_grad_norm_). ZeRO inside this plugin (zero_stage >= 1) is not offered: it needs fp16/bf16
  and the same ZeRO optimizer that fails on CPU; use "zero2" on GPUs for that.
* ``"ddp"`` -- ``TorchDDPPlugin``: torch DDP under ColossalAI's checkpoint IO. **Runs on CPU
  (gloo) and GPU.** ColossalAI's bf16 mixed precision for this plugin is a stub, so ``bf16``
  means nothing here: run the forward under ``torch.autocast`` (the trainer does on GPU).
  Gradients are clipped to ``grad_clip`` inside ``optimizer.step()`` (as the other plugins do).

In every plugin gradient clipping happens inside ``optimizer.step()`` (``grad_clip <= 0``: none);
``grad_norm(optimizer)`` gives the norm of the last step (before clipping) for logging.

Launch: under torchrun. ``boost`` joins torchrun's process group with
``colossalai.launch_from_torch`` unless a group already exists (e.g. from
``stdit.train.parallel.init_distributed``); ColossalAI's launch re-seeds every RNG (seed 1024),
so the caller's RNG states are saved and restored around it.

Checkpoints (``save`` / ``load``): the booster's own checkpoint IO, sharded (a directory with an
index and shard files for the model and for the optimizer; each plugin gathers/shards its state as
it needs). Every rank writes into ``path.tmp-colossalai``; after a barrier rank 0 writes the
``COMPLETE`` marker (with ``extra`` as JSON) and renames the directory to ``path``, so a killed
job never leaves a ``path`` that looks complete. Load it back with the same plugin (tested: same
plugin and world size). The model part is HuggingFace-style sharded safetensors with the plain
module's parameter names. An optional ``ema`` name -> tensor dict is saved by rank 0 beside it.

CPU note: ColossalAI 0.5.0's CPU accelerator raises in ``synchronize()``, which its optimizer
checkpoint loading calls; ``launch`` installs a CPU accelerator whose ``synchronize()`` does nothing.

Installing ColossalAI without touching torch: see ``INSTALL`` (colossalai 0.5.0 pins
torch <= 2.5.1, so a plain ``pip install colossalai`` would replace torch).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

PLUGINS = ("zero2", "hybrid", "ddp")
DONE = "COMPLETE"

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


def _rng_state() -> tuple:
    import numpy as np

    return random.getstate(), np.random.get_state(), torch.get_rng_state(), (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    )


def _set_rng_state(state: tuple) -> None:
    import numpy as np

    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


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
    state = _rng_state()
    colossalai.launch_from_torch(verbose=False)  # backend follows the accelerator: nccl on cuda, gloo on cpu
    _set_rng_state(state)


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
    """The ColossalAI plugin object for ``plugin`` (after ``launch``)."""
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


def save(booster, model, optimizer, path: str | Path, *, extra: dict | None = None,
         ema: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Save the boosted model and optimizer with the booster's sharded checkpoint IO (all ranks call).

    Layout: ``path/model/`` (index + shards, safetensors), ``path/optimizer/`` (index + shards),
    optional ``path/ema.safetensors`` (rank 0's copy of a name -> tensor dict, e.g. an EMA's
    shadow of the replicated model), ``path/COMPLETE`` (``extra`` as JSON). Written to
    ``path.tmp-colossalai`` and renamed by rank 0 after a barrier (atomic publish).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp-colossalai")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
    booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    if ema is not None and rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    from .parallel import publish

    return publish(tmp, path, extra)


def load(booster, model, optimizer, path: str | Path, *, ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Load a ``save`` checkpoint into the boosted model and optimizer (all ranks call); the
    ``ema`` dict's tensors are filled in place when given. Returns the saved ``extra``."""
    path = Path(path)
    if not (path / DONE).is_file():
        raise FileNotFoundError(f"path: {path} is not a complete ColossalAI checkpoint (no {DONE} marker)")
    booster.load_model(model, str(path / "model"))
    if optimizer is not None:
        booster.load_optimizer(optimizer, str(path / "optimizer"))
    if ema is not None:
        from safetensors.torch import load_file

        saved = load_file(str(path / "ema.safetensors"))
        missing = sorted(set(ema) - set(saved))
        if missing:
            raise KeyError(f"path: {path} has no EMA entries for {missing[:5]}")
        with torch.no_grad():
            for k, v in ema.items():
                v.copy_(saved[k].to(v.device, v.dtype))
    _barrier()
    return json.loads((path / DONE).read_text() or "{}")


def latest(root: str | Path) -> tuple[int, Path] | None:
    """(step, path) of the highest-step complete ``root/step-*`` checkpoint written by ``save``, or None
    (the same layout and ``COMPLETE`` marker as stdit.train.parallel's distributed checkpoints)."""
    from .parallel import latest_distributed

    return latest_distributed(root)
