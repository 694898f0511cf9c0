"""Encode once, train from cached tensors: VAE latents + T5 features in safetensors shards.

Open-Sora 1.0 ran T5-XXL and the VAE on every training step. ``prepare_dataset`` runs them once over a
stream of samples into a folder; ``prepare_stage`` does that for a stage config's CSV and records what the
cache was made from, ``check_cache_matches`` refuses a cache of other data or encoders, and
``CachedLatentDataset`` serves the samples to the trainer.

Layout of the folder:

* ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... with the tensors ``latents``
  (n, 4, T, h, w) float32 (the diffusion target x0: small, so kept exact), ``y`` (n, 1, L, C) bfloat16 by
  default (T5 features dominate the disk, 1.9 MB per sample in fp32; bf16 halves that and keeps fp32's
  exponent range) and ``mask`` (n, L) int64; the safetensors metadata key ``stdit`` holds a JSON record of
  the shard: its number, its samples' ``paths``, ``texts`` and ``fps`` (the clips' frame rates), shapes,
  encoders and settings, and the ``bucket`` (stdit.train.buckets) its samples were encoded at, if any;
* ``index.json``: format and version, the shard list (file, count, first sample number, shapes), the
  sample and skip counts, encoders, dtypes and the ``source`` the samples came from. Written last: its
  presence means the preparation finished.

With ``[data.buckets]``, ``prepare_stage`` draws each sample's bucket once (the draws of epoch 0) and
encodes it at that shape, bucket after bucket, so every shard holds one bucket; training from the cache
batches by those buckets (the bucket of a cached sample is fixed, as its crop is).

Every file is written under a temporary name and renamed into place (``stdit.common.files``), so a file
with a final name is complete; an interrupted preparation resumes (see ``prepare_dataset``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stdit.common.files import atomic_path, write_json

__all__ = [
    "INDEX_NAME",
    "CachedLatentDataset",
    "check_cache_matches",
    "prepare_dataset",
    "prepare_stage",
    "shard_name",
    "stage_source",
]

INDEX_NAME = "index.json"
FORMAT = "stdit-cached-latents"
VERSION = 1
_META_KEY = "stdit"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_TEMP_GLOB = ".*.tmp*"  # temporary files of an interrupted run (stdit.common.files.temp_name)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _read_shard_meta(path: Path) -> dict | None:
    """The shard's ``stdit`` metadata, or None if the file is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        info = json.loads(meta[_META_KEY])
    except Exception:
        return None
    if not {"latents", "y", "mask"} <= keys or not isinstance(info, dict) or "paths" not in info:
        return None
    return info


class _Shard:
    """Samples of one shard while it is being assembled."""

    def __init__(self, k: int, first: int, shape: tuple[int, ...], existing: dict | None, bucket: dict | None = None):
        self.k = k
        self.first = first
        self.shape = shape  # video (3, T, H, W)
        self.bucket = bucket  # the bucket label its samples were encoded at (None: no buckets)
        self.fps: list[float | None] = []
        self.existing = existing  # metadata of a complete shard on disk we can reuse, else None
        self.paths: list[str] = []
        self.texts: list[str] = []
        self.latents: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.mask: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []  # videos waiting to be encoded
        self.pending_texts: list[str] = []
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.paths)


