"""The sampling suite ("sample"): how long one video takes, part by part, and what fast sampling buys
at what quality.

Per model family (STDiT: IDDPM, 100 steps; STDiT3: rectified flow, 30 steps) and shape, one video of
batch 1 (doubled by classifier-free guidance, scale 7) for a fixed prompt and seed:

- ``<family>.text_encode``: the prompt through the text encoder (backend ``t5``);
- ``<family>.denoise_step``: one sampler step (the guided model evaluation on the doubled batch plus
  the scheduler update), per attention backend, and under torch.compile (``<backend>+compile``; on
  CUDA also ``<backend>+cudagraphs``, torch.compile's "reduce-overhead" mode, which replays CUDA
  graphs). Timed inside the real sampler: a short run of ``step_probe`` steps warms up (compilation
  included), then the time between consecutive steps of timed runs (the host clock, synchronised); a
  compiled row's runs alternate with runs of the eager model (same attention backend), whose median
  step is its dims' ``eager_ms`` (speedup = eager_ms / the row's median);
- ``<family>.vae_decode``: the latents through the VAE (backend ``vae``);
- ``<family>.video``: the whole video, text encoding + every step + decode, per fast-sampling
  setting (the backend column): ``plain`` (the reference), ``off`` (FastSampling installed with every
  skip off: exact, so its quality must be rel-L2 0 and PSNR inf), ``pab`` / ``pab+mlp`` (pyramid
  attention broadcast, stdit.models.accel.Broadcast.paper), ``pab-fit`` (the paper's intervals in
  a range fitted to this model and schedule: see below), ``cache-<threshold>`` (step caching) and
  ``pab+cache-0.1``. The plain video runs once to warm up, then ``video_reps`` timed times (its row).
  Every other setting is timed in ``video_reps`` interleaved pairs with a plain video (plain first,
  then the setting first, and so on: a machine that speeds up or slows down during the run affects
  both sides alike), its first run giving its output. Its row's dims carry ``plain_ms`` (the median
  of its paired plain videos; speedup = plain_ms / the row's median) and ``plain_runs``, ``reused``
  (what FastSampling skipped in one video) and ``quality`` against the plain output of the same
  prompt and seed (stdit.bench.quality: latent rel-L2 and PSNR, frame PSNR and SSIM, LPIPS or why
  not). ``off`` and a setting that reused nothing do the plain work: their speedup is the noise of
  the machine.

``pab-fit``: before its row, one untimed plain video of another seed (CALIBRATION_SEED) runs under
stdit.models.accel.ChangeProbe, which records how much each kind of attention output changes from
step to step (PAB's attention difference); fit_broadcast_range picks the window of the paper's share
of the steps (0.48) where they change least, and the row samples the measured seed with the paper's
intervals in that range. The row's dims carry the fit (``fit``) and the curves (``change``, drawn in
the report): the paper's fixed range [450, 930] is a range of Open-Sora 1.2's shifted timesteps at
480p-720p and holds few steps of a small video's schedule.

Weights: ``STDIT_SAMPLE_CHECKPOINT`` / ``STDIT_SAMPLE_CHECKPOINT3`` (``stdit bench --checkpoint DIR
--checkpoint3 DIR``: a checkpoint, a run folder or a folder of stage runs such as runs/demo, whose last
stage is taken) load trained models with their encoders (stdit.train.sample.load_for_sampling), at the
stage's sample size; otherwise the size's presets get seeded random weights (every parameter
N(0, 0.02), norm gains 1 + N(0, 0.1): the zero-initialised layers of a fresh model would make every
output 0) and every quality cell says "random weights". Encoders: the demo's in-code ones (quick,
tiny) or local T5-XXL / sd-vae-ft-ema folders (STDIT_T5_DIR / STDIT_VAE_DIR, full); a part that
cannot run here is a row saying so, never a stand-in, and the model then gets seeded random caption
features (the video rows say which).

The parts of one (family, shape) share one loaded pipeline and one plain video, kept only while that
pair's cases run (rows of one suite run share a process).

Dimension alphabet: B batch, C channels, T frames, H, W height and width, L text tokens.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stdit.common.dtypes import dtype_bytes
from stdit.models import costs
from stdit.models.accel import Broadcast, ChangeProbe, FastSampling, StepCache, fit_broadcast_range
from stdit.models.sizes import split_preset
from stdit.train.extras import MissingTrainDependency

from . import quality
from .cases import INTERPRETED, Case, SampleSize, Size, VideoShape, triton_interpreted
from .timing import Timing, from_times

PROMPT = "a red circle moving from left to right on a dark blue background"  # in the demo's vocabulary
SEED = 0
CALIBRATION_SEED = 1  # pab-fit's range is fitted on a video of this seed, then measured on SEED's
FIT = "fit"  # the broadcast of the pab-fit setting: the paper's intervals in a range fitted per pipeline
CFG_SCALE = 7.0  # Open-Sora 1.0's and 1.2's inference guidance
STDIT3_FPS = 24
TIMER = "host clock (synchronised)"
RANDOM_WEIGHTS = "random weights"
CHECKPOINT_VARS = {"STDiT": "STDIT_SAMPLE_CHECKPOINT", "STDiT3": "STDIT_SAMPLE_CHECKPOINT3"}

# setting -> (broadcast, step-cache threshold); None: no FastSampling at all (the reference)
SETTINGS: dict[str, tuple[Broadcast | str | None, float] | None] = {
    "plain": None,
    "off": (Broadcast(), 0.0),
    "pab": (Broadcast.paper(), 0.0),
    "pab+mlp": (Broadcast.paper(mlp=True), 0.0),
    "pab-fit": (FIT, 0.0),
    "cache-0.05": (None, 0.05),
    "cache-0.1": (None, 0.1),
    "cache-0.2": (None, 0.2),
    "pab+cache-0.1": (Broadcast.paper(), 0.1),
}


# ------------------------------------------------------------------------------------------------
# Where the weights come from
# ------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, a run folder (its latest checkpoint is read later) or a folder of stage runs
    (runs/demo: stage1, stage2, ...; the last one in name order) -> the folder load_for_sampling takes."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint: {p} is not a folder (expected a checkpoint, a run folder or a folder of runs)")
    if (p / "meta.json").is_file() or (p / "checkpoints").is_dir():
        return p
    runs = sorted(d for d in p.iterdir() if (d / "checkpoints").is_dir())
    if not runs:
        raise ValueError(f"checkpoint: {p} holds no checkpoint, run folder (with checkpoints/) or folder of runs")
    return runs[-1]


def _stage_config(run: Path):
    """The stage configuration a checkpoint (or a run's latest) was trained with, read from its meta.json."""
    from stdit.train.checkpoint import latest_checkpoint
    from stdit.train.config import from_dict

    ckpt = run if (run / "meta.json").is_file() else latest_checkpoint(run)
    if ckpt is None:
        raise ValueError(f"checkpoint: no complete checkpoint under {run}")
    raw = (json.loads((ckpt / "meta.json").read_text()).get("extra") or {}).get("config")
    if not raw:
        raise ValueError(f"checkpoint: {ckpt} has no stage configuration (not a `stdit train` checkpoint)")
    return from_dict(raw, source=str(ckpt / "meta.json"))


def _checkpoint_shape(run: Path, family: str) -> VideoShape:
    """The stage's sample size (what `stdit sample` draws by default) as a square VideoShape."""
    from stdit.train.build import model_family
    from stdit.train.sample import _stage_shape

    cfg = _stage_config(run)
    if model_family(cfg.model.preset) != family:
        var = CHECKPOINT_VARS[family]
        raise ValueError(f"{var}: {run} holds a {cfg.model.preset} model, not {family}")
    T, H, W = _stage_shape(cfg)
    if H != W:
        raise ValueError(f"checkpoint: the sample suite draws square videos; {run} samples at {H}x{W}")
    return VideoShape(T, H, 1)


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """Seeded random weights: N(0, 0.02) for every parameter, norm gains 1 + N(0, 0.1) (rope tables kept)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("rope.freqs"):
            continue
        w = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(w * 0.1 + 1.0 if name.endswith("norm.weight") else w * 0.02)
    return model


# ------------------------------------------------------------------------------------------------
# One video: encode the prompt, sample, decode
# ------------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """A model with its sampler and encoders, for one family at one video size."""

    family: str
    model: torch.nn.Module
    text: object | None  # stdit.train.encoders.TextEncoder, or None (why in ``no_text``)
    vae: object | None  # stdit.train.encoders.VideoVAE, or None (why in ``no_vae``)
    frames: int
    height: int
    width: int
    steps: int
    weights: str  # "trained: <checkpoint>" or RANDOM_WEIGHTS
    features: tuple[torch.Tensor, torch.Tensor]  # caption features y (1, 1, L, C) and mask (1, L) for the prompt
    autocast: torch.dtype | None = None
    no_text: str = ""
    no_vae: str = ""

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's caption features: the text encoder's, or the fixed random ones without it."""
        if self.text is None:
            return self.features
        y, mask = self.text.encode([PROMPT])
        return y.to(self.device).float(), mask.to(self.device)

    def sample(self, y, mask, *, steps: int | None = None, on_step=None, model=None, seed: int = SEED) -> torch.Tensor:
        """Latents (1, C, T, H/8, W/8) float32 for caption features y, mask; seeded, so every call
        gives the same video. ``model``: another callable of the same weights (a compiled one)."""
        model = self.model if model is None else model
        steps = steps or self.steps
        gen = torch.Generator(device=self.device).manual_seed(seed)
        shape = (1, self.model.in_channels, self.frames, self.height // 8, self.width // 8)
        auto = torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with torch.no_grad(), auto:
            if self.family == "STDiT":
                from stdit.train.diffusion import IDDPM

                return IDDPM(timestep_respacing=str(steps)).sample(
                    model, shape, {"y": y, "mask": mask}, cfg_scale=CFG_SCALE, progress=False, generator=gen,
                    device=self.device, on_step=on_step,
                )  # fmt: skip
            from stdit.train.rflow import RFlow

            z = torch.randn(shape, generator=gen, device=self.device)

            def one(v: float) -> torch.Tensor:
                return torch.full((1,), float(v), device=self.device)

            # Open-Sora 1.2's inference inputs, as stdit.train.sample.sample_stdit3_latents passes them
            kwargs = {"height": one(self.height), "width": one(self.width), "num_frames": one(self.frames),
                      "ar": one(self.height / self.width), "fps": one(STDIT3_FPS)}  # fmt: skip
            rf = RFlow(num_sampling_steps=steps, cfg_scale=CFG_SCALE, use_timestep_transform=True, nan_quirk=False,
                       overshoot_quirk=False)  # fmt: skip
            return rf.sample(model, z, y=y, mask=mask, model_kwargs=kwargs, generator=gen, on_step=on_step)

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The decoded video (1, 3, T, H, W) in [-1, 1], or None without a VAE."""
        if self.vae is None:
            return None
        with torch.no_grad():
            return self.vae.decode(latents.to(self.vae.dtype))

    def video(self, on_step=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One whole video: encode, sample every step, decode -> (latents, decoded video or None)."""
        y, mask = self.encode()
        latents = self.sample(y, mask, on_step=on_step)
        return latents, self.decode(latents)


def _encoders(sample: SampleSize, device: torch.device, text_len: int):
    """(text encoder or None, why not, VAE or None, why not) for a size without a checkpoint."""
    text = vae = None
    no_text = no_vae = ""
    if sample.encoders == "local":
        t5_dir, vae_dir = os.environ.get("STDIT_T5_DIR"), os.environ.get("STDIT_VAE_DIR")
        try:
            from stdit.train.encoders import TextEncoder, VideoVAE

            text = TextEncoder.from_pretrained(t5_dir, model_max_length=text_len).to(device) if t5_dir else None
            vae = VideoVAE.from_pretrained(vae_dir).to(device) if vae_dir else None
        except (MissingTrainDependency, ImportError) as e:
            no_text = no_vae = str(e)
        no_text = no_text or ("" if text else "no T5-XXL weights on this machine (set STDIT_T5_DIR to a t5-v1_1-xxl folder)")
        no_vae = no_vae or ("" if vae else "no sd-vae-ft-ema weights on this machine (set STDIT_VAE_DIR)")
        return text, no_text, vae, no_vae
    try:
        from stdit.train.encoders import TextEncoder

        text = TextEncoder.tiny(seed=0, model_max_length=text_len, tokenizer="words").to(device)
    except (MissingTrainDependency, ImportError) as e:
        no_text = str(e)
    try:
        from stdit.train.encoders import VideoVAE

        vae = VideoVAE.tiny(seed=0).to(device)
    except (MissingTrainDependency, ImportError) as e:
        no_vae = str(e)
    return text, no_text, vae, no_vae


def build_pipeline(family: str, shape: VideoShape, sample: SampleSize, device: torch.device, dtype: torch.dtype,
                   checkpoint: Path | None = None) -> Pipeline:  # fmt: skip
    """The pipeline of one (family, shape): a trained checkpoint with its own encoders, or the size's
    preset with seeded random weights and the size's encoders."""
    from stdit.models import from_preset

    autocast = dtype if dtype != torch.float32 and device.type == "cuda" else None
    steps = sample.steps if family == "STDiT" else sample.steps3
    T, H, W = shape.frames, shape.resolution, shape.resolution
    if checkpoint is not None:
        from stdit.train.sample import load_for_sampling

        _, model, vae, text, ckpt = load_for_sampling(checkpoint, device)
        y, mask = text.encode([PROMPT])
        return Pipeline(family, model, text, vae, T, H, W, steps, f"trained: {ckpt}", (y.float(), mask), autocast)
    text_len = sample.text_len if family == "STDiT" else sample.text_len3
    text, no_text, vae, no_vae = _encoders(sample, device, text_len)
    width = text.hidden_size if text is not None else sample.caption_channels
    preset = sample.stdit if family == "STDiT" else sample.stdit3
    extra = {"input_size": (T, H // 8, W // 8)} if family == "STDiT" else {}
    torch.manual_seed(SEED)
    model = from_preset(preset, caption_channels=width, model_max_length=text_len, **extra)
    model = random_init(model).to(device).eval()
    if text is not None:
        y, mask = text.encode([PROMPT])
    else:  # seeded random caption features: what a T5 would hand over, in shape only
        g = torch.Generator().manual_seed(SEED + 1)
        y, mask = torch.randn(1, 1, text_len, width, generator=g), torch.ones(1, text_len, dtype=torch.int64)
    features = (y.float().to(device), mask.to(device))
    return Pipeline(family, model, text, vae, T, H, W, steps, RANDOM_WEIGHTS, features, autocast, no_text, no_vae)


# ------------------------------------------------------------------------------------------------
# Clocks
# ------------------------------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timing(times_s: list[float], device: torch.device, timer: str = TIMER) -> Timing:
    peak = torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None
    return from_times([t * 1e3 for t in times_s], len(times_s), timer, peak)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> Timing:
    """``warmup`` calls, then the median / p20 / p80 of ``reps`` timed calls, each synchronised."""
    for _ in range(warmup):
        fn()
    _reset_peak(device)
    times = []
    for _ in range(reps):
        start = _now(device)
        fn()
        times.append(_now(device) - start)
    return _timing(times, device)


def _alternating(pairs: int):
    """True (the baseline) and False (the measured side) ``pairs`` times each, the baseline first in even
    pairs and second in odd ones: a machine that speeds up or slows down affects both sides alike."""
    for i in range(pairs):
        yield from (True, False) if i % 2 == 0 else (False, True)


def time_pairs(fn: Callable[[], object], plain: Callable[[], object], device: torch.device,
               reps: int) -> tuple[Timing, Timing]:  # fmt: skip
    """``reps`` interleaved pairs of ``fn`` and ``plain`` (plain first in even pairs, ``fn`` first in odd
    ones), each call synchronised -> (fn's timing, plain's timing)."""
    _reset_peak(device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for is_plain in _alternating(reps):
        start = _now(device)
        (plain if is_plain else fn)()
        times[is_plain].append(_now(device) - start)
    return _timing(times[False], device), _timing(times[True], device)


def _step_deltas(pipe: Pipeline, model, probe: int) -> list[float]:
    """One sampler run of ``probe`` steps: the time from each step's start (the sampler's on_step) to the
    next step's start, or the end."""
    device = pipe.device
    y, mask = pipe.features
    stamps: list[float] = []
    pipe.sample(y, mask, steps=probe, model=model, on_step=lambda i, t, n: stamps.append(_now(device)))
    stamps.append(_now(device))
    return [b - a for a, b in zip(stamps, stamps[1:])]


STEP_TIMER = TIMER + ", per step inside the sampler"


def time_steps(pipe: Pipeline, model, probe: int, runs: int = 2, warmup: int = 1) -> Timing:
    """One sampler step as the sampler runs it: ``warmup`` runs of ``probe`` steps, then every step of
    ``runs`` timed runs (see _step_deltas)."""
    y, mask = pipe.features
    for _ in range(warmup):
        pipe.sample(y, mask, steps=probe, model=model)
    _reset_peak(pipe.device)
    deltas: list[float] = []
    for _ in range(runs):
        deltas += _step_deltas(pipe, model, probe)
    return _timing(deltas, pipe.device, STEP_TIMER)


def time_steps_paired(pipe: Pipeline, model, probe: int, runs: int = 2, warmup: int = 2) -> tuple[Timing, Timing]:
    """A step of ``model`` (a compiled one) and of the eager ``pipe.model`` in interleaved runs (eager
    first in even runs, ``model`` first in odd ones) after ``warmup`` runs of ``model`` (compilation;
    CUDA-graph recording) and one of eager -> (model's timing, eager's timing)."""
    y, mask = pipe.features
    for _ in range(warmup):
        pipe.sample(y, mask, steps=probe, model=model)
    pipe.sample(y, mask, steps=probe)
    _reset_peak(pipe.device)
    deltas: dict[bool, list[float]] = {True: [], False: []}
    for eager in _alternating(runs):
        deltas[eager] += _step_deltas(pipe, pipe.model if eager else model, probe)
    return _timing(deltas[False], pipe.device, STEP_TIMER), _timing(deltas[True], pipe.device, STEP_TIMER)


# ------------------------------------------------------------------------------------------------
# The session: one pipeline and its plain video at a time
# ------------------------------------------------------------------------------------------------


@dataclass
class Plain:
    timing: Timing
    latents: torch.Tensor
    frames: object | None  # (T, H, W, 3) uint8, or None without a VAE


@dataclass
class Session:
    """What the cases of one suite build share: the pipeline of the (family, shape) running now, its
    plain video and the LPIPS metric; a case of another pair drops the previous pair's first."""

    sample: SampleSize
    checkpoints: dict[str, Path | None]
    _key: tuple | None = None
    _pipe: Pipeline | None = None
    _plain: Plain | None = None
    _lpips: object = field(default=None)
    _fit: tuple | None = None  # (BroadcastFit, change curves) of the pipeline running now

    def pipeline(self, family: str, shape: VideoShape, device: torch.device, dtype: torch.dtype) -> Pipeline:
        key = (family, shape.label, str(device), dtype)
        if key != self._key:
            self._key = self._pipe = self._plain = self._fit = None  # free the previous pair before building the next
            self._pipe = build_pipeline(family, shape, self.sample, device, dtype, self.checkpoints.get(family))
            self._key = key
        return self._pipe

    def plain(self, pipe: Pipeline) -> Plain:
        if self._plain is None:
            out: dict = {}

            def run():
                out["latents"], out["video"] = pipe.video()

            timing = time_calls(run, pipe.device, self.sample.video_reps)
            video = out["video"]
            frames = None if video is None else quality.video_frames(video)
            self._plain = Plain(timing, out["latents"], frames)
        return self._plain

    def fit(self, pipe: Pipeline):
        """(BroadcastFit, change curves): the attention changes of one plain video of CALIBRATION_SEED
        (not timed), and the broadcast range fitted to them."""
        if self._fit is None:
            y, mask = pipe.encode()
            probe = ChangeProbe(pipe.model)
            with probe:
                pipe.sample(y, mask, on_step=probe.on_step, seed=CALIBRATION_SEED)
            curves = probe.curves()
            self._fit = (fit_broadcast_range(curves), curves)
        return self._fit

    def lpips(self):
        if self._lpips is None:
            self._lpips = quality.LPIPSMetric.load()
        return self._lpips


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def _model_size(family: str, sample: SampleSize, checkpoint: Path | None):
    """The ModelSize the cost model counts (the checkpoint's stage preset and text length when given)."""
    if checkpoint is not None:
        cfg = _stage_config(checkpoint)
        _, size = split_preset(cfg.model.preset)
        return size.replace(model_max_length=cfg.encoders.model_max_length)
    _, size = split_preset(sample.stdit if family == "STDiT" else sample.stdit3)
    return size.replace(model_max_length=sample.text_len if family == "STDiT" else sample.text_len3)


def _case(session: Session, family: str, part: str, backend: str, shape: VideoShape, dtype, dims: dict,
          measure, *, ours: bool = False, cost=None, skip: str | None = None) -> Case:  # fmt: skip
    return Case("sample", f"{family}.{part}", backend, ours, shape, "inference", dtype, dims, build=None, cost=cost,
                skip=skip, tokens=shape.tokens, measure=measure)  # fmt: skip


def step_backends(device: torch.device, compiled: bool = True) -> list[tuple[str, str, str | None]]:
    """(label, attention backend, torch.compile mode or None) of the denoising-step rows on ``device``:
    every attention backend that can be timed here (interpreted Triton cannot), then the first of them
    under torch.compile (``compiled``)."""
    attn = ["triton", "sdpa", "reference"] if not triton_interpreted(device) else ["sdpa", "reference"]
    rows = [(b, b, None) for b in attn]
    if not compiled:
        return rows
    best = attn[0]
    rows.append((f"{best}+compile", best, "default"))
    if device.type == "cuda":
        rows.append((f"{best}+cudagraphs", best, "reduce-overhead"))  # torch.compile replaying CUDA graphs
    return rows


def _family_cases(session: Session, family: str, shape: VideoShape, video_rows: bool, device, dtype) -> list[Case]:
    sample, ckpt = session.sample, session.checkpoints.get(family)
    size = _model_size(family, sample, ckpt)
    T, Hl, Wl = shape.latent
    steps = sample.steps if family == "STDiT" else sample.steps3
    base = dict(family=family, B=1, T=T, S=shape.tokens_per_frame, C=size.hidden_size, depth=size.depth,
                H=size.num_heads, L=size.model_max_length, steps=steps, cfg_scale=CFG_SCALE,
                sampler="IDDPM" if family == "STDiT" else "rectified flow",
                weights=f"trained: {ckpt}" if ckpt else RANDOM_WEIGHTS)  # fmt: skip
    cases = []

    # -- text encoding and VAE decode: what ran is named; what cannot run here is a row saying so
    def encoder_case(part: str, backend: str, env: str, what: str) -> Case:
        dims = dict(base, part=part)
        skip = None
        if sample.encoders == "local" and ckpt is None and not os.environ.get(env):
            skip = f"unsupported: not available: no {what} weights on this machine (set {env}); nothing ran"

        def measure(dev, quick):
            pipe = session.pipeline(family, shape, dev, dtype)
            missing = pipe.no_text if part == "text_encode" else pipe.no_vae
            if missing:  # the training stack is not installed here: nothing of this part ran
                raise MissingTrainDependency(f"not available: no {what} ran ({missing})")
            if part == "text_encode":
                dims["encoder"] = getattr(pipe.text, "name", "")
                return time_calls(pipe.encode, dev, reps=5 if quick else 10)
            latents = session.plain(pipe).latents
            dims["encoder"] = getattr(pipe.vae, "name", "")
            return time_calls(lambda: pipe.decode(latents), dev, reps=3 if quick else 5)

        return _case(session, family, part, backend, shape, dtype, dims, measure, skip=skip)

    text_what = "T5-XXL" if sample.encoders == "local" and ckpt is None else "text encoder"
    vae_what = "sd-vae-ft-ema" if sample.encoders == "local" and ckpt is None else "VAE"
    cases.append(encoder_case("text_encode", "t5", "STDIT_T5_DIR", text_what))

    # -- one denoising step per attention backend, eager and compiled
    cost = costs.model_cost(family.lower(), size=size, latent=(T, Hl, Wl), batch=2, mode="fwd",
                            elem_bytes=dtype_bytes(dtype))  # fmt: skip
    compiled = sample.compile_shapes is None or shape.label in sample.compile_shapes
    for label, attn, mode in step_backends(device, compiled):

        dims = dict(base, part="denoise_step", attention=attn, compile=mode)

        def measure_step(dev, quick, attn=attn, mode=mode, dims=dims):
            pipe = session.pipeline(family, shape, dev, dtype)
            saved = pipe.model.attention_backend
            pipe.model.attention_backend = attn
            try:
                if mode is None:
                    return time_steps(pipe, pipe.model, sample.step_probe)
                torch._dynamo.reset()  # compile for this shape, not into another case's cache
                compiled = torch.compile(pipe.model, mode=mode, dynamic=False)
                # two warm-up runs: the first compiles, the second records CUDA graphs in reduce-overhead mode;
                # then runs interleaved with the eager model of the same attention backend (its row's baseline)
                timing, eager = time_steps_paired(pipe, compiled, sample.step_probe, runs=4)
                dims.update(eager_ms=eager.median_ms, eager_runs=eager.reps)
                return timing
            finally:
                pipe.model.attention_backend = saved

        skip = INTERPRETED if attn == "triton" and triton_interpreted(device) else None
        cases.append(_case(session, family, "denoise_step", label, shape, dtype, dims, measure_step,
                           ours=attn == "triton", cost=cost, skip=skip))  # fmt: skip

    cases.append(encoder_case("vae_decode", "vae", "STDIT_VAE_DIR", vae_what))

    # -- whole videos per fast-sampling setting, with quality against the plain one
    if video_rows:
        for setting, spec in SETTINGS.items():
            dims = dict(base, part="video", setting=setting)
            cases.append(_case(session, family, "video", setting, shape, dtype, dims,
                               _video_measure(session, family, shape, dtype, setting, spec, dims)))  # fmt: skip
    return cases


def _video_measure(session: Session, family: str, shape: VideoShape, dtype, setting: str, spec, dims: dict):
    """The measure of one whole-video row; it fills the row's dims (plain_ms, reused, quality)."""

    def measure(dev, quick):
        pipe = session.pipeline(family, shape, dev, dtype)
        plain = session.plain(pipe)
        dims.update(text=pipe.text.name if pipe.text else f"random features ({pipe.no_text})",
                    vae=pipe.vae.name if pipe.vae else f"none ({pipe.no_vae})")  # fmt: skip
        if spec is None:
            dims.update(plain_ms=plain.timing.median_ms, plain_runs=plain.timing.reps, reused="nothing (the reference)",
                        quality={"reference": True})  # fmt: skip
            return plain.timing
        broadcast, threshold = spec
        fitted = ""
        if broadcast == FIT:
            fit, curves = session.fit(pipe)
            broadcast = Broadcast.paper(t_range=fit.t_range)
            fitted = f"{fit.label()} (fitted on seed {CALIBRATION_SEED}): "
            dims["fit"] = dict(t_range=list(fit.t_range), first=fit.first, last=fit.last, steps=fit.steps,
                               fraction=fit.fraction, seed=CALIBRATION_SEED)  # fmt: skip
            dims["change"] = {k: [None if v is None else float(f"{v:.4g}") for v in vals] if k != "step" else vals
                              for k, vals in curves.items()}  # fmt: skip
        out: dict = {}
        fs = FastSampling(pipe.model, broadcast=broadcast, step_cache=StepCache(threshold))

        def run():  # installed for this video only: the paired plain videos run the plain model
            with fs:
                out["latents"], out["video"] = pipe.video(on_step=fs.on_step)
            out.setdefault("stats", json.loads(json.dumps(fs.stats)))  # one video's counts (the first)
            out.setdefault("summary", fs.summary())

        # no warm-up of its own: the plain video warmed the pipeline up; the first timed run gives the output
        timing, paired = time_pairs(run, pipe.video, dev, session.sample.video_reps)
        dims.update(plain_ms=paired.median_ms, plain_runs=paired.reps)
        dims["reused"] = {"summary": fitted + out["summary"], **out["stats"]}
        dims["quality"] = _quality(session, pipe, plain, out["latents"], out["video"])
        return timing

    return measure


def _quality(session: Session, pipe: Pipeline, plain: Plain, latents: torch.Tensor, video) -> dict:
    q = {"weights": pipe.weights, **quality.compare_latents(latents, plain.latents)}
    if video is None or plain.frames is None:
        q.update(frame_psnr=None, frame_ssim=None, lpips=f"n/a: no VAE ({pipe.no_vae})")
    else:
        q.update(quality.compare_frames(quality.video_frames(video), plain.frames, lpips=session.lpips()))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in q.items()}


def sample_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The cases of the sample suite at ``size`` (see the module docstring)."""
    sample = size.sample
    if sample is None:
        return []
    checkpoints = {f: resolve_checkpoint(os.environ[v]) if os.environ.get(v) else None for f, v in CHECKPOINT_VARS.items()}
    session = Session(sample, checkpoints)
    cases = []
    for family in ("STDiT", "STDiT3"):
        ckpt = checkpoints[family]
        shapes = (_checkpoint_shape(ckpt, family),) if ckpt else (sample.shapes if family == "STDiT" else sample.shapes3)
        for i, shape in enumerate(shapes):
            cases += _family_cases(session, family, shape, i < sample.video_shapes, device, dtype)
    return cases
