"""Training batches: latents, text features and mask, from a CSV encoded online every step (what
Open-Sora 1.0 did) or from a ``stdit prepare`` cache (encode once), with a resumable data position.

One shape for the whole stage (``[data] num_frames`` / ``image_size`` / ``batch_size``; images apart from
videos), or Open-Sora 1.2's buckets (``[data.buckets]``, stdit.train.buckets): every batch one bucket's
shape and batch size, the bucket of each sample drawn per epoch (online) or fixed when the cache was
encoded. The data position is (epoch, batches consumed in the epoch) either way."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .buckets import Bucket, BucketBatchSampler, BucketConfig
from .config import ConfigError, StageConfig
from .data import IMAGE_FPS, VideoTextDataset, collate_skip_bad, make_dataloader
from .prepare import INDEX_NAME, CachedLatentDataset, check_cache_matches, prepare_stage

VAE_DOWNSAMPLE = 8  # pixels per latent row / column (sd-vae-ft-ema and our VideoVAE)


@dataclass
class Batch:
    """latents (B, 4, T, h, w); y (B, 1, L, C) text features and mask (B, L); fps (B,) the clips' frame
    rates (None: not known, a cache from before they were recorded); the clips' pixel (T, H, W)."""

    latents: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    skipped: int
    fps: torch.Tensor | None = None
    pixel_size: tuple[int, int, int] | None = None


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
        self.buckets = BucketConfig(d.buckets, d.aspect_ratios) if d.buckets else None
        self.epoch, self.batches_in_epoch = 0, 0
        if self.buckets is not None:
            self._assigned: tuple[int | None, list] = (None, [])
            self._sample_buckets = self._fixed_buckets() if isinstance(self.dataset, CachedLatentDataset) else None
            if self._sampler(0).steps(0) == 0:
                raise ConfigError(f"{cfg.source}: [data.buckets] give no full batch in epoch 0 with dp = {dp} "
                                  f"({len(self.dataset)} samples): lower the batch sizes or add buckets the data fits")
        elif len(self.dataset) < d.batch_size * dp:
            raise ConfigError(
                f"[data] batch_size {d.batch_size} x dp {dp} is larger than the dataset ({len(self.dataset)} samples)"
            )

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def restore(self, pos: dict | None) -> None:
        if pos:
            self.epoch, self.batches_in_epoch = int(pos["epoch"]), int(pos["batches_in_epoch"])

    # -- buckets ------------------------------------------------------------------------------------

    def _fixed_buckets(self) -> list[Bucket]:
        """A cache's buckets (chosen when it was encoded), one per sample; each must be in [data.buckets]."""
        out = []
        for i in range(len(self.dataset)):
            b = self.dataset.bucket(i)
            if b is None:
                raise ConfigError(f"{self.cfg.source}: [data] cached {self.dataset.root} was prepared without buckets; "
                                  "prepare it again with this stage's [data.buckets]")
            try:
                self.buckets.batch_size(b)
            except KeyError as e:
                raise ConfigError(f"{self.cfg.source}: [data] cached {self.dataset.root}: {e.args[0]}") from None
            out.append(b)
        return out

    def assign(self, epoch: int) -> list[Bucket | None]:
        """The bucket of every sample in ``epoch`` (None: not trained this epoch)."""
        if self._sample_buckets is not None:
            return self._sample_buckets
        if self._assigned[0] != epoch:  # one pass over the samples per epoch, however often the sampler asks
            d, out = self.cfg.data, []
            for i in range(len(self.dataset)):
                size = self.dataset.media_size(i)
                out.append(None if size is None else self.buckets.assign(
                    *size, frame_interval=d.frame_interval, seed=self.cfg.run.seed, epoch=epoch, index=i))
            self._assigned = (epoch, out)
        return self._assigned[1]

    def _sampler(self, start_step: int) -> BucketBatchSampler:
        online = self._sample_buckets is None
        return BucketBatchSampler(
            self.assign, self.buckets.batch_size, seed=self.cfg.run.seed, start_step=start_step, rank=self.dp_rank,
            world=self.dp, epoch_source=lambda: self.epoch,
            item=(lambda i, b: (i, b.num_frames, b.height, b.width)) if online else None,
        )  # fmt: skip

    # -- batches --------------------------------------------------------------------------------------

    def _loader(self):
        d = self.cfg.data
        if self.buckets is not None:
            gen = torch.Generator()
            gen.manual_seed(self.cfg.run.seed)
            return DataLoader(self.dataset, batch_sampler=self._sampler(self.batches_in_epoch),
                              num_workers=d.num_workers, collate_fn=collate_skip_bad, generator=gen)
        return make_dataloader(
            self.dataset, d.batch_size, shuffle=True, num_workers=d.num_workers, seed=self.cfg.run.seed,
            start_index=self.batches_in_epoch * d.batch_size * self.dp, rank=self.dp_rank, world=self.dp,
        )  # fmt: skip

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)  # the loader's order is a permutation of (seed, epoch)
            for raw in self._loader():
                self.batches_in_epoch += 1
                if raw is None:  # every sample of the batch was unreadable
                    continue
                yield self._encode(raw)
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    @torch.no_grad()
    def _encode(self, raw: dict) -> Batch:
        if "latents" in raw:  # cached
            lat, y, mask = raw["latents"], raw["y"], raw["mask"]
            T, h, w = lat.shape[2:]
            pixels = (T, h * VAE_DOWNSAMPLE, w * VAE_DOWNSAMPLE)
        else:
            pixels = tuple(raw["video"].shape[2:])
            lat = self.vae.encode(raw["video"].to(self.device))
            y, mask = self.text.encode(list(raw["text"]))
        fps = raw.get("fps")
        if fps is None and pixels[0] == 1:
            fps = torch.full((lat.shape[0],), IMAGE_FPS)
        return Batch(lat.to(self.device).float(), y.to(self.device).float(), mask.to(self.device),
                     int(raw.get("skipped", 0)), None if fps is None else fps.to(self.device).float(),
                     pixels)  # fmt: skip
