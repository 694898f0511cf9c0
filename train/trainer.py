"""One training stage of Open-Sora's recipe, and chains of stages.

``train_stage(config)`` runs one stage from a :mod:`stdit.train.config` file:

1. seeds every RNG, picks the device (CUDA when present unless the config says otherwise);
2. builds the encoders (VAE per frame, T5 text; "tiny" random ones built in code for demos/tests,
   or local weight directories) and the model (a preset with the data's latent size, the text
   encoder's width, the configured attention backend, fused ops and activation checkpointing);
3. initialises from ``stage.init_from``: a previous stage's run (its latest checkpoint's EMA
   weights, as Open-Sora initialised each stage from the last one's EMA) or ``pixart:FILE`` (a
   PixArt-alpha state dict mapped into STDiT's spatial part); fixed sin-cos buffers whose shape
   changed (another frame count or resolution) are rebuilt, and ``stage.zero_temporal`` zeroes
   ``attn_temp.proj`` so the video model starts as the image model;
4. resumes automatically from ``run.out_dir``'s latest complete checkpoint (model, EMA, optimizer,
   step, RNG states, data position), so a killed run continues the same loss trajectory;
5. in an image stage (num_frames = 1) freezes the temporal attention, which stays at its zero
   initialisation as in PixArt-alpha (so a following video stage starts as the image model);
6. trains: IDDPM loss (stdit.train.diffusion) at uniformly drawn timesteps, AdamW (fused on CUDA;
   apex FusedAdam when asked for and installed), grad-norm clipping, EMA, bf16 autocast on GPU;
   logs loss, samples/s, tokens/s and memory to ``out_dir/log.csv`` with a progress bar;
   checkpoints atomically every ``ckpt_every`` steps and at the end, and scores a fixed evaluation
   (same batches, timesteps and noise every time: :class:`FixedEval`) at the start and at every
   checkpoint into ``out_dir/eval.csv``, the trend the noisy per-step loss cannot show.

Data come either from a CSV of videos/images encoded online every step (what Open-Sora 1.0 did) or
from a ``stdit prepare`` cache of latents and text embeddings (encode once).
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError, StageConfig, load_config

LOG_COLUMNS = ("step", "epoch", "loss", "mse", "vb", "grad_norm", "samples_per_s", "tokens_per_s", "mem_mb", "skipped")


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"[run] device: {name!r} was asked for but torch sees no CUDA device")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_encoders(cfg: StageConfig, device: torch.device):
    """(VideoVAE, TextEncoder) per cfg.encoders: "tiny" (random, built in code, seeded; text also
    "tiny-words": the word-level tokenizer) or a local dir."""
    from .encoders import TextEncoder, VideoVAE

    e = cfg.encoders
    if e.vae == "tiny":
        vae = VideoVAE.tiny(seed=0)
    else:
        vae = VideoVAE.from_pretrained(e.vae)
    vae.micro_batch_size = e.vae_micro_batch
    if e.text in ("tiny", "tiny-words"):
        text = TextEncoder.tiny(seed=0, model_max_length=e.model_max_length,
                                tokenizer="bytes" if e.text == "tiny" else "words")
    else:
        text = TextEncoder.from_pretrained(e.text, model_max_length=e.model_max_length)
    return vae.to(device), text.to(device)


def build_model(cfg: StageConfig, caption_channels: int, device: torch.device):
    from stdit.models import from_preset

    m, d = cfg.model, cfg.data
    H, W = d.image_size
    overrides = dict(
        input_size=(d.num_frames, H // 8, W // 8), caption_channels=caption_channels,
        model_max_length=cfg.encoders.model_max_length, class_dropout_prob=m.class_dropout_prob,
        attention_backend=m.attention_backend, fused_ops=m.fused_ops, checkpoint=m.checkpoint,
    )  # fmt: skip
    for key in ("space_scale", "time_scale", "freeze"):
        if getattr(m, key) is not None:
            overrides[key] = getattr(m, key)
    return from_preset(m.preset, **overrides).to(device)


def load_pixart_into_stdit(model, state_dict: dict) -> None:
    """PixArt-alpha weights into STDiT's spatial part (Open-Sora's stage 1 -> 2 initialisation).

    PixArt's 2D patch conv (C, 4, 2, 2) becomes the (C, 4, 1, 2, 2) 3D conv; its fixed position
    buffer is rebuilt; every other key must exist in STDiT with the same shape. STDiT's temporal
    attention (absent in PixArt) keeps its initialisation (zero output projection).
    """
    sd = dict(state_dict.get("state_dict", state_dict))
    w = sd.get("x_embedder.proj.weight")
    if w is not None and w.dim() == 4:
        sd["x_embedder.proj.weight"] = w.unsqueeze(2)
    sd.pop("pos_embed", None)
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not k.startswith("pos_embed") and ".attn_temp." not in k]
    if wrong or unexpected or missing:
        raise ValueError(
            "init_from: not a PixArt-alpha state dict for this STDiT "
            f"(shape mismatches {wrong[:4]}, unexpected {unexpected[:4]}, missing {missing[:4]})"
        )
    model.load_state_dict(sd, strict=False)


def checkpoint_weights(ckpt: Path, *, prefer_ema: bool = True, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint directory: model.safetensors with the EMA averages laid
    over it (the EMA tracks trainable parameters and buffers; frozen ones come from the model)."""
    from .checkpoint import _load_safetensors

    weights = {k: v for k, v in _load_safetensors(ckpt / "model.safetensors", device).items() if torch.is_tensor(v)}
    ema_file = ckpt / "ema.safetensors"
    if prefer_ema and ema_file.is_file():
        for k, v in _load_safetensors(ema_file, device).items():
            if k.startswith("shadow.") and torch.is_tensor(v) and k[len("shadow."):] in weights:
                name = k[len("shadow."):]
                weights[name] = v.to(weights[name].dtype)
    return weights


