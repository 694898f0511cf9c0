"""Training batches: latents, text features and mask, from a CSV encoded online every step (what
Open-Sora 1.0 did) or from a ``stdit prepare`` cache (encode once), with a resumable data position."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError, StageConfig
from .data import VideoTextDataset, make_dataloader
from .prepare import INDEX_NAME, CachedLatentDataset, check_cache_matches, prepare_stage


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
        d = cfg.data
        self.cfg, self.vae, self.text, self.device, self.dp_rank, self.dp = cfg, vae, text, device, dp_rank, dp
        if d.cache:
            _ensure_cache(cfg, vae, text, progress)
        if d.csv and not d.cache:
            self.dataset = VideoTextDataset(
                d.csv, num_frames=d.num_frames, frame_interval=d.frame_interval, image_size=tuple(d.image_size),
                seed=cfg.run.seed,
            )  # fmt: skip
        else:
            self.dataset = CachedLatentDataset(d.cache or d.cached)
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