def prepare_dataset(
    samples: Iterable[dict | None],
    out_dir: str | os.PathLike,
    *,
    vae,
    text_encoder,
    shard_size: int = 64,
    progress: bool = True,
    encode_batch_size: int = 8,
    sample_posterior: bool = True,
    seed: int = 0,
    text_dtype: torch.dtype = torch.bfloat16,
    source: dict | None = None,
) -> Path:
    """Encode ``samples`` (dicts with ``video`` (3, T, H, W) in [-1, 1], ``text``, ``path``, optionally ``fps``
    and ``bucket`` (a JSON-able label); None = bad file, skipped and counted) with ``vae`` (``VideoVAE``) and ``text_encoder`` (``TextEncoder``) into shards under
    ``out_dir``; returns the path of ``index.json``.

    ``encode_batch_size`` samples go through the encoders together (the VAE further micro-batches frames).
    ``sample_posterior``: draw latents from the VAE posterior (Open-Sora) or take its mean.
    ``source``: a JSON-able description of where the samples came from, kept in the index (``prepare_stage``
    records the CSV, the data settings and the VAE weights' digest there).

    Shards are deterministic by sample order: the valid samples are cut into consecutive runs of
    ``shard_size``, and a run also ends early where the video shape (T, H, W) or the bucket changes, because one shard's
    samples are stacked into one tensor (a stream mixing images and videos gives more, smaller shards;
    sort it by shape to avoid that). Posterior samples are drawn from a generator seeded per shard, so
    the same stream always gives the same tensors, resumed or not.

    Resuming: a re-run walks the stream again (it is only iterable, so that is how the boundaries are
    found). A shard whose file exists and records the same encoders and settings is not encoded again;
    the incoming paths and shapes must equal the recorded ones (RuntimeError otherwise: the stream
    changed, use a fresh ``out_dir``). Temporary files of an interrupted run are deleted, and so are
    shard files numbered past the new end (from an earlier, longer stream).
    """
    from safetensors.torch import save_file

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if encode_batch_size < 1:
        raise ValueError(f"encode_batch_size must be >= 1, got {encode_batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(_TEMP_GLOB):  # never complete, never read
        tmp.unlink()
    encoders = {"vae": vae.describe(), "text_encoder": text_encoder.describe()}
    # torch's spelling of the dtype ("bfloat16"): shards record it in their settings and are reused
    # only when the settings match, so the name must stay as existing caches wrote it
    text_dtype_name = str(text_dtype).removeprefix("torch.")
    settings = {"sample_posterior": bool(sample_posterior), "seed": int(seed), "text_dtype": text_dtype_name}

    shards: list[dict] = []
    num_skipped = 0
    num_samples = 0
    reused = 0
    current: _Shard | None = None

    def open_shard(first: int, shape: tuple[int, ...], bucket: dict | None) -> _Shard:
        k = len(shards)
        existing = _read_shard_meta(out / shard_name(k))
        if existing is not None and (existing.get("encoders") != encoders or existing.get("settings") != settings
                                     or existing.get("bucket") != bucket):
            existing = None  # made with other encoders/settings/bucket: encode again and overwrite
        sh = _Shard(k, first, shape, existing, bucket)
        if existing is None:
            sh.generator = torch.Generator(device=vae.device).manual_seed(int(seed) * 1_000_003 + k)
        return sh

    def flush_pending(sh: _Shard) -> None:
        if not sh.pending:
            return
        videos = torch.stack(sh.pending)
        sh.latents.append(vae.encode(videos, sample=sample_posterior, generator=sh.generator).float().cpu())
        y, mask = text_encoder.encode(sh.pending_texts)
        sh.y.append(y.to(text_dtype).cpu())
        sh.mask.append(mask.long().cpu())
        sh.pending, sh.pending_texts = [], []

    def check_existing(sh: _Shard, path: str, shape: tuple[int, ...]) -> None:
        i, rec = len(sh), sh.existing
        if i >= len(rec["paths"]) or rec["paths"][i] != path or list(shape) != rec.get("video_shape"):
            got = rec["paths"][i] if i < len(rec["paths"]) else "<end of shard>"
            raise RuntimeError(
                f"{out / shard_name(sh.k)} was made from other samples (position {i}: recorded {got!r}, now "
                f"{path!r} with shape {shape}; the sample stream changed): use a fresh out_dir or delete {out}"
            )

    def close_shard(sh: _Shard) -> None:
        nonlocal reused
        name = shard_name(sh.k)
        if sh.existing is not None:
            if sh.existing["paths"] != sh.paths:
                raise RuntimeError(
                    f"{out / name} was made from other samples ({len(sh.existing['paths'])} recorded, "
                    f"{len(sh.paths)} now; the sample stream changed): use a fresh out_dir or delete {out}"
                )
            info = sh.existing
            reused += 1
        else:
            flush_pending(sh)
            latents, y, mask = torch.cat(sh.latents), torch.cat(sh.y), torch.cat(sh.mask)
            info = {
                "shard": sh.k,
                "first": sh.first,
                "paths": sh.paths,
                "texts": sh.texts,
                "fps": sh.fps,
                "video_shape": list(sh.shape),
                "latent_shape": list(latents.shape[1:]),
                "y_shape": list(y.shape[1:]),
                "mask_shape": list(mask.shape[1:]),
                "encoders": encoders,
                "settings": settings,
                **({"bucket": sh.bucket} if sh.bucket is not None else {}),
            }
            with atomic_path(out / name) as tmp:
                save_file({"latents": latents.contiguous(), "y": y.contiguous(), "mask": mask.contiguous()},
                          str(tmp), metadata={_META_KEY: json.dumps(info), "format": "pt"})
        shards.append({"file": name, "count": len(sh.paths), "first": sh.first,
                       **{key: info[key] for key in ("video_shape", "latent_shape", "y_shape", "mask_shape", "bucket")
                          if key in info}})  # fmt: skip

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = samples = tqdm(samples, desc="prepare", unit="sample")
    try:
        for s in samples:
            if s is None:
                num_skipped += 1
                continue
            video, text, path = s["video"], s.get("text", ""), str(s.get("path", f"sample-{num_samples}"))
            if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
                shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
                raise ValueError(f"sample {path!r}: video must be a (3, T, H, W) tensor, got {shape}")
            text = "" if text is None else str(text)
            shape, bucket = tuple(video.shape), s.get("bucket")
            if current is not None and (len(current) >= shard_size or shape != current.shape or bucket != current.bucket):
                close_shard(current)
                current = None
            if current is None:
                current = open_shard(num_samples, shape, bucket)
            if current.existing is not None:
                check_existing(current, path, shape)
            else:
                current.pending.append(video)
                current.pending_texts.append(text)
                if len(current.pending) >= encode_batch_size:
                    flush_pending(current)
            current.paths.append(path)
            current.texts.append(text)
            current.fps.append(None if s.get("fps") is None else float(s["fps"]))
            num_samples += 1
            if bar is not None:
                bar.set_postfix(shards=len(shards), skipped=num_skipped, reused=reused)
        if current is not None:
            close_shard(current)
    finally:
        if bar is not None:
            bar.close()

    for f in out.iterdir():  # shards past the end, from an earlier run over a longer stream
        m = _SHARD_RE.match(f.name)
        if m and int(m.group(1)) >= len(shards):
            f.unlink()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "shard_size": shard_size,
        "num_samples": num_samples,
        "num_skipped": num_skipped,
        "num_shards": len(shards),
        "shards": shards,
        "encoders": encoders,
        "settings": settings,
        "latent_dtype": "float32",
        "y_dtype": text_dtype_name,
        "mask_dtype": "int64",
        **({"source": source} if source is not None else {}),
    }
    return write_json(out / INDEX_NAME, index)