def init_from_previous(model, source: str, zero_temporal: bool) -> str:
    """Load initial weights (see the module docstring); returns a description of what was loaded."""
    from .checkpoint import latest_checkpoint

    if source.startswith("pixart:"):
        path = Path(source.removeprefix("pixart:"))
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no PixArt-alpha checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        load_pixart_into_stdit(model, sd)
        what = f"PixArt-alpha weights from {path}"
    else:
        path = Path(source)
        ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"init_from: no complete checkpoint in {path}")
        sd = checkpoint_weights(ckpt)
        own = model.state_dict()
        keep = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        # Only the fixed sin-cos tables may differ (another frame count or resolution): rebuilt here.
        bad = [k for k in set(sd) ^ set(own) | {k for k in sd if k in own and k not in keep} if not k.startswith("pos_embed")]
        if bad:
            raise ValueError(f"init_from: {ckpt} does not fit this model (mismatched keys {sorted(bad)[:5]})")
        model.load_state_dict(keep, strict=False)  # position tables keep this stage's sizes
        what = f"EMA weights of {ckpt}"
    if zero_temporal:
        with torch.no_grad():
            for block in getattr(model, "blocks", []):
                if hasattr(block, "attn_temp"):
                    block.attn_temp.proj.weight.zero_()
                    block.attn_temp.proj.bias.zero_()
        what += "; temporal attention output zeroed"
    return what


def build_optimizer(cfg: StageConfig, params, device: torch.device):
    o = cfg.optim
    if o.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError(
                "[optim] optimizer = 'apex' needs NVIDIA apex, which is not on PyPI: build it from "
                "https://github.com/NVIDIA/apex (pip install -v --no-build-isolation ...), or use 'adamw'"
            ) from None
        return FusedAdam(params, lr=o.lr, weight_decay=o.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=device.type == "cuda")


@dataclass
class Batch:
    latents: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    skipped: int


def _ensure_cache(cfg: StageConfig, vae, text, progress: bool) -> None:
    """``[data] cache``: encode the CSV into the folder unless it holds a finished preparation, then check
    that the preparation is of this stage's data and encoders (ConfigError if not). Under torchrun the
    cache must exist already (`stdit prepare` or one single-process run): ranks waiting for one rank's
    long encode would hit the collective timeout."""
    import torch.distributed as dist

    from .prepare import INDEX_NAME, check_cache_matches, prepare_stage

    d = cfg.data
    index = Path(d.cache) / INDEX_NAME
    if not index.is_file():
        if dist.is_available() and dist.is_initialized():
            raise ConfigError(f"{cfg.source}: [data] cache {d.cache} is not prepared; under torchrun encode it first: "
                              f"stdit prepare --config {cfg.source} --out {d.cache}")
        print(f"[{cfg.stage.name}] encoding {d.csv} once into {d.cache} ([data] cache)", file=sys.stderr)
        prepare_stage(cfg, d.cache, vae, text, progress=progress)
        return  # just made from this stage's data and encoders: nothing to check (or hash) again
    try:
        check_cache_matches(cfg, d.cache, vae, text)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


