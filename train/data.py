"""Video-text data for Open-Sora-style training: CSV -> decoded, cropped clips -> resumable batches.

``read_csv`` parses Open-Sora's CSV: one row per sample, the media ``path``, its caption ``text`` and
optionally the video's frame count ``num_frames``, with a header naming the columns in any order or
headerless ``path,text[,num_frames]`` as Open-Sora 1.0's ``DatasetFromCSV`` read it.

``VideoTextDataset[i]`` decodes one sample (PyAV for videos, Pillow for images) into dict(video, text,
path, index, num_frames, fps), ``video`` float32 (3, T, H, W) in [-1, 1]: T = ``num_frames`` frames taken
every ``frame_interval`` frames from a random start (``sample_frame_indices``), or T = 1 for an image
(PixArt-style image training), scaled and centre-cropped to ``image_size`` (``resize_center_crop``);
``fps`` is the clip's frame rate, the video's over ``frame_interval`` (``IMAGE_FPS`` for images), as
Open-Sora 1.2 feeds STDiT3. ``VideoTextDataset[(i, T, H, W)]`` decodes sample i at that shape instead: a
bucket's (stdit.train.buckets, whose sampler hands such items over); ``media_size(i)`` gives a sample's
own frame count and size (the CSV's ``num_frames``, ``height``, ``width`` columns, else probed).
Randomness is a function of (seed, epoch, index) only, never of the worker or the call order. A missing,
truncated or corrupt file never stops a run: it is skipped with a ``BadSampleWarning`` and counted
(``collate_skip_bad``, ``count_skipped``).

``make_dataloader`` batches deterministically and resumably (``ResumableBatchSampler``): the epoch's
order is a permutation of (seed, epoch), batches never mix T (images apart from videos), and a loader
started at ``start_index`` serves exactly the batches an interrupted run had not consumed.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .extras import train_imports

__all__ = [
    "IMAGE_EXTS",
    "IMAGE_FPS",
    "BadSampleWarning",
    "CsvSample",
    "ResumableBatchSampler",
    "VideoTextDataset",
    "center_crop_box",
    "collate_skip_bad",
    "count_skipped",
    "make_dataloader",
    "probe_media",
    "read_csv",
    "resize_center_crop",
    "sample_frame_indices",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_FPS = 120.0  # Open-Sora 1.2's frame rate of an image sample (its fps embedding input)
DEFAULT_FPS = 24.0  # a video whose container gives no rate (Open-Sora 1.2's default)

# Tags keep the per-sample and the sampler random streams apart (numpy SeedSequence entropy).
_TAG_SAMPLE = 0x5A3F1
_TAG_ORDER = 0x0D3E2


class BadSampleWarning(UserWarning):
    """A sample was skipped because its file is missing or could not be decoded."""


@dataclass(frozen=True)
class CsvSample:
    path: str  # resolved (absolute if root was)
    text: str
    num_frames: int | None  # the CSV's hint, None when absent / not a positive int
    height: int | None = None  # the CSV's height / width columns (Open-Sora 1.2's), None when absent
    width: int | None = None

    @property
    def is_image(self) -> bool:
        return is_image_path(self.path)


def is_image_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTS


def _parse_frames(cell: str | None) -> int | None:
    if cell is None:
        return None
    cell = cell.strip()
    if not cell:
        return None
    try:
        v = int(float(cell))
    except ValueError:
        return None
    return v if v > 0 else None


def read_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[CsvSample]:
    """Parse an Open-Sora CSV: a header row naming the columns in any order (recognised by a cell that
    reads ``path``; ``path``, ``text`` (or ``caption``), optional ``num_frames``, ``height``, ``width``; other
    columns ignored),
    or headerless ``path,text[,num_frames]`` rows (what Open-Sora 1.0's ``csv.reader`` took: ``row[0]``
    path, ``row[1]`` caption). Captions containing commas must be quoted (standard CSV). Relative paths
    resolve against ``root`` (default: the CSV's folder). ``num_frames`` is only a hint, for containers
    that do not report their frame count.

    Raises FileNotFoundError (csv_path) or ValueError (no path/text column, no rows).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"csv_path: no such CSV file: {str(csv_path)!r}")
    root_dir = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"csv_path: {str(csv_path)!r} has no rows; expected path,text[,num_frames] rows")
    first = [c.strip().lower() for c in rows[0]]
    if "path" in first:
        cols = {name: i for i, name in reversed(list(enumerate(first)))}  # first occurrence wins
        text_key = "text" if "text" in cols else ("caption" if "caption" in cols else None)
        if text_key is None:
            raise ValueError(f"csv_path: {str(csv_path)!r} has a header {rows[0]!r} without a 'text' column; "
                             "expected columns path,text[,num_frames]")
        ip, it, inf = cols["path"], cols[text_key], cols.get("num_frames")
        ih, iw = cols.get("height"), cols.get("width")
        body = rows[1:]
        start_line = 2
    else:
        if len(rows[0]) < 2:
            raise ValueError(f"csv_path: {str(csv_path)!r} row 1 is {rows[0]!r}; expected a header with "
                             "path and text columns or headerless rows path,text[,num_frames]")
        ip, it, inf = 0, 1, 2
        ih = iw = None
        body = rows
        start_line = 1
    out = []
    for ln, row in enumerate(body, start_line):
        if len(row) <= max(ip, it):
            raise ValueError(f"csv_path: {str(csv_path)!r} row {ln} {row!r} has no path/text value; "
                             "expected path,text[,num_frames]")
        p = row[ip].strip()
        if not p:
            raise ValueError(f"csv_path: {str(csv_path)!r} row {ln} has an empty path")
        path = p if os.path.isabs(p) else str(root_dir / p)
        nf, h, w = (_parse_frames(row[i]) if i is not None and i < len(row) else None for i in (inf, ih, iw))
        out.append(CsvSample(path=path, text=row[it].strip(), num_frames=nf, height=h, width=w))
    if not out:
        raise ValueError(f"csv_path: {str(csv_path)!r} has a header but no data rows")
    return out