def stage_source(cfg) -> dict:
    """What a stage's cache is made from: the CSV (absolute path, size, modification time), the data
    settings, and the VAE (a digest of its weights file when it is a folder)."""
    d, e = cfg.data, cfg.encoders
    csv_path = Path(d.csv).resolve()
    st = csv_path.stat()
    vae = e.vae
    buckets = {"buckets": d.buckets, "aspect_ratios": list(d.aspect_ratios)} if d.buckets else {}
    if e.vae != "tiny":
        weights = [p for p in sorted(Path(e.vae).glob("diffusion_pytorch_model*")) if p.is_file()]
        digest = hashlib.sha256()
        for p in weights:
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        vae = f"{Path(e.vae).resolve()} sha256:{digest.hexdigest()[:16]}"
    return {"csv": str(csv_path), "csv_bytes": st.st_size, "csv_mtime_ns": st.st_mtime_ns,
            "num_frames": d.num_frames, "frame_interval": d.frame_interval, "image_size": list(d.image_size),
            "seed": cfg.run.seed, "vae": vae, "text": e.text, "model_max_length": e.model_max_length, **buckets}


def prepare_stage(cfg, out_dir: str | os.PathLike, vae, text_encoder, *, shard_size: int = 64,
                  progress: bool = True) -> Path:
    """Encode a stage config's ``[data] csv`` (its frames, frame interval, size and seed) with the given
    encoders into ``out_dir`` (``prepare_dataset``, recording ``stage_source(cfg)``); returns the path of
    ``index.json``."""
    from .data import VideoTextDataset

    d = cfg.data
    if not d.csv:
        raise ValueError(f"config: {cfg.source} has no [data] csv to encode")
    dataset = VideoTextDataset(d.csv, num_frames=d.num_frames, frame_interval=d.frame_interval,
                               image_size=tuple(d.image_size), seed=cfg.run.seed)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if d.buckets:
            samples = _bucketed_samples(cfg, dataset)
        else:
            samples = (dataset[i] for i in range(len(dataset)))
        return prepare_dataset(samples, out_dir, vae=vae, text_encoder=text_encoder, shard_size=shard_size,
                               progress=progress, seed=cfg.run.seed, source=stage_source(cfg))  # fmt: skip


