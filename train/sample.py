"""`stdit sample`: text -> video from a training checkpoint.

The checkpoint's meta.json carries its stage configuration, so the same encoders (a local VAE / T5,
or the seeded "tiny" ones of the demo) and model are rebuilt; the EMA weights are used when present
(Open-Sora samples with EMA weights). IDDPM with respaced steps (100 by default) and classifier-free
guidance (scale 7.0, all latent channels guided by default; ``guide_channels=3`` is Open-Sora's
quirk) produces latents, the VAE decodes them per frame, and the frames are written as an mp4
(H.264 through PyAV) or, when the file name ends in .gif or no mp4 encoder is available, a GIF.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from stdit.common.files import atomic_path

from .build import build_encoders, build_model, resolve_device
from .checkpoint import checkpoint_weights, latest_checkpoint
from .config import from_dict
from .diffusion import IDDPM
from .synthetic import write_mp4


def load_for_sampling(checkpoint: str | Path, device: torch.device):
    """(config, model with EMA weights, vae, text encoder) from a checkpoint or run directory."""
    path = Path(checkpoint)
    ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"checkpoint: no complete checkpoint at {path}")
    meta = json.loads((ckpt / "meta.json").read_text())
    raw = (meta.get("extra") or {}).get("config")
    if not raw:
        raise ValueError(f"checkpoint: {ckpt} has no stage configuration in meta.json (not a `stdit train` checkpoint)")
    cfg = from_dict(raw, source=str(ckpt / "meta.json"))
    vae, text = build_encoders(cfg, device)
    model = build_model(cfg, text.hidden_size, device)
    sd = checkpoint_weights(ckpt, device=str(device))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f"checkpoint: {ckpt} lacks {len(missing)} model tensors (e.g. {missing[:3]})")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return cfg, model.eval(), vae, text, ckpt


def write_video(frames: np.ndarray, out: str | Path, fps: int = 8) -> Path:
    """frames (T, H, W, 3) uint8 -> an mp4 (PyAV, H.264) or a GIF (Pillow) by the file's suffix, written
    atomically; an mp4 that cannot be encoded here falls back to a GIF next to it (with a warning)."""
    out = Path(out)
    if out.suffix.lower() != ".gif":
        try:
            with atomic_path(out) as tmp:
                write_mp4(tmp, frames, fps)  # the container format is named: the temporary suffix does not matter
            return out
        except Exception as e:  # noqa: BLE001 - no encoder: fall back to GIF
            warnings.warn(f"could not write {out} as mp4 ({e}); writing a GIF instead", stacklevel=2)
            out = out.with_suffix(".gif")
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_path(out) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return out


def sample_video(
    checkpoint: str | Path,
    prompt: str,
    out: str | Path,
    *,
    steps: int = 100,
    cfg_scale: float = 7.0,
    guide_channels: int | None = None,
    num_frames: int | None = None,
    seed: int = 0,
    fps: int = 8,
    device: str = "auto",
    progress: bool = True,
    sheet: str | Path | None = None,
) -> Path:
    """Generate one video for ``prompt`` and write it to ``out``; returns the written path.

    ``sheet``: also write the frames side by side as one PNG (a contact sheet: the whole clip at a glance).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: expected a non-empty caption")
    if steps < 1 or steps > 1000:
        raise ValueError(f"steps: expected 1..1000 sampling steps, got {steps}")
    if sheet is not None and Path(sheet).suffix.lower() != ".png":  # before minutes of sampling
        raise ValueError(f"sheet: expected a .png path, got {str(sheet)!r}")
    dev = resolve_device(device)
    cfg, model, vae, text, ckpt = load_for_sampling(checkpoint, dev)
    T = num_frames or cfg.data.num_frames
    H, W = cfg.data.image_size
    y, mask = text.encode([prompt])
    gen = torch.Generator(device=dev).manual_seed(seed)
    diffusion = IDDPM(timestep_respacing=str(steps))
    print(f"sampling {T}x{H}x{W} from {ckpt} ({steps} steps, cfg {cfg_scale})", file=sys.stderr)
    with torch.no_grad():
        latents = diffusion.sample(
            model, (1, 4, T, H // 8, W // 8), dict(y=y.to(dev), mask=mask.to(dev)), cfg_scale=cfg_scale,
            guide_channels=guide_channels, progress=progress, generator=gen, device=dev,
        )  # fmt: skip
        video = vae.decode(latents)  # (1, 3, T, H, W) in [-1, 1]
    frames = ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if sheet is not None:
        write_sheet(frames, sheet)
    return write_video(frames, out, fps)


def write_sheet(frames: np.ndarray, out: str | Path) -> Path:
    """Write frames (T, H, W, 3) uint8 side by side as one PNG, atomically; returns the path."""
    from PIL import Image

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"sheet: expected a .png path, got {str(out)!r}")
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(tmp, format="PNG")
    return out