def sample_frame_indices(total: int, num_frames: int, frame_interval: int,
                         rng: np.random.Generator) -> list[int]:
    """Indices of the ``num_frames`` frames to take from a ``total``-frame video.

    ``num_frames`` frames every ``frame_interval`` frames from a random start; every start whose clip
    fits is equally likely. (Open-Sora 1.0's TemporalRandomCrop draws the start in
    ``[0, total - span - 1]`` and spreads the indices over the window with ``linspace``, which gives
    uneven steps such as 3,3,3,3,3,3,3,4,...; the stride here is exact.) Short videos -- our decision:

    * ``total >= (T-1)*interval + 1``: exact stride ``frame_interval``;
    * else, if ``total >= T``: the largest stride that fits, ``(total-1) // (T-1)``, random start. The
      clip stays uniformly spaced (constant apparent speed) and covers less time; Open-Sora 1.0 also
      shrinks the spacing here (linspace over the whole video);
    * else: all frames, then the last frame repeated to length T. Open-Sora 1.0 rejects such videos and
      retries another index; looping would insert a fake cut, a frozen tail is the milder artefact, and
      the sample is still used.
    """
    if total < 1:
        raise ValueError(f"total: video has no frames ({total})")
    n, step = num_frames, frame_interval
    if n == 1:
        return [int(rng.integers(0, total))]
    span = (n - 1) * step + 1
    if total < span:
        if total >= n:
            step = (total - 1) // (n - 1)
            span = (n - 1) * step + 1
        else:  # too short even at stride 1: all frames, then repeat the last one
            return list(range(total)) + [total - 1] * (n - total)
    start = int(rng.integers(0, total - span + 1))
    return [start + k * step for k in range(n)]


