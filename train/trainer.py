"""One training stage of Open-Sora's recipe, and chains of stages.

``train_stage(config)`` runs one stage from a :mod:`stdit.train.config` file. It builds the encoders
and the model (stdit.train.build), the batches (stdit.train.batches) and the engine for the launch
(stdit.train.engines: one process, torch.distributed or ColossalAI), which resumes from
``run.out_dir``'s newest checkpoint, so a killed run continues the same loss trajectory, or starts
from ``stage.init_from``. An STDiT image stage (num_frames = 1) freezes the temporal attention at its
zero initialisation (PixArt-alpha has none), so that the next, video stage starts as the image model.

Training: ``[diffusion] kind`` = "iddpm" (STDiT, Open-Sora 1.0): the IDDPM loss (stdit.train.diffusion)
at uniformly drawn timesteps; "rflow" (STDiT3, Open-Sora 1.2): the rectified-flow loss
(stdit.train.rflow), which draws (and transforms) t itself, with random conditioning frames
(``mask_ratios``, stdit.train.masks: the same mask is STDiT3's x_mask and the loss's frame mask, drawn
from a generator seeded by the run's seed and the step, so a resumed run draws the same) and STDiT3's
size conditioning (``model_kwargs``: fps, pixel height / width, frames, aspect ratio). AdamW (fused on
CUDA; apex FusedAdam when asked for), gradient-norm clipping, EMA, bf16 autocast on GPU. It logs
loss, samples/s, tokens/s, model TFLOP/s and MFU (cost-model FLOPs over the datasheet peak, on
GPUs), memory to ``out_dir/log.csv`` with a progress bar, checkpoints every
``ckpt_every`` steps and at the end, and scores a fixed evaluation (same batches, timesteps and
noise every time: :class:`FixedEval`) at the start and at every checkpoint into
``out_dir/eval.csv``, the trend the noisy per-step loss cannot show.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from stdit.common.files import atomic_path, write_json
from stdit.common.peaks import peak_flops
from stdit.models.costs import model_cost

from .batches import Batch, BatchSource
from .build import build_diffusion, build_encoders, build_model, resolve_device, seed_everything
from .build import temporal_parameter_names
from .config import ConfigError, StageConfig, load_config
from .data import DEFAULT_FPS
from .engines import make_engine
from .masks import MaskGenerator
from .rflow import RFlow

RESOLVED_CONFIG = "config.resolved.json"  # `stdit train --config` reads it back
LOG_COLUMNS = (
    "step", "epoch", "loss", "mse", "vb", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_s", "mfu_pct",
    "mem_mb", "skipped",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# What the model and the diffusion are called with
# ----------------------------------------------------------------------------------------------------


def model_kwargs(family: str, batch: Batch, x_mask: torch.Tensor | None = None) -> dict:
    """The keywords the model gets with a batch: text features ``y`` (B, 1, L, C) and their ``mask`` (B, L);
    for STDiT3 also, as Open-Sora 1.2's train.py passes them, ``x_mask`` (B, T) bool (True = generated frame;
    None: all generated), ``fps`` (B,), ``height`` and ``width`` (B,) in pixels of the video, ``num_frames``
    (B,) and ``ar`` (B,) = height / width, all float (the last two feed only the timestep transform)."""
    kwargs = dict(y=batch.y, mask=batch.mask)
    if family != "STDiT3":
        return kwargs
    B, device = batch.latents.shape[0], batch.latents.device
    T, H, W = batch.pixel_size

    def full(v: float) -> torch.Tensor:
        return torch.full((B,), float(v), device=device)

    fps = batch.fps if batch.fps is not None else full(DEFAULT_FPS)
    kwargs.update(x_mask=x_mask, fps=fps, height=full(H), width=full(W), num_frames=full(T), ar=full(H / W))
    return kwargs


def diffusion_losses(diffusion, net, family: str, batch: Batch, *, t=None, noise=None,
                     x_mask: torch.Tensor | None = None) -> dict:
    """One batch's loss terms through the stage's diffusion: IDDPM at timesteps ``t`` (B,) int (drawn
    uniformly when None); rectified flow at ``t`` (B,) float (drawn and transformed by RFlow when None),
    with ``x_mask`` as the model's conditioning mask and the loss's frame mask."""
    x0 = batch.latents
    kwargs = model_kwargs(family, batch, x_mask)
    if isinstance(diffusion, RFlow):
        return diffusion.training_losses(net, x0, kwargs, noise=noise, mask=x_mask,
                                         t=None if t is None else t.float())  # fmt: skip
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    return diffusion.training_losses(net, x0, t, model_kwargs=kwargs, noise=noise)


def mask_generator_for(cfg: StageConfig, seed: int):
    """The stage's conditioning-mask draw: (step, batch, frames) -> (B, T) bool or None (no mask_ratios).
    Each step draws from its own generator seeded by (seed, step): resuming needs no saved state."""
    if not cfg.diffusion.mask_ratios:
        return lambda step, batch, frames, device: None
    gen = MaskGenerator(cfg.diffusion.mask_ratios)

    def draw(step: int, batch: int, frames: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        return gen.get_masks(batch, frames, g, device=device)

    return draw


# ----------------------------------------------------------------------------------------------------
# Evaluation: a deterministic loss the per-step loss cannot give
# ----------------------------------------------------------------------------------------------------


class FixedEval:
    """The diffusion loss on fixed batches, fixed timesteps and fixed noise (no conditioning frames).

    The per-step training loss depends mostly on which timestep was drawn, so its trend over a short
    run is noise. This scores the same ``n`` batches (the first batches of epoch 0) at timesteps
    spread evenly over [0, 999] with noise from a fixed seed, so two evaluations differ only by the
    weights. RNG states are forked: evaluating never changes the training run's random stream.
    """

    def __init__(self, source: BatchSource, n: int, diffusion, seed: int, family: str = "STDiT"):
        self.batches, self.family = [], family
        if n <= 0:
            return
        saved = (source.epoch, source.batches_in_epoch)
        source.epoch, source.batches_in_epoch = 0, 0
        with torch.random.fork_rng(devices=[source.device] if source.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for batch in source:
                B = batch.latents.shape[0]
                i = len(self.batches)
                t = (torch.arange(B) * n + i) * (diffusion.num_timesteps - 1) // max(B * n - 1, 1)
                g = torch.Generator().manual_seed(seed + i)
                noise = torch.randn(batch.latents.shape, generator=g).to(batch.latents.device)
                self.batches.append((batch, t.to(batch.latents.device), noise))
                if len(self.batches) == n:
                    break
        source.epoch, source.batches_in_epoch = saved
        self.diffusion = diffusion

    @torch.no_grad()
    def __call__(self, model) -> dict | None:
        if not self.batches:
            return None
        was_training = model.training
        model.eval()
        loss = mse = 0.0
        with torch.random.fork_rng(devices=[]):
            for batch, t, noise in self.batches:
                terms = diffusion_losses(self.diffusion, model, self.family, batch, t=t, noise=noise)
                loss += terms["loss"].mean().item()
                mse += terms["mse"].mean().item() if "mse" in terms else math.nan
        model.train(was_training)
        n = len(self.batches)
        scores = {"eval_loss": loss / n}
        if not math.isnan(mse):  # rectified flow's loss is its MSE: no separate column
            scores["eval_mse"] = mse / n
        return scores


EVAL_COLUMNS = ("step", "eval_loss", "eval_mse", "ema_loss", "ema_mse")


def lr_at(step: int, o, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a stage of ``total`` steps: linear warm-up
    over ``o.warmup_steps``, then constant (Open-Sora 1.0) or cosine decay from ``o.lr`` to ``o.lr_min`` at
    the stage's last step. A pure function of the step, so a resumed run continues the same schedule."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return o.lr
    span = max(total - o.warmup_steps - 1, 1)
    frac = min(max(step - o.warmup_steps, 0) / span, 1.0)
    return o.lr_min + (o.lr - o.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


def _append_log(path: Path, row: dict, columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})


def _truncate_log(path: Path, step: int, columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    """Drop rows after ``step`` (a resumed run rewrites them) and rewrite the header as ``columns`` (a file
    from an older version keeps its values, new columns empty)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)


