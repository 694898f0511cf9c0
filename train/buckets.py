"""Open-Sora 1.2-style buckets: every sample trains at its own resolution, aspect ratio and length.

A bucket config (the ``[data.buckets]`` table) maps a resolution name to its frame counts, each with a
keep probability and a batch size, as Open-Sora 1.2's ``bucket_config``::

    [data.buckets]
    "240p" = { "1" = [0.3, 297], "51" = [0.4, 20], "102" = [[0.4, 0.33], 10] }
    "144p" = { "1" = [1.0, 475], "51" = [1.0, 51] }

A resolution name stands for a pixel area (``RESOLUTIONS``); each (resolution, aspect ratio) pair is one
(H, W) of that area (``bucket_hw``), for the aspect ratios (H/W) of ``ASPECT_RATIOS`` (Open-Sora 1.2's 17,
3:8 to 50:27) or the config's ``aspect_ratios``. Our (H, W) are multiples of 16 (the VAE's 8 x the patch's
2; Open-Sora's table is not, and pads instead), so small areas give few distinct shapes.

Assigning a sample (its frame count T, height and width in pixels) to a bucket follows Open-Sora 1.2's
``Bucket.get_bucket_id``: resolutions from the largest area down, skipping those whose area exceeds the
sample's by more than 1/0.8; at a resolution, an image (T = 1) takes the frames-1 bucket if the config
has one and the keep draw passes; a video takes the largest frame count t (never 1) whose clip fits,
(t - 1) * frame_interval + 1 <= T (Open-Sora asks T > t * frame_interval, one interval stricter), where a
``[p_resolution, p_frames]`` keep value first draws p_frames (failing it tries the next smaller t); then
the keep probability of the (resolution, t) entry is drawn, and a failed draw moves on to the next
resolution. A sample that fits nowhere is left out of the epoch. The aspect ratio is the closest to
H/W. The draws are a function of (seed, epoch, sample index) only.

``BucketBatchSampler`` batches per epoch: each bucket's samples shuffled and cut into batches of its
batch size (the incomplete rest is dropped), all batches shuffled together; a batch never mixes
shapes. Data parallel: step s of the epoch gives rank r the batch s * world + r (ranks train different
shapes at the same step, as Open-Sora's sampler does), and the epoch's batches beyond a multiple of
world are dropped. Resuming: ``start_step`` = steps already consumed in the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "ASPECT_RATIOS", "RESOLUTIONS", "Bucket", "BucketBatchSampler", "BucketConfig", "bucket_hw",
]  # fmt: skip

# name -> pixel area. Open-Sora 1.2's names and areas, plus small ones for CPU runs.
RESOLUTIONS: dict[str, int] = {
    "32px": 32 * 32, "48px": 48 * 48, "64px": 64 * 64, "96px": 96 * 96, "128px": 128 * 128,
    "144p": 36864, "256": 65536, "240p": 102240, "360p": 230400, "512": 262144, "480p": 409920,
    "720p": 921600, "1024": 1048576, "1080p": 2073600,
}  # fmt: skip

# H / W, Open-Sora 1.2's aspect-ratio keys (3:8 ... 50:27)
ASPECT_RATIOS: tuple[float, ...] = (
    0.38, 0.43, 0.48, 0.50, 0.53, 0.54, 0.56, 0.62, 0.67, 0.75, 1.00, 1.33, 1.50, 1.78, 1.89, 2.00, 2.08,
)  # fmt: skip

_TAG_BUCKET = 0xB0C4E7  # numpy SeedSequence entropy tags: bucket draws apart from the batch order
_TAG_ORDER = 0xB0C4E8
_APPROX = 0.8  # a sample may be up to 1/0.8 smaller in area than its resolution (Open-Sora's approx)


def bucket_hw(area: int, aspect_ratio: float, multiple: int = 16) -> tuple[int, int]:
    """(H, W) of about ``area`` pixels with H/W about ``aspect_ratio``, each a multiple of ``multiple`` (>= it)."""
    if area <= 0 or aspect_ratio <= 0:
        raise ValueError(f"area and aspect_ratio: expected positive numbers, got {area!r}, {aspect_ratio!r}")
    h = math.sqrt(area * aspect_ratio)
    w = h / aspect_ratio
    return max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)


@dataclass(frozen=True, order=True)
class Bucket:
    """One shape: a resolution name, a frame count and an aspect ratio, and its (H, W) in pixels."""

    resolution: str
    num_frames: int
    aspect_ratio: float
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) in pixels."""
        return self.num_frames, self.height, self.width

    def label(self) -> dict:
        """JSON-able record (a cache shard's)."""
        return {"resolution": self.resolution, "num_frames": self.num_frames, "aspect_ratio": self.aspect_ratio,
                "height": self.height, "width": self.width}

    @classmethod
    def from_label(cls, d: Mapping) -> Bucket:
        return cls(str(d["resolution"]), int(d["num_frames"]), float(d["aspect_ratio"]), int(d["height"]),
                   int(d["width"]))  # fmt: skip