def center_crop_box(h: int, w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the centred source region that, scaled keeping aspect, covers ``size``."""
    th, tw = size
    scale = max(th / h, tw / w)
    ch = min(h, max(1, round(th / scale)))
    cw = min(w, max(1, round(tw / scale)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, 3, h, w) float in [0, 255] -> (T, 3, H, W): scale to cover (H, W) keeping the aspect (for a
    square target the shorter side becomes the target), centre crop, antialiased bilinear resize. The
    crop is cut first, in source pixels, then resized: the same picture as resize-then-crop up to
    sub-pixel rounding, and cheaper."""
    top, left, ch, cw = center_crop_box(frames.shape[-2], frames.shape[-1], size)
    return _resize(frames[..., top:top + ch, left:left + cw], size)


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (T, 3, h, w) float to ``size``, antialiased when shrinking."""
    h, w = frames.shape[-2:]
    if (h, w) == tuple(size):
        return frames
    return F.interpolate(frames, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=(h > size[0] or w > size[1]))


def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int (>= 1), got {value!r}")
    return int(value)


def probe_media(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of an image (1 frame, ``IMAGE_FPS``) or a video (its stream's frame count,
    else its packets counted; its average rate, else ``DEFAULT_FPS``), read from the headers. Raises on an
    unreadable file."""
    path = str(path)
    if is_image_path(path):
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return 1, h, w, IMAGE_FPS
    with train_imports("av"):
        import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        total, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
        rate = stream.average_rate or stream.guessed_rate
    if not total:
        total = VideoTextDataset._count_frames(path)
    return int(total), int(h), int(w), float(rate) if rate else DEFAULT_FPS


class _ShortRead(Exception):
    def __init__(self, decoded: int):
        super().__init__(f"stream ended after {decoded} frames")
        self.decoded = decoded


class VideoTextDataset(Dataset):
    """Open-Sora-style video/image + caption dataset read from a CSV (see the module docstring).

    Images (``IMAGE_EXTS``) are T = 1 samples whatever ``num_frames`` says. The random stream of a
    sample is ``rng(index)``, a function of (seed, epoch, index) (``set_epoch``); a user ``transform``
    is applied to the final (3, T, H, W) tensor under a torch RNG seeded from the same stream. A bad
    file gives a warning and ``None``; ``bad_files`` / ``num_bad`` list them, in this process only
    (with DataLoader workers, count with ``count_skipped`` instead).
    """

    def __init__(self, csv_path: str | os.PathLike, *, num_frames: int = 16, frame_interval: int = 3,
                 image_size: Sequence[int] = (256, 256), root: str | os.PathLike | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0):
        self.num_frames = _check_pos_int("num_frames", num_frames)
        self.frame_interval = _check_pos_int("frame_interval", frame_interval)
        if (isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                           for s in image_size)):
            raise ValueError(f"image_size: expected (H, W), two positive ints, got {image_size!r}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if transform is not None and not callable(transform):
            raise ValueError(f"transform: expected a callable or None, got {transform!r}")
        self.transform = transform
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(f"root: no such directory: {str(root)!r}")
        self.csv_path = str(csv_path)
        self.root = str(root) if root is not None else str(Path(csv_path).parent)
        self.samples = read_csv(csv_path, root)
        self.epoch = 0
        self.bad_files: list[tuple[str, str]] = []  # (path, error) -- this process only
        self._sizes: dict[int, tuple[int, int, int] | None] = {}

    # -- bookkeeping -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)

    def group_key(self, index: int) -> int:
        """The T a sample will have (1 for images, num_frames for videos): batches must share it."""
        return 1 if self.samples[index].is_image else self.num_frames

    def group_keys(self) -> list[int]:
        return [self.group_key(i) for i in range(len(self))]

    def media_size(self, index: int) -> tuple[int, int, int] | None:
        """(frames, height, width) of sample ``index`` as stored: the CSV's num_frames / height / width when
        it has all three (images: 1 frame), else read from the file's headers (``probe_media``, once per
        sample); None for a file that cannot be read (warned about once, like a bad sample)."""
        index = int(index)
        if index not in self._sizes:
            s = self.samples[index]
            frames = 1 if s.is_image else s.num_frames
            if frames and s.height and s.width:
                self._sizes[index] = (frames, s.height, s.width)
            else:
                try:
                    total, h, w, _ = probe_media(s.path)
                    self._sizes[index] = (1 if s.is_image else total, h, w)
                except Exception as e:  # noqa: BLE001 -- an unreadable file is left out, never fatal
                    self._sizes[index] = None
                    warnings.warn(f"VideoTextDataset: leaving out sample {index} ({s.path}): {type(e).__name__}: {e}",
                                  BadSampleWarning, stacklevel=2)
        return self._sizes[index]

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of sample ``index`` in the current epoch."""
        return np.random.default_rng([_TAG_SAMPLE, self.seed, self.epoch, int(index)])

    # -- loading ---------------------------------------------------------------------------------
    def __getitem__(self, index: int | tuple[int, int, int, int]):
        num_frames, size = self.num_frames, self.image_size
        if isinstance(index, (tuple, list)):  # (index, T, H, W): a bucket's shape
            if len(index) != 4:
                raise ValueError(f"index: expected an int or (index, T, H, W), got {index!r}")
            index, num_frames, h, w = (int(v) for v in index)
            size = (h, w)
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s = self.samples[index]
        rng = self.rng(index)
        try:
            if not os.path.exists(s.path):
                raise FileNotFoundError(f"no such file: {s.path}")
            if s.is_image:
                frames, fps = self._load_image(s.path), IMAGE_FPS
            else:
                frames, fps = self._load_video(s.path, s.num_frames, rng, num_frames)
                fps = float(fps // self.frame_interval)  # Open-Sora 1.2's clip rate (integer division)
            video = self._to_tensor(frames, size)
            if self.transform is not None:
                tseed = int(rng.integers(0, 2**63 - 1))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(tseed)
                    video = self.transform(video)
        except Exception as e:  # noqa: BLE001 -- any failure of one file must not stop training
            msg = f"{type(e).__name__}: {e}"
            self.bad_files.append((s.path, msg))
            warnings.warn(f"VideoTextDataset: skipping sample {index} ({s.path}): {msg}", BadSampleWarning,
                          stacklevel=2)
            return None
        return {"video": video, "text": s.text, "path": s.path, "index": index, "num_frames": video.shape[1],
                "fps": fps}

    @staticmethod
    def _load_image(path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"))  # writable copy
        return arr[None]  # (1, h, w, 3)

    def _load_video(self, path: str, hint: int | None, rng: np.random.Generator,
                    num_frames: int) -> tuple[np.ndarray, float]:
        """``num_frames`` frames (T, h, w, 3) uint8 and the video's frame rate."""
        with train_imports("av"):
            import av

        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            total = stream.frames or hint or 0
            rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else DEFAULT_FPS
        if total <= 0:  # container does not say and the CSV does not either: count packets
            total = self._count_frames(path)
        idx = sample_frame_indices(total, num_frames, self.frame_interval, rng)
        try:
            return self._decode(path, idx), fps
        except _ShortRead as e:  # metadata promised more frames than the file holds (e.g. cut short)
            if e.decoded < 1:
                raise RuntimeError("no decodable video frames") from None
            idx = sample_frame_indices(e.decoded, num_frames, self.frame_interval, rng)
            return self._decode(path, idx), fps

    @staticmethod
    def _count_frames(path: str) -> int:
        with train_imports("av"):
            import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            n = sum(1 for p in container.demux(stream) if p.size)
        if n < 1:
            raise RuntimeError("video has no frames")
        return n

    @staticmethod
    def _decode(path: str, indices: list[int]) -> np.ndarray:
        """Decode sequentially up to the last needed frame; keep only the needed ones."""
        with train_imports("av"):
            import av

        wanted = sorted(set(indices))
        last = wanted[-1]
        got: dict[int, np.ndarray] = {}
        k = -1
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            want = set(wanted)
            for k, frame in enumerate(container.decode(stream)):
                if k in want:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
        if last not in got:
            raise _ShortRead(k + 1)
        return np.stack([got[i] for i in indices])

    def _to_tensor(self, frames: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(T, h, w, 3) uint8 -> (3, T, H, W) float32 in [-1, 1], (H, W) = ``size`` (default image_size). The
        crop is cut in uint8 and the float resize runs a few frames at a time, so a 1080p clip never exists
        as a full-size float tensor."""
        size = tuple(size or self.image_size)
        t, h, w, _ = frames.shape
        top, left, ch, cw = center_crop_box(h, w, size)
        crop = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + ch, left:left + cw]))
        out = torch.empty((t, 3) + size, dtype=torch.float32)
        step = max(1, (4 * 1024 * 1024) // max(1, ch * cw * 3))  # ~16 MB of float32 per chunk
        for i in range(0, t, step):
            x = crop[i:i + step].permute(0, 3, 1, 2).float()
            out[i:i + step] = _resize(x, size)
        out.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
        return out.permute(1, 0, 2, 3).contiguous()


def collate_skip_bad(batch: list):
    """Drop ``None`` samples (bad files), stack the rest; ``None`` if nothing is left (skip that batch).

    Returns dict(video=(B, 3, T, H, W), text=list, path=list, index=LongTensor(B), num_frames=T,
    fps=(B,) float32 (when the samples have one), skipped=#bad samples dropped, dropped_mixed=#good samples dropped because their T differed), with
    ``latents`` and the other tensors of a cached sample in place of ``video``. Samples of one batch must
    share T: given a mixed batch anyway (a hand-made DataLoader; ``make_dataloader`` never makes one) it
    keeps the most common T and warns; it never stacks unequal T.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None
    key = "video" if "video" in good[0] else "latents"  # decoded videos, or cached latents (stdit prepare)
    ts = [b[key].shape[1] for b in good]
    dropped_mixed = 0
    if len(set(ts)) > 1:
        counts = Counter(ts)
        keep_t = max(counts, key=lambda t: (counts[t], t))
        dropped_mixed = len(good) - counts[keep_t]
        warnings.warn(f"collate_skip_bad: batch mixes T={sorted(counts)}; kept the {counts[keep_t]} samples with "
                      f"T={keep_t}, dropped {dropped_mixed} (use make_dataloader, which batches by kind)",
                      RuntimeWarning, stacklevel=2)
        good = [b for b in good if b[key].shape[1] == keep_t]
    out = {k: torch.stack([b[k] for b in good]) for k, v in good[0].items() if torch.is_tensor(v)}
    out.update(
        text=[b["text"] for b in good],
        path=[b["path"] for b in good],
        num_frames=good[0][key].shape[1],
        skipped=skipped,
        dropped_mixed=dropped_mixed,
    )
    if "index" in good[0]:
        out["index"] = torch.tensor([b["index"] for b in good], dtype=torch.long)
    if "fps" in good[0] and not torch.is_tensor(good[0]["fps"]):
        out["fps"] = torch.tensor([float(b["fps"]) for b in good], dtype=torch.float32)
    return out


def count_skipped(batch, batch_size: int) -> int:
    """Bad samples in one collated batch: ``batch["skipped"]``, or ``batch_size`` for a ``None`` batch
    (exact except for the short last batch of a ``drop_last=False`` epoch, where it is an upper bound).
    Summed over the batches, this is the count for any ``num_workers``."""
    return batch_size if batch is None else int(batch["skipped"])


class ResumableBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches: permutation of (seed, epoch), cut into per-group batches.

    ``group_keys[i]`` is the group of sample i (samples of one group share T); a batch never mixes groups.
    Walking the epoch's order, each sample joins its group's pending batch, which is emitted when full;
    with ``drop_last=False`` the pending partial batches follow at the end. The epoch is
    ``epoch_source()`` when given, else the value of ``set_epoch``.

    Resuming: a checkpoint stores the data position as (epoch, batches consumed in that epoch);
    ``start_index`` = batches consumed * batch_size skips them, in the first pass only (later epochs
    start from 0). With a single group it may be any sample count (the rest of the permutation is
    served); with several it must be a multiple of ``batch_size``.
    """

    def __init__(self, group_keys: Sequence, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, start_index: int = 0, epoch: int = 0,
                 epoch_source: Callable[[], int] | None = None):
        self.batch_size = _check_pos_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)) or start_index < 0:
            raise ValueError(f"start_index: expected a non-negative int (samples consumed), got {start_index!r}")
        self.group_keys = list(group_keys)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.start_index = int(start_index)
        self._epoch = int(epoch)
        self.epoch_source = epoch_source
        single = len(set(self.group_keys)) <= 1
        if not single and self.start_index % self.batch_size:
            raise ValueError(f"start_index: with images and videos batched separately it must be a multiple of "
                             f"batch_size={self.batch_size} (batches consumed * batch_size), got {start_index}")

    @property
    def epoch(self) -> int:
        return int(self.epoch_source()) if self.epoch_source is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def order(self, epoch: int | None = None) -> list[int]:
        """The epoch's sample order (before batching)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.group_keys)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([_TAG_ORDER, self.seed, int(epoch)]).permutation(n).tolist()

    def _batches(self, order: list[int]) -> list[list[int]]:
        pending: dict = {}
        out = []
        for i in order:
            b = pending.setdefault(self.group_keys[i], [])
            b.append(i)
            if len(b) == self.batch_size:
                out.append(b)
                pending[self.group_keys[i]] = []
        if not self.drop_last:
            out.extend(b for b in pending.values() if b)
        return out

    def _current(self) -> list[list[int]]:
        order = self.order()
        if self.start_index == 0:
            return self._batches(order)
        if len(set(self.group_keys)) <= 1:
            return self._batches(order[self.start_index:])
        return self._batches(order)[self.start_index // self.batch_size:]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._current()
        self.start_index = 0  # later passes (epochs) start from the beginning
        yield from batches

    def __len__(self) -> int:
        return len(self._current())


class _DatasetEpoch:
    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self) -> int:
        return int(getattr(self.dataset, "epoch", 0))


class _RankSlice(Sampler[list[int]]):
    """Every rank walks the same global batches (batch_size x world) and keeps its strided share,
    so data-parallel ranks never see the same sample and only decode their own."""

    def __init__(self, inner: ResumableBatchSampler, rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.inner)


def make_dataloader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, num_workers: int = 0,
                    seed: int = 0, drop_last: bool = True, start_index: int = 0,
                    pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader over ``dataset`` with deterministic, resumable, kind-grouped batches.

    Order: a permutation of (seed, dataset.epoch) (identity when ``shuffle=False``); batches never mix T
    (``dataset.group_key``; a dataset without it is one group). ``start_index`` = samples of the current
    epoch already consumed (= batches consumed * batch_size) -- the loader serves the rest, then later
    epochs whole; call ``dataset.set_epoch(e)`` before each epoch. Data parallel: ``rank`` of
    ``world`` ranks gets ``batch_size`` samples of each global batch of ``batch_size * world``
    (``start_index`` then counts global samples). Collation is ``collate_skip_bad`` (a
    batch may be ``None``: skip it). The loader's generator is seeded with ``seed`` (worker base seeds);
    the data's randomness does not depend on it. ``persistent_workers`` stays off so that workers see
    the epoch set on the dataset.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if hasattr(dataset, "group_key"):
        keys = [dataset.group_key(i) for i in range(len(dataset))]
    else:
        keys = [0] * len(dataset)
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    sampler = ResumableBatchSampler(keys, batch_size * world, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                    start_index=start_index, epoch_source=_DatasetEpoch(dataset))
    if world > 1:
        sampler = _RankSlice(sampler, rank, world)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=int(num_workers),
                      collate_fn=collate_skip_bad, generator=gen, pin_memory=pin_memory,
                      persistent_workers=False)