class BatchSource:
    """Batches of (latents, text features, mask), from a CSV encoded online or a prepare cache,
    with a resumable data position (epoch, batches consumed in the epoch)."""

    def __init__(self, cfg: StageConfig, vae, text, device: torch.device, dp_rank: int = 0, dp: int = 1,
                 progress: bool = False):
        from .data import VideoTextDataset

        self.dp_rank, self.dp = dp_rank, dp

        d = cfg.data
        self.cfg, self.vae, self.text, self.device = cfg, vae, text, device
        if d.cache:
            from .prepare import CachedLatentDataset

            _ensure_cache(cfg, vae, text, progress)
            self.dataset = CachedLatentDataset(d.cache)
        elif d.csv:
            self.dataset = VideoTextDataset(
                d.csv, num_frames=d.num_frames, frame_interval=d.frame_interval, image_size=tuple(d.image_size),
                seed=cfg.run.seed,
            )  # fmt: skip
        else:
            from .prepare import CachedLatentDataset

            self.dataset = CachedLatentDataset(d.cached)
        if len(self.dataset) < d.batch_size * dp:
            raise ConfigError(
                f"[data] batch_size {d.batch_size} x dp {dp} is larger than the dataset ({len(self.dataset)} samples)"
            )
        self.epoch, self.batches_in_epoch = 0, 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def restore(self, pos: dict | None) -> None:
        if pos:
            self.epoch, self.batches_in_epoch = int(pos["epoch"]), int(pos["batches_in_epoch"])

    def __iter__(self):
        from .data import make_dataloader

        d = self.cfg.data
        while True:
            self.dataset.set_epoch(self.epoch)  # the loader's order is a permutation of (seed, epoch)
            loader = make_dataloader(
                self.dataset, d.batch_size, shuffle=True, num_workers=d.num_workers, seed=self.cfg.run.seed,
                start_index=self.batches_in_epoch * d.batch_size * self.dp, rank=self.dp_rank, world=self.dp,
            )  # fmt: skip
            for raw in loader:
                self.batches_in_epoch += 1
                if raw is None:  # every sample of the batch was unreadable
                    continue
                yield self._encode(raw)
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    @torch.no_grad()
    def _encode(self, raw: dict) -> Batch:
        if "latents" in raw:  # cached
            lat, y, mask = raw["latents"], raw["y"], raw["mask"]
        else:
            lat = self.vae.encode(raw["video"].to(self.device))
            y, mask = self.text.encode(list(raw["text"]))
        return Batch(lat.to(self.device).float(), y.to(self.device).float(), mask.to(self.device),
                     int(raw.get("skipped", 0)))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Evaluation: a deterministic loss the per-step loss cannot give
# ----------------------------------------------------------------------------------------------------