def step_flops(model, latent: tuple[int, int, int], samples: int, x_mask: bool = False) -> float:
    """Model FLOPs of one training step on ``samples`` clips of ``latent`` (T, H, W), as the cost model
    counts them (forward and backward of every layer, plus the recomputed forward of checkpointed
    blocks): the numerator of MFU. ``x_mask``: the step gave STDiT3 a conditioning mask (it then
    embeds timestep 0 as well). NaN for a family the cost model has no formula for (the log leaves
    TFLOP/s and MFU blank then)."""
    try:
        cost = model_cost(
            model.family.lower(), size=model.size, latent=latent, batch=samples, mode="train_step",
            checkpoint=model.checkpoint, **({"x_mask": True} if x_mask else {}),
        )  # fmt: skip
    except (ValueError, KeyError, NotImplementedError):  # a family the cost model does not count (yet)
        return math.nan
    return cost.flops


def train_stage(cfg: StageConfig | str | Path, *, progress: bool = True, max_steps: int | None = None) -> dict:
    """Run (or resume) one stage; returns a summary (steps, first/last mean loss, paths).

    ``max_steps`` stops early after that many steps of this invocation (tests, crash simulations).
    """
    if not isinstance(cfg, StageConfig):
        cfg = load_config(cfg)
    r = cfg.run
    out = Path(r.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg, resolve_device(r.device))
    device, progress = engine.device, progress and engine.main
    seed = r.seed + 1000003 * engine.dp_rank  # the sp ranks of a dp group draw the same noise, timesteps, drops
    seed_everything(seed)

    vae, text = build_encoders(cfg, device)
    model = build_model(cfg, text.hidden_size, device)
    family = model.family
    if cfg.data.num_frames == 1 and not cfg.data.buckets:  # STDiT image stage: keep temporal attention at zero
        frozen = set(temporal_parameter_names(model))
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
    diffusion = build_diffusion(cfg)
    draw_masks = mask_generator_for(cfg, seed)
    source = BatchSource(cfg, vae, text, device, dp_rank=engine.dp_rank, dp=engine.dp, progress=progress)
    start = engine.start(model, out)
    step = start.step
    source.restore(start.data_position)
    if step == 0:
        seed_everything(seed)  # the run's randomness does not depend on how it was initialised
    log_path, eval_path = out / "log.csv", out / "eval.csv"
    if engine.main:  # rows past the resumed step (or any, on a fresh start) came from a killed run
        _truncate_log(log_path, step)
        _truncate_log(eval_path, step, EVAL_COLUMNS)
        print(f"[{cfg.stage.name}] {start.note}; training to step {r.steps} on {engine.describe()}", file=sys.stderr)
        write_json(out / RESOLVED_CONFIG, cfg.to_dict())  # after overrides and defaults: what this run trains with

    evaluator = FixedEval(source, r.eval_batches if engine.evaluates else 0, diffusion, seed=r.seed, family=family)
    evals, ema_evals = [], []

    def evaluate(at: int) -> None:
        scores = evaluator(engine.model)
        if scores is None or not engine.main:
            return
        # The EMA weights too: they are what sampling and the next stage use, and they are far less
        # noisy than the live weights at a high constant learning rate.
        ema_scores = scores  # before the first update the averages are the weights themselves
        if engine.ema.num_updates:
            shadow_model = copy.deepcopy(engine.model)
            engine.ema.copy_to(shadow_model)
            ema_scores = evaluator(shadow_model)
        scores.update(ema_loss=ema_scores["eval_loss"], **({"ema_mse": ema_scores["eval_mse"]} if "eval_mse" in ema_scores else {}))
        evals.append(scores["eval_loss"])
        ema_evals.append(scores["ema_loss"])
        _append_log(eval_path, {"step": at, **{k: f"{v:.6f}" for k, v in scores.items()}}, EVAL_COLUMNS)

    if step == 0:
        eval_path.unlink(missing_ok=True)
        evaluate(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=engine.bf16)
    peak = peak_flops(device, torch.bfloat16 if engine.bf16 else torch.float32)  # None: no datasheet (a CPU)
    losses, t_last, done_here = [], time.perf_counter(), 0
    model.train()
    batches = iter(source)
    bar = tqdm(total=r.steps, initial=step, desc=cfg.stage.name, unit="step", file=sys.stderr, disable=not progress)
    window = {"samples": 0, "tokens": 0, "flops": 0.0, "skipped": 0}
    while step < r.steps and (max_steps is None or done_here < max_steps):
        batch = next(batches)
        x0 = batch.latents
        x_mask = draw_masks(step, x0.shape[0], x0.shape[2], device)
        with autocast:
            terms = diffusion_losses(diffusion, engine.net, family, batch, x_mask=x_mask)
        loss = terms["loss"].mean()
        grad_norm = engine.step(loss, lr_at(step, cfg.optim, r.steps))
        step += 1
        done_here += 1
        losses.append(loss.item())
        samples = x0.shape[0] * engine.dp  # the global batch
        window["samples"] += samples
        window["tokens"] += samples * math.prod(-(-n // p) for n, p in zip(x0.shape[2:], model.patch_size))
        window["flops"] += step_flops(model, tuple(x0.shape[2:]), samples, x_mask=x_mask is not None)
        window["skipped"] += batch.skipped
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if engine.main and (step % r.log_every == 0 or step == r.steps):
            now = time.perf_counter()
            dt = max(now - t_last, 1e-9)
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            _append_log(log_path, dict(
                step=step, epoch=source.epoch, loss=f"{losses[-1]:.6f}",
                mse=f"{terms['mse'].mean().item():.6f}" if "mse" in terms else "",
                vb=f"{terms['vb'].mean().item():.6f}" if "vb" in terms else "", grad_norm=f"{float(grad_norm):.4f}",
                samples_per_s=f"{window['samples'] / dt:.3f}", tokens_per_s=f"{window['tokens'] / dt:.1f}",
                tflops_per_s=f"{window['flops'] / dt / 1e12:.4g}" if not math.isnan(window["flops"]) else "",
                mfu_pct=f"{100 * window['flops'] / dt / (peak * engine.world):.3g}"
                if peak and not math.isnan(window["flops"]) else "",
                mem_mb=f"{mem:.0f}" if mem is not None else "", skipped=window["skipped"],
            ))  # fmt: skip
            t_last, window = now, {"samples": 0, "tokens": 0, "flops": 0.0, "skipped": 0}
        if step % r.ckpt_every == 0 or step == r.steps:
            t_pause = time.perf_counter()
            engine.save(out, step, data_position=source.position(), extra={"config": cfg.to_dict(), "stage": cfg.stage.name})
            evaluate(step)
            t_last += time.perf_counter() - t_pause  # samples/s measures training, not checkpoints and evaluations
    bar.close()
    last = engine.latest(out)
    k = max(1, len(losses) // 5)
    return {
        "stage": cfg.stage.name, "step": step, "steps_this_run": done_here, "out_dir": str(out),
        "checkpoint": str(last) if last else None, "init": start.note,
        "loss_first": float(np.mean(losses[:k])) if losses else None,
        "loss_last": float(np.mean(losses[-k:])) if losses else None,
        "eval_first": evals[0] if evals else None, "eval_last": evals[-1] if evals else None,
        "ema_eval_first": ema_evals[0] if ema_evals else None, "ema_eval_last": ema_evals[-1] if ema_evals else None,
    }  # fmt: skip


def train_chain(configs: list[str | Path], *, progress: bool = True, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Run stages in order; a stage whose ``init_from`` is "previous" starts from the one before.
    ``overrides`` (``table.key=value``, the command line's ``--set``) apply to every stage."""
    loaded = [load_config(c, overrides) for c in configs]
    summaries = []
    for i, cfg in enumerate(loaded):
        if cfg.stage.init_from == "previous":
            if i == 0:
                raise ConfigError(f"{cfg.source}: [stage] init_from = 'previous' but it is the first stage of the chain")
            cfg.stage.init_from = loaded[i - 1].run.out_dir
        summaries.append(train_stage(cfg, progress=progress))
    return summaries
