"""Fit a small ``AutoencoderKL`` on a dataset's frames, so that a demo without a pretrained VAE still decodes.

The CPU demo cannot download ``sd-vae-ft-ema``, and a randomly initialised VAE decodes even a perfectly
learnt latent into noise. ``fit_vae(csv_path, out_dir)`` trains a small diffusers ``AutoencoderKL`` with
the real VAE's geometry (8x spatial downsampling: four encoder blocks; 4 latent channels;
``scaling_factor`` 0.18215 in its config) on frames of the CSV's videos and images, standardises its
latent space for diffusion, and writes it with ``save_pretrained`` so that ``VideoVAE.from_pretrained``
(and a stage config's ``vae = "out_dir"``) loads it offline.

The folder is published atomically: it is written under a temporary name and renamed to ``out_dir``
when complete, ``fit_vae.json`` (the recipe and the measured errors) last. ``vae_is_complete(out_dir)``
checks for it; ``stdit fit-vae --csv CSV --out DIR`` skips a finished fit, so a re-run demo resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stdit.common.files import dir_temp_name, publish_dir

from .extras import train_imports

__all__ = ["DEFAULT_WIDTHS", "fit_vae", "vae_is_complete", "build_autoencoder", "load_frame_pool"]

DEFAULT_WIDTHS = (16, 32, 64, 64)
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MARKER = "fit_vae.json"


def vae_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished fit (config, weights and the ``fit_vae.json`` record)."""
    p = Path(out_dir)
    return (p / "config.json").is_file() and any((p / w).is_file() for w in _WEIGHTS) and (p / _MARKER).is_file()


def _norm_groups(widths: Sequence[int]) -> int:
    for g in (8, 4, 2, 1):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def build_autoencoder(widths: Sequence[int] = DEFAULT_WIDTHS, *, seed: int = 0, sample_size: int = 64):
    """A diffusers AutoencoderKL like ``VideoVAE.tiny`` (4 blocks = 8x, 4 latent channels, 0.18215)."""
    with train_imports("diffusers"):
        from diffusers import AutoencoderKL

    from .encoders import OPEN_SORA_SCALING_FACTOR

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=tuple(int(w) for w in widths), layers_per_block=1, latent_channels=4,
            norm_num_groups=_norm_groups(widths), sample_size=sample_size,
            scaling_factor=OPEN_SORA_SCALING_FACTOR, mid_block_add_attention=False,
        )  # fmt: skip


def load_frame_pool(csv_path: str | os.PathLike, image_size: tuple[int, int], *, frames_per_video: int = 8,
                    seed: int = 0) -> torch.Tensor:
    """Every readable sample of the CSV -> frames (N, 3, H, W) in [-1, 1] (videos: ``frames_per_video``
    frames spread over the clip; images: one). Unreadable files are skipped (with a BadSampleWarning)."""
    from .data import BadSampleWarning, VideoTextDataset, read_csv

    samples = read_csv(csv_path)
    lengths = [s.num_frames for s in samples if not s.is_image and s.num_frames]
    interval = max(1, (max(lengths) - 1) // max(frames_per_video - 1, 1)) if lengths else 1
    ds = VideoTextDataset(csv_path, num_frames=frames_per_video, frame_interval=interval, image_size=image_size,
                          seed=seed)
    frames, bad = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for i in range(len(ds)):
            item = ds[i]
            if item is None:
                bad += 1
                continue
            frames.append(item["video"].permute(1, 0, 2, 3))  # (T, 3, H, W)
    if bad:
        print(f"fit-vae: skipped {bad} unreadable file(s) of {len(ds)}", file=sys.stderr)
    if not frames:
        raise ValueError(f"csv_path: no readable video or image in {csv_path}")
    return torch.cat(frames).float().contiguous()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _losses(vae, x: torch.Tensor, kl_weight: float, generator=None):
    post = vae.encode(x).latent_dist
    z = post.sample(generator=generator)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, x)
    l1 = F.l1_loss(rec, x)
    kl = post.kl().mean()  # summed over latent elements, mean over frames
    return mse + 0.1 * l1 + kl_weight * kl, mse


@torch.no_grad()
def _recon_mse(vae, frames: torch.Tensor, batch: int = 32) -> float:
    tot = 0.0
    for i in range(0, len(frames), batch):
        x = frames[i : i + batch]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        tot += F.mse_loss(rec, x, reduction="sum").item()
    return tot / frames.numel()


