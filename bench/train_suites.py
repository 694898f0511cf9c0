"""Training-step suites of the benchmark harness.

``train``: one process, a full STDiT training step (IDDPM loss, backward, AdamW) with the text and
video encoders run every step, as Open-Sora 1.0 did ("online-encode"), against training from
latents and text embeddings encoded once by ``stdit prepare`` ("cached", ours), and the cached step
with activation checkpointing. Encoders are the tiny in-code ones unless STDIT_VAE_DIR /
STDIT_T5_DIR point at local sd-vae-ft-ema / t5-v1_1-xxl folders (the rows' dims say which). With a
tiny random encoder the online-encode cost is not Open-Sora's, so those rows are stand-ins: their
dims carry ``stand_in`` (why), and the report shows them apart, out of every speedup and mean.

``parallel``: the same step under each data/sequence-parallel layout, run by torchrun on every GPU
(or 2 gloo processes on a CPU): DDP, FSDP2, FSDP2 + activation checkpointing, Ulysses and DSP
sequence parallel over all ranks (with FSDP2), and ColossalAI ZeRO-2 where installed. Each case is
a torchrun job (stdit.bench.parallel_worker) that times its own steps after warm-up and reports the
median, p20/p80 and peak memory of rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from stdit.common.dtypes import dtype_bytes, short_name
from stdit.models import costs

from .cases import Case, Size, VideoShape
from .timing import Timing

TRAIN_VARIANTS = {  # label -> (encode every step, activation checkpointing, ours)
    "online-encode": (True, False, False),
    "cached": (False, False, True),
    "cached+checkpoint": (False, True, True),
}
PARALLEL_LAYOUTS = {  # label -> worker layout
    "ddp": dict(data_parallel="ddp"),
    "fsdp2": dict(data_parallel="fsdp2"),
    "fsdp2+checkpoint": dict(data_parallel="fsdp2", checkpoint=True),
    "sp-ulysses": dict(data_parallel="fsdp2", sp="all", sp_mode="ulysses"),
    "sp-ulysses-generic": dict(data_parallel="fsdp2", sp="all", sp_mode="ulysses_generic"),
    "sp-dsp": dict(data_parallel="fsdp2", sp="all", sp_mode="dsp"),
    "colossalai-zero2": dict(engine="colossalai", plugin="zero2"),
}


def _encoders(device: torch.device, model_max_length: int):
    from stdit.train.encoders import TextEncoder, VideoVAE

    vae_dir, t5_dir = os.environ.get("STDIT_VAE_DIR"), os.environ.get("STDIT_T5_DIR")
    vae = VideoVAE.from_pretrained(vae_dir) if vae_dir else VideoVAE.tiny(seed=0)
    text = (TextEncoder.from_pretrained(t5_dir, model_max_length=model_max_length) if t5_dir
            else TextEncoder.tiny(seed=0, model_max_length=model_max_length))  # fmt: skip
    return vae.to(device), text.to(device)


def _train_case(label: str, shape: VideoShape, size: Size, dtype, device) -> Case:
    online, checkpoint, ours = TRAIN_VARIANTS[label]
    T, Hl, Wl = shape.latent
    sizes = size.model.replace(input_size=(T, Hl, Wl))
    B, L = shape.batch, sizes.model_max_length
    cost = costs.model_cost(
        "stdit", size=sizes, frames=shape.frames, height=shape.resolution, width=shape.resolution, batch=B,
        mode="train_step", checkpoint=checkpoint, elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip
    local = {name: bool(os.environ.get(var)) for name, var in (("vae", "STDIT_VAE_DIR"), ("t5", "STDIT_T5_DIR"))}
    encoders = ", ".join(f"{name}={'local' if ok else 'tiny'}" for name, ok in local.items())
    tiny = [name.upper() for name, ok in local.items() if not ok]
    stand_in = (
        f"tiny random {' and '.join(tiny)} stand-in encoders, not Open-Sora's (set STDIT_VAE_DIR / STDIT_T5_DIR "
        "to local sd-vae-ft-ema / t5-v1_1-xxl folders for the real ones)"
    ) if tiny else None  # fmt: skip

    def build(dev: torch.device):
        from stdit.models import STDiT
        from stdit.train.diffusion import IDDPM

        vae, text = _encoders(dev, L)
        torch.manual_seed(0)
        model_sizes = sizes.replace(caption_channels=text.hidden_size)
        model = STDiT(**model_sizes.kwargs(), attention_backend="auto", checkpoint=checkpoint).to(dev)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        diffusion = IDDPM()
        g = torch.Generator(device=dev).manual_seed(0)
        video = torch.rand((B, 3, shape.frames, shape.resolution, shape.resolution), generator=g, device=dev) * 2 - 1
        captions = ["a red circle moving from left to right on a dark blue background"] * B
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and dtype == torch.bfloat16)
        cached = None if online else (vae.encode(video), *text.encode(captions))

        def step():
            lat, y, mask = cached if cached is not None else (vae.encode(video), *text.encode(captions))
            t = torch.randint(0, 1000, (B,), device=dev)
            with autocast:
                loss = diffusion.training_losses(model, lat.float(), t, dict(y=y.float(), mask=mask))["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    dims = dict(B=B, T=T, S=shape.tokens_per_frame, C=sizes.hidden_size, depth=sizes.depth, L=L,
                checkpoint=checkpoint, encoders=encoders, stand_in=stand_in)  # fmt: skip
    return Case("train", "stdit_train_step", label, ours, shape, "train_step", dtype, dims, build, cost,
                tokens=shape.tokens)  # fmt: skip


def train_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    shapes = size.train_shapes or size.shapes[:1]
    return [_train_case(label, shape, size, dtype, device) for shape in shapes for label in TRAIN_VARIANTS]


# ----------------------------------------------------------------------------------------------------
# parallel: torchrun jobs that time themselves
# ----------------------------------------------------------------------------------------------------


def _nproc(device: torch.device) -> int:
    return torch.cuda.device_count() if device.type == "cuda" else 2


def _parallel_case(label: str, shape: VideoShape, size: Size, dtype, device) -> Case:
    layout = dict(PARALLEL_LAYOUTS[label])
    n = _nproc(device)
    T, Hl, Wl = shape.latent
    sizes = size.model.replace(input_size=(T, Hl, Wl))
    sp = n if layout.get("sp") == "all" else 1
    dp = n // sp
    spec = dict(layout=layout, sp=sp, dp=dp, batch=shape.batch, model=sizes.kwargs(),
                dtype=short_name(dtype))  # fmt: skip
    global_batch = shape.batch * dp
    cost = costs.model_cost(
        "stdit", size=sizes, frames=shape.frames, height=shape.resolution, width=shape.resolution,
        batch=global_batch, mode="train_step", checkpoint=bool(layout.get("checkpoint")), elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip
    skip = None
    if n < 2:
        skip = f"unsupported: parallel layouts need >= 2 devices, this machine has {n}"
    elif layout.get("sp_mode") in ("ulysses", "ulysses_generic") and sizes.num_heads % sp:
        skip = f"unsupported: Ulysses needs num_heads ({sizes.num_heads}) divisible by sp ({sp})"
    elif layout.get("engine") == "colossalai":
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # colossalai warns about optional extras on import
                from stdit.train.colossal import colossalai_available

                reason = colossalai_available()
        except ImportError as e:
            reason = str(e)
        if reason:
            skip = f"unsupported: {reason}"
        elif device.type != "cuda":
            skip = "unsupported: ColossalAI's LowLevelZero (ZeRO-2) plugin needs CUDA"

    def measure(dev: torch.device, quick: bool) -> Timing:
        spec["steps"] = 3 if quick else 10
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "stdit.bench.parallel_worker", json.dumps(spec)]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = " ".join((proc.stderr or proc.stdout).split()[-60:])
            if "out of memory" in tail.lower():
                raise torch.cuda.OutOfMemoryError(tail)
            raise RuntimeError(f"torchrun job failed (exit {proc.returncode}): {tail}")
        r = json.loads(lines[-1])
        return Timing(r["median_ms"], r["p20_ms"], r["p80_ms"], r["reps"], r.get("peak_mem_mb"),
                      timer="torchrun steps (host clock, synchronised)")

    dims = dict(processes=n, dp=dp, sp=sp, batch_per_dp_rank=shape.batch, global_batch=global_batch, T=T,
                S=shape.tokens_per_frame, C=sizes.hidden_size, depth=sizes.depth, **{
                    k: v for k, v in layout.items() if k != "sp"})  # fmt: skip
    return Case("parallel", "stdit_train_step", label, label != "colossalai-zero2", shape, "train_step", dtype, dims,
                build=None, cost=cost, skip=skip, tokens=shape.tokens, measure=measure)  # fmt: skip


def parallel_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    shapes = size.train_shapes or size.shapes[:1]
    return [_parallel_case(label, shape, size, dtype, device) for shape in shapes for label in PARALLEL_LAYOUTS]