class FixedEval:
    """The IDDPM loss on fixed batches, fixed timesteps and fixed noise.

    The per-step training loss depends mostly on which timestep was drawn, so its trend over a short
    run is noise. This scores the same ``n`` batches (the first batches of epoch 0) at timesteps
    spread evenly over [0, 999] with noise from a fixed seed, so two evaluations differ only by the
    weights. RNG states are forked: evaluating never changes the training run's random stream.
    """

    def __init__(self, source: "BatchSource", n: int, diffusion, seed: int):
        self.batches = []
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
                terms = self.diffusion.training_losses(
                    model, batch.latents, t, model_kwargs=dict(y=batch.y, mask=batch.mask), noise=noise
                )
                loss += terms["loss"].mean().item()
                mse += terms["mse"].mean().item()
        model.train(was_training)
        n = len(self.batches)
        return {"eval_loss": loss / n, "eval_mse": mse / n}


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
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _check_resumable(cfg: StageConfig, ckpt: Path) -> None:
    """A checkpoint in ``[run] out_dir`` must come from the same model and data shape, or resuming it would
    fail deep in load_state_dict (or, worse, succeed on the wrong data): say so plainly instead."""
    import json

    try:
        stored = json.loads((ckpt / "meta.json").read_text())["extra"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a `stdit train` checkpoint: load_checkpoint reports what is wrong with it
    now = cfg.to_dict()
    keys = (("model", "preset"), ("data", "num_frames"), ("data", "image_size"), ("encoders", "model_max_length"))
    diff = [f"[{t}] {k} {stored.get(t, {}).get(k)!r} there, {now[t][k]!r} here" for t, k in keys
            if stored.get(t, {}).get(k) != now[t][k]]
    if diff:
        raise ConfigError(f"{cfg.source}: [run] out_dir {ckpt.parent.parent} holds a run of another configuration "
                          f"({'; '.join(diff)}); delete it or choose another out_dir")


def train_stage(cfg: StageConfig | str | Path, *, progress: bool = True, max_steps: int | None = None) -> dict:
    """Run (or resume) one stage; returns a summary (steps, first/last mean loss, paths).

    ``max_steps`` stops early after that many steps of this invocation (tests, crash simulations).
    """
    from .checkpoint import EMA, latest_checkpoint, load_checkpoint, save_checkpoint
    from .diffusion import IDDPM

    if not isinstance(cfg, StageConfig):
        cfg = load_config(cfg)
    r = cfg.run
    from .parallel import (
        build_mesh, init_distributed, latest_distributed, load_distributed, loss_scale, prune_distributed,
        save_distributed, wrap_data_parallel,
    )  # fmt: skip

    out = Path(r.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(r.device)
    rank, world, device = init_distributed(device.type)
    pc = cfg.parallel
    dp_rank = 0
    if world > 1:
        mesh = build_mesh(pc, device)
        dp_rank = mesh["dp"].get_local_rank()
    elif pc.dp * pc.sp != 1:
        raise ConfigError(f"{cfg.source}: [parallel] dp x sp = {pc.dp * pc.sp} needs that many processes: launch with "
                          f"torchrun --nproc_per_node={pc.dp * pc.sp} -m stdit.train train --config ...")  # fmt: skip
    if pc.engine == "colossalai" and "RANK" not in os.environ:
        raise ConfigError(f"{cfg.source}: [parallel] engine = 'colossalai' runs under torchrun (even for one process): "
                          f"torchrun --nproc_per_node={pc.dp} -m stdit.train train --config ...")  # fmt: skip
    main_rank = rank == 0
    progress = progress and main_rank
    # sp ranks of one dp group must draw the same noise, timesteps and caption drops: seed by dp rank
    seed = r.seed + 1000003 * dp_rank
    seed_everything(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and r.dtype == "bf16")

    vae, text = build_encoders(cfg, device)
    model = build_model(cfg, text.hidden_size, device)
    if cfg.data.num_frames == 1:  # image stage (PixArt-alpha has no temporal attention): keep it at zero
        for name, p in model.named_parameters():
            if ".attn_temp." in name:
                p.requires_grad_(False)
    diffusion = IDDPM()
    source = BatchSource(cfg, vae, text, device, dp_rank=dp_rank, dp=pc.dp if world > 1 else 1,
                         progress=progress and main_rank)
    log_path = out / "log.csv"
    dcp_root = out / "dcp"

    # Resume from whichever complete checkpoint has the highest step: the single-process kind
    # (safetensors, bitwise resume) or the distributed kind (torch.distributed.checkpoint, any world size).
    step, init_note = 0, "random init"
    single = latest_checkpoint(out)
    if single is not None:
        _check_resumable(cfg, single)
    single_step = int(single.name.split("-")[-1]) if single is not None else -1
    multi = latest_distributed(dcp_root)
    use_multi = multi is not None and multi[0] > single_step
    if world == 1 and single is not None and not use_multi:
        pass  # loaded below, after the optimizer exists
    elif single is not None and not use_multi:  # distributed run from a single-process checkpoint
        load_checkpoint(single, model=model, ema=EMA(model, decay=cfg.optim.ema_decay), map_location=str(device))
        init_note = f"weights from {single} (optimizer and EMA restart: single-process -> distributed)"
    elif not use_multi and cfg.stage.init_from:
        init_note = init_from_previous(model, cfg.stage.init_from, cfg.stage.zero_temporal)

    net, booster = model, None
    bf16 = device.type == "cuda" and r.dtype == "bf16"
    if pc.engine == "colossalai":  # ColossalAI's Booster owns data parallelism (stdit.train.colossal)
        from . import colossal

        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
        net, optimizer, booster = colossal.boost(model, optimizer, plugin=pc.plugin, device=device, bf16=bf16,
                                                 grad_clip=cfg.optim.grad_clip)  # fmt: skip
        ema = EMA(net.unwrap(), decay=cfg.optim.ema_decay)
        found = colossal.latest(out / "colossal")
        use_multi, single = False, None
        if found is not None:
            extra = colossal.load(booster, net, optimizer, found[1], ema=ema.shadow)
            step = int(extra["step"])
            source.restore(extra.get("data_position"))
            init_note = f"resumed from {found[1]} (ColossalAI checkpoint)"
    else:
        if world > 1:
            pc.validate(world_size=world, num_heads=model.num_heads)
            if pc.sp > 1:
                from .sequence_parallel import SequenceParallelSTDiT

                net = SequenceParallelSTDiT(model, mesh["sp"].get_group(), pc.sp_mode)
            net = wrap_data_parallel(net, pc, device, per_block=pc.sp == 1, bf16=bf16)
        ema = EMA(model, decay=cfg.optim.ema_decay)  # after wrapping: FSDP2 shards the averages too
        optimizer = build_optimizer(cfg, [p for p in net.parameters() if p.requires_grad], device)

    if booster is not None:
        pass  # resumed (or not) above
    elif use_multi:
        extra = load_distributed(multi[1], model, optimizer, ema=ema.shadow)  # the STDiT's own names
        step = int(extra["step"])
        source.restore(extra.get("data_position"))
        init_note = f"resumed from {multi[1]} (distributed checkpoint)"
    elif world == 1 and single is not None:
        meta = load_checkpoint(single, model=model, ema=ema, optimizer=optimizer, map_location=str(device))
        step = int(meta["step"])
        source.restore(meta.get("data_position"))
        init_note = f"resumed from {single}"
    if step == 0:
        seed_everything(seed)  # the run's randomness does not depend on how it was initialised
    if main_rank:  # rows past the resumed step (or any, on a fresh start) came from a killed run
        _truncate_log(log_path, step)
        _truncate_log(out / "eval.csv", step, EVAL_COLUMNS)
    if main_rank:
        layout = f"colossalai {pc.plugin}" if booster is not None else f"dp {pc.dp} x sp {pc.sp} {pc.sp_mode}, {pc.data_parallel}"
        where = f"{device}" + (f", {world} processes ({layout})" if world > 1 else "")
        print(f"[{cfg.stage.name}] {init_note}; training to step {r.steps} on {where}", file=sys.stderr)

    def checkpoint(at: int) -> Path:
        extra = {"config": cfg.to_dict(), "stage": cfg.stage.name}
        if booster is not None:
            from . import colossal

            path = colossal.save(booster, net, optimizer, out / "colossal" / f"step-{at:09d}", ema=ema.shadow,
                                 extra={**extra, "step": at, "data_position": source.position()})  # fmt: skip
            if main_rank:
                prune_distributed(out / "colossal", r.keep_last)
            return path
        if world == 1:
            return save_checkpoint(
                out, step=at, model=model, ema=ema, optimizer=optimizer, data_position=source.position(),
                extra=extra, keep_last=r.keep_last,
            )  # fmt: skip
        path = save_distributed(dcp_root / f"step-{at:09d}", model, optimizer, ema=ema.shadow,
                                extra={**extra, "step": at, "data_position": source.position()})  # fmt: skip
        if main_rank:
            prune_distributed(dcp_root, r.keep_last)
        return path

    # Fixed-batch evaluation (single process only: sharded models need every rank in the forward).
    evaluator = FixedEval(source, r.eval_batches if world == 1 else 0, diffusion, seed=r.seed)
    eval_path, evals, ema_evals = out / "eval.csv", [], []

    def evaluate(at: int) -> None:
        scores = evaluator(model)
        if scores is None or not main_rank:
            return
        # The EMA weights too: they are what sampling and the next stage use, and they are far less
        # noisy than the live weights at a high constant learning rate.
        if booster is None and world == 1:
            ema_scores = scores  # before the first update the averages are the weights themselves
            if ema.num_updates:
                import copy

                shadow_model = copy.deepcopy(model)
                ema.copy_to(shadow_model)
                ema_scores = evaluator(shadow_model)
                del shadow_model
            scores.update(ema_loss=ema_scores["eval_loss"], ema_mse=ema_scores["eval_mse"])
            ema_evals.append(scores["ema_loss"])
        evals.append(scores["eval_loss"])
        _append_log(eval_path, {"step": at, **{k: f"{v:.6f}" for k, v in scores.items()}}, EVAL_COLUMNS)

    if step == 0:
        eval_path.unlink(missing_ok=True)
        evaluate(0)
    losses, t_last, done_here = [], time.perf_counter(), 0
    model.train()
    batches = iter(source)
    bar = tqdm(total=r.steps, initial=step, desc=cfg.stage.name, unit="step", file=sys.stderr, disable=not progress)
    window = {"samples": 0, "tokens": 0, "skipped": 0}
    while step < r.steps and (max_steps is None or done_here < max_steps):
        batch = next(batches)
        x0 = batch.latents
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=device)
        with autocast:
            terms = diffusion.training_losses(net, x0, t, model_kwargs=dict(y=batch.y, mask=batch.mask))
        loss = terms["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:  # always: a resumed optimizer's stored rate never wins
            group["lr"] = lr_at(step, cfg.optim, r.steps)
        if booster is not None:  # the boosted optimizer clips in step()
            from . import colossal

            colossal.backward(booster, loss.float(), optimizer)
            optimizer.step()
            grad_norm = colossal.grad_norm(optimizer) or float("nan")
            ema.update(net.unwrap())
        else:
            (loss * loss_scale(pc) if world > 1 else loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            ema.update(model)
        step += 1
        done_here += 1
        losses.append(loss.item())
        window["samples"] += x0.shape[0] * (pc.dp if world > 1 else 1)  # global batch
        window["tokens"] += x0.shape[0] * (pc.dp if world > 1 else 1) * math.prod(x0.shape[2:]) // 4  # 2x2 patches
        window["skipped"] += batch.skipped
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if main_rank and (step % r.log_every == 0 or step == r.steps):
            now = time.perf_counter()
            dt = max(now - t_last, 1e-9)
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            _append_log(log_path, dict(
                step=step, epoch=source.epoch, loss=f"{losses[-1]:.6f}", mse=f"{terms['mse'].mean().item():.6f}",
                vb=f"{terms['vb'].mean().item():.6f}", grad_norm=f"{float(grad_norm):.4f}",
                samples_per_s=f"{window['samples'] / dt:.3f}", tokens_per_s=f"{window['tokens'] / dt:.1f}",
                mem_mb=f"{mem:.0f}" if mem is not None else "", skipped=window["skipped"],
            ))  # fmt: skip
            t_last, window = now, {"samples": 0, "tokens": 0, "skipped": 0}
        if step % r.ckpt_every == 0 or step == r.steps:
            t_pause = time.perf_counter()
            checkpoint(step)
            evaluate(step)
            t_last += time.perf_counter() - t_pause  # samples/s measures training, not checkpoints and evaluations
    bar.close()
    if booster is not None:
        from . import colossal

        last = (colossal.latest(out / "colossal") or (None, None))[1]
    else:
        last = latest_checkpoint(out) if world == 1 else (latest_distributed(dcp_root) or (None, None))[1]
    k = max(1, len(losses) // 5)
    return {
        "stage": cfg.stage.name, "step": step, "steps_this_run": done_here, "out_dir": str(out),
        "checkpoint": str(last) if last else None, "init": init_note,
        "loss_first": float(np.mean(losses[:k])) if losses else None,
        "loss_last": float(np.mean(losses[-k:])) if losses else None,
        "eval_first": evals[0] if evals else None, "eval_last": evals[-1] if evals else None,
        "ema_eval_first": ema_evals[0] if ema_evals else None, "ema_eval_last": ema_evals[-1] if ema_evals else None,
    }  # fmt: skip


def train_chain(configs: list[str | Path], *, progress: bool = True) -> list[dict]:
    """Run stages in order; a stage whose ``init_from`` is "previous" starts from the one before."""
    loaded = [load_config(c) for c in configs]
    summaries = []
    for i, cfg in enumerate(loaded):
        if cfg.stage.init_from == "previous":
            if i == 0:
                raise ConfigError(f"{cfg.source}: [stage] init_from = 'previous' but it is the first stage of the chain")
            cfg.stage.init_from = loaded[i - 1].run.out_dir
        summaries.append(train_stage(cfg, progress=progress))
    return summaries
