"""What a benchmark case is, and the size presets the suites build cases at.

A ``Case`` names one measurement (suite, op, backend, shape, mode, dtype), carries its analytic cost
(stdit.models.costs) and a ``build(device)`` that allocates the inputs and returns the zero-argument
callable to time. Building is lazy, so listing a suite is free and a case that fails to build (out of
memory, backend missing) becomes a row with that status.

Shapes come from Open-Sora 1.0's train configs: a video ``FxRxR`` of F frames at R pixels is a latent
of F x R/8 x R/8 (VAE), patchified 2x2, so T = F frames of S = (R/16)^2 tokens, at Open-Sora's per-GPU
batch. Sizes (``SIZES``):

- ``full``  (GPU): STDiT-XL/2 widths (C 1152, 16 heads of 72, T5's 120 text tokens), shapes
  16x256x256 B8, 16x512x512 B8, 64x512x512 B4; the models suite sweeps frames 16 -> 128 at 256 and
  16 -> 64 at 512 (batch 1) with the full depth of 28 blocks.
- ``quick`` (the main job on any device; CPU-sized): the same head dim 72, fewer heads and smaller
  videos, the STDiT-tiny model.
- ``tiny``  (tests, pytest bench/ smoke runs): the smallest shapes that still exercise every path.

The sample suite (stdit.bench.sample_suite) has its own sizes (``Size.sample``, a ``SampleSize``):
whole videos at batch 1 of the XL/2 models at Open-Sora's shapes (``full``), of the CPU demo's models
at the demo's sample sizes (``quick``: STDiT-demo 8x96x96, STDiT3-demo 8x64x64, the demo's tiny
encoders) and of the mini models (``tiny``, tests).

STDiT3 (Open-Sora 1.2) rows use the same shapes, read as latent frames x pixels, so they sit beside
the STDiT rows (Open-Sora 1.2's own VAE also compresses time, so a clip of its has about 4x the
frames of its latent): its blocks at the same widths with ``text_len3`` text tokens (T5's 300 at
``full``), its models at ``model3`` (STDiT3-XL/2 at ``full``, STDiT3-tiny at STDiT-tiny's widths at
``quick``, STDiT3-mini at ``tiny``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from stdit.common.dtypes import short_name
from stdit.models.costs import Cost
from stdit.models.sizes import SIZES as MODEL_SIZES
from stdit.models.sizes import STDIT3_SIZES, ModelSize

__all__ = ["Case", "INTERPRETED", "SIZES", "SampleSize", "Size", "VideoShape", "triton_interpreted"]

INTERPRETED = "not timed: triton runs under the CPU interpreter (a correctness tool, not a performance measurement)"


def triton_interpreted(device: torch.device) -> bool:
    """Whether triton kernels on ``device`` would run under the interpreter (never timed)."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class VideoShape:
    """A training shape: ``frames`` x ``resolution``^2 pixels at ``batch`` samples per device."""

    frames: int
    resolution: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.frames}x{self.resolution}x{self.resolution}"

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames, self.resolution // 8, self.resolution // 8)

    @property
    def tokens_per_frame(self) -> int:
        return (self.resolution // 16) ** 2

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass(frozen=True)
class SampleSize:
    """The sample suite at one size: one video (batch 1, doubled by classifier-free guidance) per row."""

    stdit: str  # model presets (random weights unless a checkpoint is given)
    stdit3: str
    shapes: tuple[VideoShape, ...]  # STDiT videos (IDDPM)
    shapes3: tuple[VideoShape, ...]  # STDiT3 videos (rectified flow)
    text_len: int  # text tokens: T5's 120 (Open-Sora 1.0) ...
    text_len3: int  # ... and 300 (Open-Sora 1.2)
    caption_channels: int  # text feature width when no text encoder runs (T5-XXL: 4096)
    encoders: str  # "tiny": the demo's in-code T5 (word tokenizer) and VAE; "local": STDIT_T5_DIR / STDIT_VAE_DIR
    steps: int = 100  # IDDPM sampling steps (Open-Sora 1.0)
    steps3: int = 30  # rectified-flow steps (Open-Sora 1.2)
    video_shapes: int = 1  # the leading shapes of each family that get the whole-video rows
    video_reps: int = 2  # timed whole videos after the one that warms up and gives the output
    step_probe: int = 6  # sampler steps run to time one step (a warm-up run first)
    # shapes with denoising-step rows under torch.compile (None: all; Inductor takes ~20 s for a demo model on
    # 2 cores, minutes for an XL/2 one)
    compile_shapes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Size:
    """Widths and shapes of one size preset (see the module docstring)."""

    name: str
    hidden_size: int  # kernels, fused and blocks suites: channels C ...
    num_heads: int  # ... in heads of C / num_heads
    text_len: int  # ... and text tokens L
    shapes: tuple[VideoShape, ...]  # kernels, fused and blocks suites
    model: ModelSize  # models, train and parallel suites
    model_sweep: tuple[VideoShape, ...]  # models suite: frame sweep
    model3: ModelSize  # models suite: the STDiT3 (Open-Sora 1.2) model
    text_len3: int  # blocks suite: STDiT3 blocks' text tokens
    compile_shapes: tuple[str, ...] | None = None  # shapes with compiled block variants (None: all)
    train_shapes: tuple[VideoShape, ...] = ()  # train / parallel suites (default: the first of shapes)
    model_compile_shapes: tuple[str, ...] = ()  # model_sweep shapes with a compiled STDiT3 train step
    sample: SampleSize | None = None  # sample suite


_XL2 = MODEL_SIZES["XL/2"]
SIZES: dict[str, Size] = {
    "full": Size(
        "full", _XL2.hidden_size, _XL2.num_heads, _XL2.model_max_length,
        shapes=(VideoShape(16, 256, 8), VideoShape(16, 512, 8), VideoShape(64, 512, 4)),
        model=_XL2,
        model_sweep=tuple(VideoShape(f, 256, 1) for f in (16, 32, 64, 128))
        + tuple(VideoShape(f, 512, 1) for f in (16, 32, 64)),
        model3=STDIT3_SIZES["XL/2"], text_len3=STDIT3_SIZES["XL/2"].model_max_length,
        compile_shapes=("16x512x512",),  # Inductor takes ~0.5-1 min per block variant and mode
        model_compile_shapes=("16x256x256",),  # ... and minutes for a 56-block train step
        sample=SampleSize(
            "STDiT-XL/2", "STDiT3-XL/2", shapes=(VideoShape(16, 256, 1), VideoShape(16, 512, 1), VideoShape(64, 512, 1)),
            shapes3=(VideoShape(16, 256, 1), VideoShape(16, 512, 1), VideoShape(64, 512, 1)),
            text_len=_XL2.model_max_length, text_len3=STDIT3_SIZES["XL/2"].model_max_length,
            caption_channels=_XL2.caption_channels, encoders="local", video_reps=1, step_probe=5,
            compile_shapes=("16x256x256",),
        ),
    ),  # fmt: skip
    "quick": Size(
        "quick", 288, 4, 32,
        shapes=(VideoShape(8, 128, 2), VideoShape(16, 128, 2), VideoShape(16, 256, 1)),
        model=MODEL_SIZES["tiny"].replace(caption_channels=64, model_max_length=16),
        model_sweep=tuple(VideoShape(f, 128, 1) for f in (4, 8, 16, 32)),
        # STDiT3-tiny at STDiT-tiny's widths (C 144, 2 heads): the same per-block work as the STDiT row
        model3=STDIT3_SIZES["tiny"].replace(hidden_size=144, num_heads=2, caption_channels=64, model_max_length=16),
        text_len3=32,
        train_shapes=(VideoShape(8, 64, 2),),
        model_compile_shapes=("8x128x128",),  # one compiled train step (~1 min of Inductor on 2 cores)
        # the CPU demo's sample sizes and text length (configs/demo, configs/demo_v12)
        sample=SampleSize("STDiT-demo", "STDiT3-demo", shapes=(VideoShape(8, 96, 1),), shapes3=(VideoShape(8, 64, 1),),
                          text_len=24, text_len3=24, caption_channels=32, encoders="tiny", video_reps=3),
    ),  # fmt: skip
    "tiny": Size(
        "tiny", 144, 2, 8,
        shapes=(VideoShape(4, 64, 1),),
        model=MODEL_SIZES["mini"].replace(model_max_length=8),
        model_sweep=(VideoShape(2, 64, 1), VideoShape(4, 64, 1)),
        model3=STDIT3_SIZES["mini"].replace(model_max_length=8), text_len3=8,
        compile_shapes=(),
        train_shapes=(VideoShape(2, 32, 1),),
        sample=SampleSize("STDiT-mini", "STDiT3-mini", shapes=(VideoShape(2, 32, 1),), shapes3=(VideoShape(2, 32, 1),),
                          text_len=8, text_len3=8, caption_channels=16, encoders="tiny", steps=4, steps3=4,
                          video_reps=1, step_probe=3, compile_shapes=()),
    ),  # fmt: skip
}


@dataclass
class Case:
    suite: str
    op: str
    backend: str
    ours: bool
    shape: VideoShape
    mode: str
    dtype: torch.dtype
    dims: dict
    build: Callable[[torch.device], Callable[[], object]] | None
    cost: Cost | None
    skip: str | None = None  # a status that means "do not run" ("unsupported: ...", "not timed: ...")
    tokens: int | None = None
    # Cases that time themselves (e.g. a torchrun job reporting its own step times) set this instead
    # of relying on build(): measure(device, quick) -> stdit.bench.timing.Timing.
    measure: Callable | None = None

    @property
    def dtype_name(self) -> str:
        return short_name(self.dtype)

    @property
    def id(self) -> str:
        return "-".join((self.suite, self.op, self.backend, self.shape.label, self.mode, self.dtype_name))