@torch.no_grad()
def _latent_means(vae, frames: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([vae.encode(frames[i : i + batch]).latent_dist.mode() for i in range(0, len(frames), batch)])


@torch.no_grad()
def _standardise_latents(vae, frames: torch.Tensor, target_std: float) -> dict:
    """Rescale quant_conv / post_quant_conv so each latent channel has mean 0 and std ``target_std`` on
    ``frames`` -- an exact reparametrisation (the decoder sees the same input as before).

    Why: diffusion wants latents of about unit variance. STDiT multiplies the VAE's latents by 0.18215,
    which suits SD's VAE (latent std ~5.5) but not a freshly fitted one, whose latent std is whatever
    training made it; a per-VAE ``scaling_factor`` would be overridden (with a warning) by ``VideoVAE``.
    So the encoder's 1x1 ``quant_conv`` (posterior mean and log-variance) is rescaled to give std
    ``target_std`` = 1/0.18215, and the decoder's 1x1 ``post_quant_conv`` absorbs the inverse affine map.
    """
    z = _latent_means(vae, frames)  # (N, 4, h, w)
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3)).clamp_min(1e-6)
    before = {"mean": mean.tolist(), "std": std.tolist(), "std_all": float(z.std())}
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    if qc is None or pqc is None:  # use_quant_conv=False: nothing to fold into; leave as is
        return {"before": before, "standardised": False}
    c = z.shape[1]
    s = target_std / std  # z_new = (z - mean) * s
    qc.weight[:c] *= s.view(-1, 1, 1, 1)
    qc.bias[:c] = (qc.bias[:c] - mean) * s
    qc.bias[c:] += 2.0 * torch.log(s)  # log-variance of the scaled posterior
    # post_quant_conv(z) = A z + b with z = z_new / s + mean  ->  A' = A / s (per input channel), b' = b + A mean
    a = pqc.weight[:, :, 0, 0].clone()
    pqc.bias += a @ mean
    pqc.weight /= s.view(1, -1, 1, 1)
    return {"before": before, "standardised": True}


def _save_preview(vae, frames: torch.Tensor, path: Path, n: int = 8) -> None:
    """Originals (top row) over reconstructions (bottom row) as a PNG."""
    from PIL import Image

    idx = torch.linspace(0, len(frames) - 1, min(n, len(frames))).round().long()
    x = frames[idx]
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    rows = [torch.cat(list(t), dim=2) for t in (x, rec)]  # (3, H, n*W)
    img = ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).save(path)