def _bucketed_samples(cfg, dataset) -> Iterable[dict | None]:
    """The dataset's samples at their buckets (the draws of epoch 0), bucket after bucket (largest first),
    each tagged with its bucket's label; samples that fit no bucket are left out, unreadable ones are None."""
    from .buckets import BucketConfig

    d = cfg.data
    config = BucketConfig(d.buckets, d.aspect_ratios)
    chosen = []
    for i in range(len(dataset)):
        size = dataset.media_size(i)
        if size is None:
            yield None
            continue
        b = config.assign(*size, frame_interval=d.frame_interval, seed=cfg.run.seed, epoch=0, index=i)
        if b is not None:
            chosen.append((b, i))
    for b, i in sorted(chosen, key=lambda bi: (-bi[0].height * bi[0].width, -bi[0].num_frames, bi[0], bi[1])):
        sample = dataset[(i, b.num_frames, b.height, b.width)]
        if sample is not None:
            sample["bucket"] = b.label()
        yield sample


def check_cache_matches(cfg, out_dir: str | os.PathLike, vae, text_encoder) -> None:
    """Raise ValueError unless ``out_dir``'s finished preparation holds what the stage would encode now:
    the same CSV file (path, size, modification time), frames, frame interval, size, seed, VAE weights and
    text encoder, and latents of (T, H/8, W/8) with T = 1 (images) or the stage's frame count, or, with
    buckets, of a bucket of the stage's at its shape. (A cache from an older version without that record is
    checked on encoders and shapes only.)"""
    index = json.loads((Path(out_dir) / INDEX_NAME).read_text(encoding="utf-8"))
    d = cfg.data
    want_hw = [d.image_size[0] // 8, d.image_size[1] // 8]
    problems = []
    recorded = index.get("source")
    if recorded is not None:
        now = stage_source(cfg)
        problems += [f"{k} {recorded.get(k)!r} (now {v!r})" for k, v in now.items() if recorded.get(k) != v]
    encoders = {"vae": vae.describe(), "text_encoder": text_encoder.describe()}
    if index.get("encoders") != encoders:
        problems.append("other encoders")
    if d.buckets:
        from .buckets import Bucket, BucketConfig

        allowed = set(BucketConfig(d.buckets, d.aspect_ratios).buckets())
        for spec in index.get("shards", []):
            b = Bucket.from_label(spec["bucket"]) if "bucket" in spec else None
            shape = spec.get("latent_shape", [])
            if b not in allowed or shape[1:] != [b.num_frames, b.height // 8, b.width // 8]:
                problems.append(f"a shard of bucket {spec.get('bucket')} with latents {shape} (not one of [data.buckets])")
                break
    for spec in [] if d.buckets else index.get("shards", []):
        shape = spec.get("latent_shape", [])
        if len(shape) != 4 or shape[1] not in (1, d.num_frames) or shape[2:] != want_hw:
            problems.append(f"latents of shape {shape} (the stage encodes (4, {d.num_frames} or 1, {want_hw[0]}, "
                            f"{want_hw[1]}))")
            break
    if problems:
        raise ValueError(f"[data] cache: {out_dir} was prepared from other data or encoders: {'; '.join(problems)}; "
                         "delete it (it is re-encoded on the next run) or name another folder")


class CachedLatentDataset(Dataset):
    """Samples of a ``prepare_dataset`` output: dict(latents (4, T, h, w), y (1, L, C), mask (L,), text, path,
    and fps when the cache recorded it).

    ``latents`` and ``y`` are cast to ``dtype`` (float32 by default; pass the model's dtype), ``mask`` is int64.
    Shards are opened lazily (memory-mapped; one handle per shard and process) and read one sample at a time.
    """

    def __init__(self, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, validate: bool = True):
        self.root = Path(out_dir)
        self.dtype = dtype
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: {self.root} is not a prepared dataset, or its preparation did not "
                f"finish (run prepare_dataset again with the same samples: it resumes)"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{index_path} is not valid JSON: {e}") from e
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            fmt = index.get("format") if isinstance(index, dict) else None
            raise ValueError(f"{index_path}: not a {FORMAT} index (format={fmt!r})")
        if index.get("version") != VERSION:
            raise ValueError(f"{index_path}: unsupported version {index.get('version')!r} (expected {VERSION})")
        shards = index.get("shards")
        if not isinstance(shards, list) or any(
            not isinstance(s, dict) or "file" not in s or "count" not in s for s in shards
        ):
            raise ValueError(f"{index_path}: malformed 'shards' list")
        if sum(int(s["count"]) for s in shards) != index.get("num_samples"):
            raise ValueError(f"{index_path}: shard counts do not add up to num_samples={index.get('num_samples')}")
        self.index = index
        self.shards = shards
        self.offsets = [0]
        for s in shards:
            self.offsets.append(self.offsets[-1] + int(s["count"]))
        self._meta: dict[int, dict] = {}
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        if validate:
            for k in range(len(shards)):
                self._shard_meta(k)
            self._handles.clear()  # reopened lazily by __getitem__: no file handle per shard held idle

    def __getstate__(self) -> dict:
        # safetensors handles do not pickle (DataLoader workers under spawn): workers reopen lazily
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_meta"] = {}
        return state

    epoch = 0  # read by stdit.train.data.make_dataloader: the batch order is a permutation of (seed, epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffled order a make_dataloader loader serves (cached samples
        themselves are fixed: the randomness of crops was spent when they were encoded)."""
        self.epoch = int(epoch)

    @property
    def num_skipped(self) -> int:
        return int(self.index.get("num_skipped", 0))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard_file(self, k: int) -> Path:
        return self.root / self.shards[k]["file"]

    def _shard_meta(self, k: int) -> dict:
        """Open shard k (once per process), check it against index.json, return its metadata."""
        if self._pid != os.getpid():  # forked DataLoader worker: do not share handles with the parent
            self._handles, self._meta, self._pid = {}, {}, os.getpid()
        if k in self._meta and k in self._handles:
            return self._meta[k]
        from safetensors import safe_open

        path = self._shard_file(k)
        if not path.is_file():
            raise FileNotFoundError(
                f"shard {path} listed in {self.root / INDEX_NAME} is missing (re-run prepare_dataset)"
            )
        spec = self.shards[k]
        try:
            handle = safe_open(str(path), framework="pt")
            info = json.loads((handle.metadata() or {})[_META_KEY])
            shapes = {name: handle.get_slice(name).get_shape() for name in ("latents", "y", "mask")}
        except Exception as e:
            raise ValueError(f"shard {path} is corrupt or not a prepare_dataset shard: {e}") from e
        n = int(spec["count"])
        expect = {
            "latents": [n, *spec.get("latent_shape", shapes["latents"][1:])],
            "y": [n, *spec.get("y_shape", shapes["y"][1:])],
            "mask": [n, *spec.get("mask_shape", shapes["mask"][1:])],
        }
        for name, shape in shapes.items():
            if list(shape) != list(expect[name]):
                raise ValueError(
                    f"shard {path}: tensor {name!r} has shape {list(shape)}, index.json says {expect[name]}"
                )
        if len(info.get("paths", [])) != n or len(info.get("texts", [])) != n:
            got = len(info.get("paths", []))
            raise ValueError(f"shard {path}: metadata lists {got} paths, index.json says {n}")
        self._handles[k] = handle
        self._meta[k] = info
        return info

    def bucket(self, i: int):
        """The ``stdit.train.buckets.Bucket`` sample i was encoded at (from index.json), None without buckets."""
        from .buckets import Bucket

        k, _ = self.locate(int(i))
        label = self.shards[k].get("bucket")
        return None if label is None else Bucket.from_label(label)

    def group_key(self, i: int) -> int:
        """The frame count T of sample i (from index.json, no shard read): batches never mix T."""
        k, _ = self.locate(int(i))
        spec = self.shards[k]
        return int(spec["latent_shape"][1]) if "latent_shape" in spec else int(self[i]["latents"].shape[1])

    def locate(self, i: int) -> tuple[int, int]:
        """Sample number -> (shard number, position in shard)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        k = bisect.bisect_right(self.offsets, i) - 1  # the last shard whose first sample is <= i
        return k, i - self.offsets[k]

    def __getitem__(self, i: int) -> dict:
        k, j = self.locate(int(i))
        info = self._shard_meta(k)
        h = self._handles[k]
        try:
            latents = h.get_slice("latents")[j : j + 1][0]
            y = h.get_slice("y")[j : j + 1][0]
            mask = h.get_slice("mask")[j : j + 1][0]
        except Exception as e:
            raise ValueError(f"shard {self._shard_file(k)} could not be read: {e}") from e
        fps = info.get("fps", [None] * (j + 1))[j]
        return {
            "latents": latents.to(self.dtype),
            "y": y.to(self.dtype),
            "mask": mask.long(),
            "text": info["texts"][j],
            "path": info["paths"][j],
            **({"fps": fps} if fps is not None else {}),
        }