def _frames_key(key) -> int:
    try:
        t = int(key)
    except (TypeError, ValueError):
        t = 0
    if isinstance(key, bool) or t < 1 or str(t) != str(key).strip():
        raise ValueError(f"buckets: frame count {key!r} must be a positive int (a TOML key like \"16\")")
    return t


def _probability(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"buckets: {where} keep probability must be a number in [0, 1], got {v!r}")
    return float(v)


class BucketConfig:
    """A validated bucket table (see the module docstring): assignment of samples, batch size per bucket.

    Args:
        table: {resolution name: {frames: [keep, batch_size]}}; keep is a probability or
            [p_resolution, p_frames]; frames keys may be TOML strings ("16").
        aspect_ratios: H/W values of every resolution (default ``ASPECT_RATIOS``).
    """

    def __init__(self, table: Mapping, aspect_ratios: Sequence[float] = ()):
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"buckets: expected a table {{resolution: {{frames: [keep, batch_size]}}}}, got {table!r}")
        ars = tuple(float(a) for a in (aspect_ratios or ASPECT_RATIOS))
        if any(isinstance(a, bool) or not a > 0 for a in (aspect_ratios or ())) or not ars:
            raise ValueError(f"aspect_ratios: expected positive H/W values, got {list(aspect_ratios)!r}")
        self.aspect_ratios = tuple(sorted(set(ars)))
        self.entries: dict[str, dict[int, tuple[float, float, int]]] = {}  # res -> t -> (p_res, p_frames, bs)
        for res in sorted(table, key=lambda r: (-RESOLUTIONS.get(r, 0), r)):
            if res not in RESOLUTIONS:
                raise ValueError(f"buckets: unknown resolution {res!r}; expected some of {list(RESOLUTIONS)}")
            frames = table[res]
            if not isinstance(frames, Mapping) or not frames:
                raise ValueError(f"buckets: {res!r} must be a table {{frames: [keep, batch_size]}}, got {frames!r}")
            parsed = {}
            for key, value in frames.items():
                t = _frames_key(key)
                where = f"{res!r} frames {t}"
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"buckets: {where} must be [keep_prob, batch_size], got {value!r}")
                keep, bs = value
                if isinstance(keep, (list, tuple)):
                    if len(keep) != 2 or t == 1:
                        raise ValueError(f"buckets: {where} keep must be a probability, or [p_resolution, p_frames] "
                                         f"for videos, got {keep!r}")
                    p_res, p_t = _probability(keep[0], where), _probability(keep[1], where)
                else:
                    p_res, p_t = _probability(keep, where), 1.0
                if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
                    raise ValueError(f"buckets: {where} batch size must be an int >= 1, got {bs!r}")
                if t in parsed:
                    raise ValueError(f"buckets: {where} is given twice")
                parsed[t] = (p_res, p_t, bs)
            self.entries[res] = dict(sorted(parsed.items(), reverse=True))  # largest frame count first
        # a stable number per (resolution, frames): keeps each keep draw its own random stream
        self._ids = {(res, t): i for i, (res, t) in enumerate((r, t) for r in self.entries for t in self.entries[r])}
        self.shapes = {res: {a: bucket_hw(RESOLUTIONS[res], a) for a in self.aspect_ratios} for res in self.entries}

    def __repr__(self) -> str:
        return f"BucketConfig({len(self.buckets())} buckets over {list(self.entries)})"

    def buckets(self) -> list[Bucket]:
        """Every bucket, largest resolution and frame count first."""
        return [self.bucket(res, t, a) for res in self.entries for t in self.entries[res] for a in self.aspect_ratios]

    def bucket(self, resolution: str, num_frames: int, aspect_ratio: float) -> Bucket:
        h, w = self.shapes[resolution][aspect_ratio]
        return Bucket(resolution, num_frames, aspect_ratio, h, w)

    def batch_size(self, bucket: Bucket) -> int:
        try:
            return self.entries[bucket.resolution][bucket.num_frames][2]
        except KeyError:
            raise KeyError(f"bucket {bucket.resolution} x {bucket.num_frames} frames is not in this config "
                           f"({ {r: list(v) for r, v in self.entries.items()} })") from None

    def closest_ratio(self, height: int, width: int) -> float:
        ar = height / width
        return min(self.aspect_ratios, key=lambda a: (abs(a - ar), a))

    def assign(self, num_frames: int, height: int, width: int, *, frame_interval: int = 1, seed: int = 0,
               epoch: int = 0, index: int = 0) -> Bucket | None:
        """The bucket of a sample of ``num_frames`` frames of ``height`` x ``width`` pixels, or None (see the
        module docstring); the draws are a function of (seed, epoch, index)."""
        T, area = int(num_frames), int(height) * int(width)
        if T < 1 or height < 1 or width < 1:
            raise ValueError(f"sample {index}: num_frames, height and width must be >= 1, got {T}, {height}, {width}")

        def draw(res: str, t: int, which: int) -> float:
            return float(np.random.default_rng([_TAG_BUCKET, seed, epoch, index, self._ids[(res, t)], which]).random())

        for res, frames in self.entries.items():
            if area < RESOLUTIONS[res] * _APPROX:
                continue
            chosen = None
            if T == 1:
                chosen = 1 if 1 in frames else None
            else:
                for t, (_, p_t, _) in frames.items():
                    if t == 1 or (p_t < 1.0 and draw(res, t, 0) >= p_t):
                        continue
                    if (t - 1) * frame_interval + 1 <= T:
                        chosen = t
                        break
            if chosen is None:
                continue
            p_res = frames[chosen][0]
            if p_res >= 1.0 or draw(res, chosen, 1) < p_res:
                return self.bucket(res, chosen, self.closest_ratio(height, width))
        return None