def fit_vae(csv_path: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, steps: int = 500,
            image_size: Sequence[int] = (48, 48), batch_frames: int = 16, lr: float = 3e-3, seed: int = 0,
            widths: Sequence[int] | None = None, progress: bool = True, frames_per_video: int = 8,
            kl_weight: float = 1e-6, preview_size: Sequence[int] | None = (64, 64),
            overwrite: bool = False) -> Path:
    """Fit an AutoencoderKL on the CSV's frames and save it to ``out_dir`` (see the module docstring).

    ``csv_path``: one CSV or a list of them (e.g. a video set and an image set; their frames are pooled).
    ``image_size`` (H, W), multiples of 8: the resolution frames are fitted at; fitting at 32x32 or 48x48
    is several times cheaper than at 64x64 and the fully convolutional VAE then works at 64x64 / 96x96
    too (measured on the demo's shapes: fitting at 64x64 costs 2x the time and still draws circles as
    rings at 64x64 -- an 8x8 latent holds little shape). ``widths``: the four block widths (default
    ``DEFAULT_WIDTHS``). ``preview_size``: also write ``recon_preview.png`` (originals over
    reconstructions at that resolution; None: no preview). An existing complete ``out_dir`` is replaced
    only with ``overwrite=True`` (FileExistsError otherwise; an existing non-VAE directory is never
    replaced). Returns ``out_dir``.

    Recipe (our choices, tuned for a 2-core CPU and the synthetic moving-shapes data): the frames of one
    pass over the CSVs (``frames_per_video`` spread over each video, images as they are, unreadable files
    skipped) are decoded once into memory; each step takes ``batch_frames`` frames drawn at random from
    the whole pool with random horizontal / vertical flips; loss = pixel MSE + 0.1 x L1 + ``kl_weight`` x
    KL of the posterior (a tiny weight keeps the posterior nearly deterministic, as in SD's VAE); AdamW
    with a short warm-up and cosine decay to 5% of ``lr``.
    """
    from tqdm.auto import tqdm

    from .encoders import OPEN_SORA_SCALING_FACTOR

    csv_paths = [Path(csv_path)] if isinstance(csv_path, (str, os.PathLike)) else [Path(c) for c in csv_path]
    if not csv_paths:
        raise ValueError("csv_path: expected a CSV path or a non-empty list of them")
    for c in csv_paths:
        if not c.is_file():
            raise FileNotFoundError(f"csv_path: no such file {str(c)!r}")
    steps = _check_int("steps", steps, 1)
    batch_frames = _check_int("batch_frames", batch_frames, 1)
    frames_per_video = _check_int("frames_per_video", frames_per_video, 1)
    seed = _check_int("seed", seed, 0)
    if (isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 8 and s % 8 == 0
                       for s in image_size)):
        raise ValueError(f"image_size: expected (H, W), two positive multiples of 8, got {image_size!r}")
    image_size = (int(image_size[0]), int(image_size[1]))
    if preview_size is not None and (len(preview_size) != 2 or any(int(s) % 8 or int(s) < 8 for s in preview_size)):
        raise ValueError(f"preview_size: expected (H, W), two positive multiples of 8, or None, got {preview_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a positive float, got {lr!r}")
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
        raise ValueError(f"kl_weight: expected a float >= 0, got {kl_weight!r}")
    widths = DEFAULT_WIDTHS if widths is None else widths
    if (isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != 4
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 4 for w in widths)):
        raise ValueError(f"widths: expected four block widths (ints >= 4; four blocks = 8x downsampling), "
                         f"got {widths!r}")
    widths = tuple(int(w) for w in widths)
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out_dir: {out} exists and is not a directory")
        if any(out.iterdir()):
            if not vae_is_complete(out):
                raise FileExistsError(f"out_dir: {out} exists, is not empty and holds no complete fitted VAE; "
                                      "remove it or choose another out_dir")
            if not overwrite:
                raise FileExistsError(f"out_dir: {out} already holds a fitted VAE (pass overwrite=True to refit)")

    t0 = time.perf_counter()
    pool = torch.cat([load_frame_pool(c, image_size, frames_per_video=frames_per_video, seed=seed) for c in csv_paths])
    g = torch.Generator().manual_seed(seed)
    eval_idx = torch.randperm(len(pool), generator=g)[: min(64, len(pool))]
    eval_frames = pool[eval_idx]

    vae = build_autoencoder(widths, seed=seed, sample_size=max(image_size))
    vae.train()
    mse_start = _recon_mse(vae, eval_frames)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warm = max(1, min(50, steps // 10))

    def lr_at(i: int) -> float:
        if i < warm:
            return lr * (i + 1) / warm
        p = (i - warm) / max(1, steps - warm)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    losses: list[float] = []
    bar = tqdm(range(steps), desc="fit-vae", unit="step", file=sys.stderr, disable=not progress)
    for i in bar:
        idx = torch.randint(0, len(pool), (batch_frames,), generator=g)
        x = pool[idx]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(3)
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(2)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        loss, mse = _losses(vae, x, kl_weight, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(mse.detach()))
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(mse=f"{np.mean(losses[-10:]):.4f}")
    bar.close()
    vae.eval()
    mse_end = _recon_mse(vae, eval_frames)
    target_std = 1.0 / OPEN_SORA_SCALING_FACTOR
    stats = _standardise_latents(vae, pool, target_std)
    z = _latent_means(vae, pool) * OPEN_SORA_SCALING_FACTOR
    mse_after_std = _recon_mse(vae, eval_frames)
    k = max(1, len(losses) // 5)
    record = {
        "csv": [str(c.resolve()) for c in csv_paths] if len(csv_paths) > 1 else str(csv_paths[0].resolve()),
        "steps": steps, "image_size": list(image_size), "batch_frames": batch_frames,
        "lr": lr, "seed": seed, "widths": list(widths), "kl_weight": kl_weight, "frames": len(pool),
        "num_parameters": sum(p.numel() for p in vae.parameters()),
        "train_mse_first": float(np.mean(losses[:k])), "train_mse_last": float(np.mean(losses[-k:])),
        "recon_mse_start": mse_start, "recon_mse_end": mse_end, "recon_mse_standardised": mse_after_std,
        "latent_std_x_0.18215_before": stats["before"]["std_all"] * OPEN_SORA_SCALING_FACTOR,
        "latent_channel_std_before": stats["before"]["std"], "latent_channel_mean_before": stats["before"]["mean"],
        "standardised": stats["standardised"],
        "latent_std_x_0.18215": float(z.std()), "latent_mean_x_0.18215": float(z.mean()),
        "fit_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip

    tmp = dir_temp_name(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        if preview_size is not None:
            preview_hw = (int(preview_size[0]), int(preview_size[1]))
            pv = load_frame_pool(csv_paths[0], preview_hw, frames_per_video=2, seed=seed)
            _save_preview(vae, pv, tmp / "recon_preview.png")
            record["recon_mse_preview_size"] = _recon_mse(vae, pv)
            record["preview_size"] = [int(s) for s in preview_size]
        (tmp / _MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        publish_dir(tmp, out)  # replaces an empty out_dir or, with overwrite, the previous fit
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
