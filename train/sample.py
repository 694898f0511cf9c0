"""`stdit sample`: text -> video (and image -> video) from a training checkpoint.

The checkpoint's meta.json carries its stage configuration, so the same encoders (a local VAE / T5,
or the seeded "tiny" ones of the demo) and model are rebuilt; the EMA weights are used when present
(Open-Sora samples with EMA weights). The model family decides the sampler:

- STDiT (Open-Sora 1.0): IDDPM with respaced steps (100 by default) and classifier-free guidance
  (scale 7.0, all latent channels guided by default; ``guide_channels=3`` is Open-Sora's quirk), at
  the stage's frame count and size.
- STDiT3 (Open-Sora 1.2): rectified flow as Open-Sora 1.2's inference config runs it (30 Euler steps,
  guidance 7.0, the resolution- and length-aware timestep transform), at any frame count and any
  size in multiples of 8 pixels; the model gets the pixel ``height`` / ``width``, ``num_frames``,
  ``ar`` = height / width and ``fps`` (120 for a single frame, Open-Sora 1.2's image rate) as its
  inference passes them. ``cond_image`` conditions on a picture as Open-Sora 1.2's reference image
  with mask strategy "0" does: the image, scaled to cover the output and centre-cropped, is encoded
  by the stage's VAE into latent frame 0, which stays fixed (cond_mask 0) while the other frames
  (cond_mask 1) are generated; the model sees it through ``x_mask`` as a conditioning frame.

The VAE decodes the latents per frame, and the frames are written as an mp4 (H.264 through PyAV)
or, when the file name ends in .gif or no mp4 encoder is available, a GIF.

Dimension alphabet: B batch, C latent channels, T frames, H, W pixel height and width.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from stdit.common.files import atomic_path
from stdit.models.accel import Broadcast, ChangeProbe, FastSampling, StepCache, fit_broadcast_range, is_fit_spec

from .build import build_encoders, build_model, resolve_device
from .checkpoint import checkpoint_weights, latest_checkpoint
from .config import from_dict
from .data import IMAGE_FPS, resize_center_crop
from .diffusion import IDDPM
from .parallel_sample import ParallelSampling
from .rflow import RFlow
from .synthetic import write_mp4

IDDPM_STEPS = 100  # Open-Sora 1.0's respaced sampling steps
RFLOW_STEPS = 30  # Open-Sora 1.2's inference config (num_sampling_steps)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
STDIT_FPS = 8  # the frame rate an STDiT sample is written at
STDIT3_FPS = 24  # Open-Sora 1.2's inference fps (the model's fps input and the written video's rate)


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
    steps: int | None = None,
    cfg_scale: float = 7.0,
    guide_channels: int | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    cond_image: str | Path | None = None,
    timestep_transform: bool = True,
    seed: int = 0,
    fps: int | None = None,
    device: str = "auto",
    progress: bool = True,
    sheet: str | Path | None = None,
    broadcast: Broadcast | str | None = None,
    step_cache: StepCache | float | None = None,
    parallel: ParallelSampling | None = None,
    compile: str | None = None,
) -> Path | None:
    """Generate one video for ``prompt`` and write it to ``out``; returns the written path.

    steps: sampling steps; None: 100 respaced IDDPM steps (STDiT), 30 rectified-flow steps (STDiT3).
    num_frames: frames to generate (None: the stage's [data] num_frames, or its largest bucket's);
        the VAE keeps the frame count.
    height, width: the video's size in pixels, multiples of 8 (STDiT3 only; None: the stage's
        [data] image_size, or its largest bucket's at the aspect ratio closest to 1). The latent is
        (T, height/8, width/8).
    cond_image: STDiT3 only: a PNG/JPEG the video starts from (its first latent frame; see the module
        docstring). Needs num_frames >= 2.
    guide_channels: STDiT (IDDPM) only. timestep_transform: STDiT3 only (False: the plain linear schedule).
    fps: frame rate of the written video and, for STDiT3, the model's fps input (None: 8 for STDiT, 24 for STDiT3).
    sheet: also write the frames side by side as one PNG (a contact sheet: the whole clip at a glance).
    broadcast: attention broadcast (stdit.models.accel.Broadcast or a Broadcast.parse spec such as
        "paper"), or "fit": first one plain video of seed + 1 (untimed, not written) measures how much the
        attention outputs change per step (ChangeProbe), then the paper's intervals are used in the window
        of 48% of the steps where they change least (fit_broadcast_range); the fitted range goes to stderr
        as a spec to pass next time. step_cache: a TeaCache-style threshold or StepCache. None for either: the stage's
        [sample] table (off unless set there). How many module calls and steps were reused goes to stderr.
    parallel: a stdit.train.parallel_sample.ParallelSampling (under torchrun): CFG-parallel and / or
        sequence-parallel sampling; every rank samples, rank 0 writes and returns the path, the others
        return None.
    compile: run the denoiser under torch.compile in this mode ("default", "reduce-overhead": CUDA graphs
        replayed each step on a GPU, "max-autotune", "max-autotune-no-cudagraphs"); None or "none": eager.
        Plain sampling in one process only (a broadcast's or step cache's per-step decisions and the
        parallel wrappers would make it recompile or break its graph). Whether it helps is measured by
        ``stdit bench --suite sample`` (the ``+compile`` / ``+cudagraphs`` denoising-step rows), never assumed.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: expected a non-empty caption")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
        raise ValueError(f"steps: expected 1..1000 sampling steps, got {steps!r}")
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("fps", fps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % 8:
            raise ValueError(f"{name}: expected a multiple of 8 pixels (the VAE's downsampling), got {value}")
    if cond_image is not None and not Path(cond_image).is_file():
        raise FileNotFoundError(f"cond_image: no image file at {cond_image}")
    if sheet is not None and Path(sheet).suffix.lower() != ".png":  # before minutes of sampling
        raise ValueError(f"sheet: expected a .png path, got {str(sheet)!r}")
    fit = is_fit_spec(broadcast)
    if fit:
        broadcast = None
    elif isinstance(broadcast, str):
        broadcast = Broadcast.parse(broadcast)
    elif broadcast is not None and not isinstance(broadcast, Broadcast):
        raise TypeError(f"broadcast: expected a Broadcast, a spec string or None, got {type(broadcast).__name__}")
    if step_cache is not None and not isinstance(step_cache, StepCache):
        step_cache = StepCache(step_cache)
    if compile in (None, "none"):
        compile = None
    elif compile not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {['none', *COMPILE_MODES]}, got {compile!r}")
    dev = parallel.device if parallel is not None else resolve_device(device)
    cfg, model, vae, text, ckpt = load_for_sampling(checkpoint, dev)
    family = getattr(model, "family", "STDiT")
    if broadcast is None and not fit:
        fit = is_fit_spec(cfg.sample.broadcast)
        broadcast = None if fit else Broadcast.parse(cfg.sample.broadcast)
    if fit and parallel is not None:
        raise ValueError("broadcast: 'fit' measures on one process (ranks would fit apart); fit in one process and "
                         "pass the range it prints")  # fmt: skip
    step_cache = step_cache if step_cache is not None else StepCache(cfg.sample.step_cache)
    if compile is not None:
        why = [w for w, on in (("--broadcast", fit or broadcast.enabled), ("--step-cache", step_cache.enabled),
                               ("multi-process sampling", parallel is not None)) if on]  # fmt: skip
        if why:
            raise ValueError(f"compile: plain one-process sampling only; drop {' and '.join(why)} or the compile mode")
    runner = model if parallel is None else parallel.wrap(model)
    compiled = f", torch.compile {compile}" if compile else ""
    if compile is not None:
        # static shapes: the guided batch and the latent size are the same every step
        runner = torch.compile(model, mode=None if compile == "default" else compile, dynamic=False)
    if parallel is not None and parallel.cfg > 1 and cfg_scale is None:
        raise ValueError("cfg_parallel: needs classifier-free guidance (a cfg_scale)")
    progress = progress and (parallel is None or parallel.writes)
    T = num_frames or cfg.data.num_frames
    gen = torch.Generator(device=dev).manual_seed(seed)
    y, mask = text.encode([prompt])
    y, mask = y.to(dev), mask.to(dev)
    if family == "STDiT3":
        if guide_channels is not None:
            raise ValueError("guide_channels: IDDPM's partial guidance (STDiT); rectified flow guides the velocity, "
                             f"drop it for {cfg.model.preset}")
        T0, H0, W0 = _stage_shape(cfg)
        T = num_frames or T0
        H, W = height or H0, width or W0
        fps = fps or STDIT3_FPS
        steps = steps or RFLOW_STEPS
        what = f"rectified flow, {steps} steps, cfg {cfg_scale}" + (f", conditioned on {cond_image}" if cond_image else "")

        def draw(on_step, generator, show):
            return sample_stdit3_latents(
                runner, vae, y, mask, num_frames=T, height=H, width=W, fps=fps, steps=steps, cfg_scale=cfg_scale,
                cond_image=cond_image, timestep_transform=timestep_transform, generator=generator, progress=show,
                on_step=on_step,
            )  # fmt: skip
    else:
        unsupported = [k for k, v in (("height", height), ("width", width), ("cond_image", cond_image)) if v is not None]
        if unsupported or not timestep_transform:
            names = ", ".join(unsupported + ([] if timestep_transform else ["timestep_transform"]))
            raise ValueError(f"{names}: STDiT3 sampling options; {cfg.model.preset} samples with IDDPM at the stage's "
                             f"size {cfg.data.image_size[0]}x{cfg.data.image_size[1]}")
        H, W = cfg.data.image_size
        fps = fps or STDIT_FPS
        steps = steps or IDDPM_STEPS
        diffusion = IDDPM(timestep_respacing=str(steps))
        what = f"{steps} steps, cfg {cfg_scale}"

        def draw(on_step, generator, show):
            return diffusion.sample(
                runner, (1, 4, T, H // 8, W // 8), {"y": y, "mask": mask}, cfg_scale=cfg_scale,
                guide_channels=guide_channels, progress=show, generator=generator, device=dev, on_step=on_step,
            )  # fmt: skip

    if fit:
        probe = ChangeProbe(model)
        _say(parallel, f"fitting the broadcast range: one plain video of seed {seed + 1} ({what})")
        with torch.no_grad(), probe:
            draw(probe.on_step, torch.Generator(device=dev).manual_seed(seed + 1), progress)
        found = fit_broadcast_range(probe.curves())
        broadcast = Broadcast.paper(t_range=found.t_range)
        _say(parallel, f"fitted broadcast {found.label()}; to reuse it: --broadcast {found.spec()}")
    fast = FastSampling(model, broadcast, step_cache, reduce=None if parallel is None else parallel.reduce)
    _say(parallel, f"sampling {T}x{H}x{W} from {ckpt} ({what}{_extras(fast, parallel)}{compiled})")
    with torch.no_grad(), fast:
        latents = draw(fast.on_step, gen, progress)
    if broadcast.enabled or step_cache.enabled:
        _say(parallel, f"fast sampling: {fast.summary()}")
    if parallel is not None and not parallel.writes:
        return None
    with torch.no_grad():
        video = vae.decode(latents)  # (1, 3, T, H, W) in [-1, 1]
    frames = ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if sheet is not None:
        write_sheet(frames, sheet)
    return write_video(frames, out, fps)


def _extras(fast: FastSampling, parallel: ParallelSampling | None) -> str:
    """", broadcast ..., step cache ..., cfg-parallel x2 + dsp x2" for the start line (empty when plain)."""
    parts = [f"broadcast {fast.broadcast.label()}"] if fast.broadcast.enabled else []
    parts += [f"step cache {fast.step_cache.threshold:g}"] if fast.step_cache.enabled else []
    parts += [parallel.describe()] if parallel is not None and parallel.world > 1 else []
    return "".join(", " + p for p in parts)


def _say(parallel: ParallelSampling | None, line: str) -> None:
    """A progress line on stderr, once (rank 0 under torchrun)."""
    if parallel is None or parallel.writes:
        print(line, file=sys.stderr)


def sample_stdit3_latents(
    model: torch.nn.Module,
    vae,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    steps: int = RFLOW_STEPS,
    cfg_scale: float = 7.0,
    cond_image: str | Path | None = None,
    timestep_transform: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step=None,
) -> torch.Tensor:
    """Rectified-flow sampling of one STDiT3 video: latents (1, C, T, height/8, width/8) float32.

    y (1, 1, L, Ct) caption features and mask (1, L) from the stage's text encoder. The starting noise
    and the per-step noise come from ``generator``. Open-Sora 1.2's timestep transform counts frames as
    its VAE compresses them (17 -> 5) and gives 2..16 frames a factor 0 (every t -> 0, NaN at t = 1000);
    ours keeps the frame count, so such clips take the image factor 1 instead (``nan_quirk=False``).
    ``model`` may be a parallel runner (stdit.train.parallel_sample.CFGParallel); ``on_step`` goes to
    RFlow.sample.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: expected at least 1 frame, got {num_frames}")
    for name, value in (("height", height), ("width", width)):
        if value < 8 or value % 8:
            raise ValueError(f"{name}: expected a positive multiple of 8 pixels (the VAE's downsampling), got {value}")
    if cond_image is not None and num_frames < 2:
        raise ValueError(f"cond_image: the image becomes frame 0, so at least 2 frames are needed; got num_frames = "
                         f"{num_frames}")
    device = y.device
    shape = (1, model.in_channels, num_frames, height // 8, width // 8)
    z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def per_sample(v: float) -> torch.Tensor:
        return torch.full((1,), float(v), device=device)

    model_kwargs = {
        "height": per_sample(height), "width": per_sample(width), "num_frames": per_sample(num_frames),
        "ar": per_sample(height / width), "fps": per_sample(IMAGE_FPS if num_frames == 1 else fps),
    }  # fmt: skip
    cond_mask = None
    if cond_image is not None:
        picture = load_cond_image(cond_image, (height, width)).to(device)  # (1, 3, 1, H, W)
        z[:, :, :1] = vae.encode(picture, sample=False).float()  # the posterior mean: a fixed frame 0
        cond_mask = torch.ones(1, num_frames, device=device)
        cond_mask[:, 0] = 0.0  # frame 0 kept, the others generated
    rf = RFlow(num_sampling_steps=steps, cfg_scale=cfg_scale, use_timestep_transform=timestep_transform,
               nan_quirk=False, overshoot_quirk=False)  # fmt: skip
    return rf.sample(model, z, y=y, mask=mask, model_kwargs=model_kwargs, cond_mask=cond_mask, progress=progress,
                     generator=generator, on_step=on_step)  # fmt: skip


def _stage_shape(cfg) -> tuple[int, int, int]:
    """The (frames, height, width) a stage trained at: its [data] num_frames and image_size, or for a
    bucketed stage its largest bucket (first resolution and frame count) at the aspect ratio closest to 1."""
    if not cfg.data.buckets:
        return cfg.data.num_frames, cfg.data.image_size[0], cfg.data.image_size[1]
    from .buckets import BucketConfig

    buckets = BucketConfig(cfg.data.buckets, cfg.data.aspect_ratios).buckets()
    first = buckets[0]
    square = min((b for b in buckets if (b.resolution, b.num_frames) == (first.resolution, first.num_frames)),
                 key=lambda b: abs(math.log(b.aspect_ratio)))  # fmt: skip
    return square.shape


def load_cond_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A picture file -> (1, 3, 1, H, W) float32 in [-1, 1]: scaled to cover size = (H, W) keeping its
    aspect, centre-cropped (the training data's transform, Open-Sora's "resize_crop")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))  # (h, w, 3) uint8
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cond_image: {path} is not an image Pillow can read (PNG, JPEG, ...): {e}") from None
    frames = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()  # (1, 3, h, w) in [0, 255]
    picture = resize_center_crop(frames, size).div(127.5).sub(1.0).clamp(-1.0, 1.0)
    return picture.permute(1, 0, 2, 3)[None].contiguous()  # (1, 3, 1, H, W)


def write_sheet(frames: np.ndarray, out: str | Path) -> Path:
    """Write frames (T, H, W, 3) uint8 side by side as one PNG, atomically; returns the path."""
    from PIL import Image

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"sheet: expected a .png path, got {str(out)!r}")
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(tmp, format="PNG")
    return out