class BucketBatchSampler(Sampler[list]):
    """Per-epoch bucketed batches, sharded over data-parallel ranks, resumable (see the module docstring).

    Args:
        assign: epoch -> the bucket key of every sample (None: not used this epoch). Keys must be
            hashable and sortable (``Bucket``), so that the order of buckets is a function of the keys.
        batch_size: bucket key -> its batch size (per rank).
        seed: the order's seed; the epoch's batches are a function of (seed, epoch, assign(epoch)).
        start_step: steps of the current epoch already consumed (the first pass skips them).
        rank, world: this rank's share: batch ``step * world + rank`` of each step.
        epoch_source: called for the epoch at each pass (default: the value of ``set_epoch``).
        item: (index, key) -> the element handed to the dataset (default: the index).
    """

    def __init__(self, assign: Callable[[int], Sequence[Hashable | None]], batch_size: Callable[[Hashable], int], *,
                 seed: int = 0, start_step: int = 0, rank: int = 0, world: int = 1,
                 epoch_source: Callable[[], int] | None = None, item: Callable[[int, Hashable], object] | None = None):
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world: expected an int >= 1, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected an int >= 0 (steps consumed), got {start_step!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.assign, self.batch_size, self.seed = assign, batch_size, int(seed)
        self.start_step, self.rank, self.world = start_step, rank, world
        self.epoch_source, self._epoch = epoch_source, 0
        self.item = item or (lambda i, key: i)

    @property
    def epoch(self) -> int:
        return int(self.epoch_source()) if self.epoch_source is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[tuple[Hashable, list[int]]]:
        """The epoch's global batches, (bucket key, sample indices), in training order, cut to a multiple
        of ``world``: step s is batches[s * world : (s + 1) * world], rank r taking the r-th."""
        epoch = self.epoch if epoch is None else int(epoch)
        groups: dict = {}
        for i, key in enumerate(self.assign(epoch)):
            if key is not None:
                groups.setdefault(key, []).append(i)
        rng = np.random.default_rng([_TAG_ORDER, self.seed, epoch])
        out = []
        for key in sorted(groups):
            members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
            bs = int(self.batch_size(key))
            out += [(key, members[k:k + bs]) for k in range(0, len(members) - bs + 1, bs)]
        out = [out[j] for j in rng.permutation(len(out))]
        return out[: len(out) - len(out) % self.world]

    def steps(self, epoch: int | None = None) -> int:
        """Steps (batches per rank) in the epoch."""
        return len(self.batches(epoch)) // self.world

    def __iter__(self) -> Iterator[list]:
        batches, start = self.batches(), self.start_step
        self.start_step = 0  # later passes (epochs) start from the beginning
        for s in range(start, len(batches) // self.world):
            key, indices = batches[s * self.world + self.rank]
            yield [self.item(i, key) for i in indices]

    def __len__(self) -> int:
        return max(0, self.steps() - self.start_step)
