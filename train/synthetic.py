"""Synthetic video-text data: small mp4 clips of moving coloured shapes with captions that describe them.

``make_synthetic_dataset(out_dir)`` writes

* ``videos/video_XXX.mp4``: a circle / square / triangle of a named colour moving left to right, right to
  left, top to bottom, bottom to top or diagonally over a plain or gradient background (H.264 via PyAV;
  if no H.264 encoder is available the files are MPEG-4 Part 2 instead and a warning says so);
  ``vocabulary="simple"`` (the CPU demo's) narrows that to 4 colours, 2 plain backgrounds and the 4
  axis-aligned motions with larger moving shapes, the videos cycling through all 96 combinations;
* ``images/image_XXX.png``: a single still shape (for PixArt-style image training, T = 1);
* ``broken/...``: with ``corrupt=n``, n broken entries cycling over a truncated mp4, a file of garbage
  bytes and a path that does not exist (for tests and demos of the skip-bad-samples path);
* ``captions.csv`` with header ``path,text,num_frames`` (paths relative to ``out_dir``; ``num_frames`` is
  1 for images and left empty for the missing / garbage entries), written last and atomically: when it
  exists, the dataset is complete.

Everything is a pure function of ``seed`` (the decoded pixels and the CSV; the mp4 bytes come from the
encoder and are deterministic in practice too). The default call takes well under a second.

Command line: ``python -m stdit.train.synthetic OUT_DIR [--num-videos N] [--num-images N] [--frames F]
[--size H W] [--fps FPS] [--seed S] [--corrupt N] [--vocabulary full|simple]``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from stdit.common.files import atomic_path

from .extras import train_imports

__all__ = [
    "COLORS",
    "SIMPLE_COLORS",
    "SIMPLE_BACKGROUNDS",
    "SIMPLE_MOTIONS",
    "SHAPES",
    "MOTIONS",
    "make_synthetic_dataset",
    "write_mp4",
    "pick_video_codec",
    "render_shape",
    "simple_combinations",
    "main",
]

# Named colours (RGB). Captions use these names verbatim.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 190),
    "cyan": (40, 210, 220),
    "magenta": (230, 40, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark blue": (15, 25, 90),
    "dark green": (15, 70, 30),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "beige": (225, 210, 170),
}
SHAPES = ("circle", "square", "triangle")
# name -> (start (x, y), end (x, y)) in units of the free travel range [0, 1].
MOTIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left to right": ((0.0, 0.5), (1.0, 0.5)),
    "right to left": ((1.0, 0.5), (0.0, 0.5)),
    "top to bottom": ((0.5, 0.0), (0.5, 1.0)),
    "bottom to top": ((0.5, 1.0), (0.5, 0.0)),
    "diagonally from top left to bottom right": ((0.0, 0.0), (1.0, 1.0)),
    "diagonally from bottom right to top left": ((1.0, 1.0), (0.0, 0.0)),
    "diagonally from bottom left to top right": ((0.0, 1.0), (1.0, 0.0)),
    "diagonally from top right to bottom left": ((1.0, 0.0), (0.0, 1.0)),
}


# The "simple" vocabulary (the CPU demo's): few, contrasting factors on plain backgrounds, larger moving shapes, so
# that a tiny model trained for minutes can learn every combination (4 x 3 x 4 x 2 = 96 captions).
SIMPLE_COLORS = ("red", "green", "yellow", "cyan")
SIMPLE_BACKGROUNDS = ("dark blue", "gray")
SIMPLE_MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
VOCABULARIES = ("full", "simple")

_CODEC_CACHE: dict[str, str] = {}


def pick_video_codec() -> str:
    """Return the PyAV encoder to use: ``libx264`` (H.264) when it works, else ``mpeg4`` (with a warning)."""
    if "codec" in _CODEC_CACHE:
        return _CODEC_CACHE["codec"]
    with train_imports("av"):
        import av

    chosen = None
    for name in ("libx264", "h264", "libopenh264"):
        try:
            codec = av.codec.Codec(name, "w")
        except Exception:  # not built into this FFmpeg
            continue
        if codec.is_encoder:
            chosen = name
            break
    if chosen is None:
        chosen = "mpeg4"
        warnings.warn("stdit.train.synthetic: no H.264 encoder in this PyAV build; writing MPEG-4 Part 2 "
                      "(codec 'mpeg4') mp4 files instead", RuntimeWarning, stacklevel=2)
    _CODEC_CACHE["codec"] = chosen
    return chosen


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, *, codec: str | None = None,
              crf: int = 18, container_format: str = "mp4") -> str:
    """Encode ``frames`` (uint8, shape (T, H, W, 3), H and W even) as an mp4 at ``fps``; return the codec name.

    Frame k gets pts k in time base 1/fps, so a decoder sees exactly T frames in order.
    ``container_format`` picks another muxer (e.g. "matroska", whose streams do not record a frame count).
    """
    with train_imports("av"):
        import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 array of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("frames: expected at least one frame")
    if h % 2 or w % 2:
        raise ValueError(f"frames: height and width must be even for yuv420p, got {h}x{w}")
    codec = codec or pick_video_codec()
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec in ("libx264", "h264"):
            # byte-identical output run to run: one thread, and no macroblock-tree rate control, whose
            # lookahead gave different bits for the same frames (decoded pixels off by up to 23) on
            # x264 in PyAV 18.1 even with one thread; tiny clips gain nothing from either
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        else:
            stream.options = {"qscale": "2"}
            stream.thread_count = 1
        for k in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            frame.pts = k
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def _background(h: int, w: int, c0, c1=None, vertical: bool = True) -> np.ndarray:
    c0 = np.asarray(c0, np.float32)
    if c1 is None:
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    c1 = np.asarray(c1, np.float32)
    n = h if vertical else w
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    ramp = ramp[:, None, None] if vertical else ramp[None, :, None]
    return np.broadcast_to(c0 + (c1 - c0) * ramp, (h, w, 3)).astype(np.float32)


def render_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, color) -> np.ndarray:
    """Paint a filled ``shape`` ("circle", "square", "triangle" pointing up) of half-size ``r`` centred at
    (cx, cy) onto ``canvas`` (H, W, 3) in place; returns the canvas."""
    h, w = canvas.shape[:2]
    ys, xs = np.ogrid[0:h, 0:w]
    xs = xs + 0.5
    ys = ys + 0.5
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    elif shape == "triangle":
        depth = (ys - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        mask = (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= depth * r)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    canvas[mask] = np.asarray(color, canvas.dtype)
    return canvas


def _pick_scene(rng: np.random.Generator, vocabulary: str = "full"):
    shape = SHAPES[rng.integers(len(SHAPES))]
    if vocabulary == "simple":
        bg0 = SIMPLE_BACKGROUNDS[rng.integers(len(SIMPLE_BACKGROUNDS))]
        color = SIMPLE_COLORS[rng.integers(len(SIMPLE_COLORS))]
        return shape, color, bg0, None, True, f"a {bg0} background"
    bg_names = list(BACKGROUNDS)
    bg0 = bg_names[rng.integers(len(bg_names))]
    gradient = bool(rng.integers(2))
    bg1 = None
    if gradient:
        others = [b for b in bg_names if b != bg0]
        bg1 = others[rng.integers(len(others))]
    used = {bg0, bg1}
    colors = [c for c in COLORS if c not in used]
    color = colors[rng.integers(len(colors))]
    vertical = bool(rng.integers(2))
    if bg1 is None:
        bg_text = f"a {bg0} background"
    else:
        bg_text = f"a {'vertical' if vertical else 'horizontal'} gradient background from {bg0} to {bg1}"
    return shape, color, bg0, bg1, vertical, bg_text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def simple_combinations() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, motion, background) of the "simple" vocabulary: 3 x 4 x 4 x 2 = 96."""
    return list(itertools.product(SHAPES, SIMPLE_COLORS, SIMPLE_MOTIONS, SIMPLE_BACKGROUNDS))


def _make_video(rng, frames: int, h: int, w: int, vocabulary: str = "full", combo=None):
    if combo is not None:  # (shape, colour, motion, plain background)
        shape, color, motion, bg0 = combo
        bg1, vertical, bg_text = None, True, f"a {bg0} background"
    else:
        shape, color, bg0, bg1, vertical, bg_text = _pick_scene(rng, vocabulary)
        motions = SIMPLE_MOTIONS if vocabulary == "simple" else tuple(MOTIONS)
        motion = motions[rng.integers(len(motions))]
    (x0, y0), (x1, y1) = MOTIONS[motion]
    r = (0.22 if vocabulary == "simple" else 0.18) * min(h, w)
    # the shape's centre travels within [r, size - r] so it stays fully visible
    def to_px(u, size):
        return r + u * (size - 2 * r)

    bg = _background(h, w, BACKGROUNDS[bg0], BACKGROUNDS[bg1] if bg1 else None, vertical)
    out = np.empty((frames, h, w, 3), np.uint8)
    for k in range(frames):
        a = k / max(frames - 1, 1)
        cx = to_px(x0 + (x1 - x0) * a, w)
        cy = to_px(y0 + (y1 - y0) * a, h)
        canvas = bg.copy()
        render_shape(canvas, shape, cx, cy, r, COLORS[color])
        out[k] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    text = f"{_article(color)} {color} {shape} moving {motion} on {bg_text}"
    return out, text


def _make_image(rng, h: int, w: int, vocabulary: str = "full"):
    shape, color, bg0, bg1, vertical, bg_text = _pick_scene(rng, vocabulary)
    r = float(rng.uniform(0.2, 0.3)) * min(h, w)
    cx = float(rng.uniform(r, w - r))
    cy = float(rng.uniform(r, h - r))
    canvas = _background(h, w, BACKGROUNDS[bg0], BACKGROUNDS[bg1] if bg1 else None, vertical).copy()
    render_shape(canvas, shape, cx, cy, r, COLORS[color])
    img = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return img, f"{_article(color)} {color} {shape} on {bg_text}"


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def make_synthetic_dataset(out_dir: str | Path, *, num_videos: int = 8, num_images: int = 4, frames: int = 24,
                           size: Sequence[int] = (64, 64), fps: int = 8, seed: int = 0,
                           corrupt: int = 0, vocabulary: str = "full") -> Path:
    """Write a synthetic captioned dataset into ``out_dir`` and return the path of its ``captions.csv``.

    ``size`` is (H, W), both even. Rows: the videos, then the images, then the ``corrupt`` broken entries.
    ``vocabulary``: "full" (9 colours, 6 backgrounds with gradients, 8 motions) or "simple" (4 colours,
    2 plain backgrounds, 4 axis-aligned motions, larger moving shapes: what a tiny model learns in minutes).
    """
    from PIL import Image

    num_videos = _check_count("num_videos", num_videos)
    num_images = _check_count("num_images", num_images)
    frames = _check_count("frames", frames, 1)
    fps = _check_count("fps", fps, 1)
    seed = _check_count("seed", seed)
    corrupt = _check_count("corrupt", corrupt)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 8 and s % 2 == 0
                       for s in size)):
        raise ValueError(f"size: expected (H, W), two even ints >= 8, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary: expected one of {VOCABULARIES}, got {vocabulary!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, str]] = []
    codec = pick_video_codec() if (num_videos or corrupt) else None

    if num_videos:
        (out / "videos").mkdir(exist_ok=True)
    # "simple": the videos cycle through every combination (in a seeded order), so 96 videos hold each
    # caption once and any simple prompt names a combination that was trained on
    combos = simple_combinations() if vocabulary == "simple" else None
    order = rng.permutation(len(combos)) if combos else None
    for i in range(num_videos):
        combo = combos[order[i % len(combos)]] if combos else None
        clip, text = _make_video(rng, frames, h, w, vocabulary, combo)
        rel = f"videos/video_{i:03d}.mp4"
        write_mp4(out / rel, clip, fps, codec=codec)
        rows.append((rel, text, str(frames)))

    if num_images:
        (out / "images").mkdir(exist_ok=True)
    for i in range(num_images):
        img, text = _make_image(rng, h, w, vocabulary)
        rel = f"images/image_{i:03d}.png"
        Image.fromarray(img).save(out / rel)
        rows.append((rel, text, "1"))

    if corrupt:
        (out / "broken").mkdir(exist_ok=True)
    for i in range(corrupt):
        kind = ("truncated", "garbage", "missing")[i % 3]
        rel = f"broken/{kind}_{i:03d}.mp4"
        target = out / rel
        if kind == "truncated":
            clip, _ = _make_video(rng, frames, h, w, vocabulary)
            write_mp4(target, clip, fps, codec=codec)
            data = target.read_bytes()
            target.write_bytes(data[: max(1, len(data) // 3)])
            rows.append((rel, "a truncated mp4 file (corrupt entry)", str(frames)))
        elif kind == "garbage":
            target.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
            rows.append((rel, "a file of random bytes (corrupt entry)", ""))
        else:
            if target.exists():
                target.unlink()
            rows.append((rel, "a path that does not exist (corrupt entry)", ""))

    csv_path = out / "captions.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "num_frames"])
        writer.writerows(rows)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stdit.train.synthetic",
                                description="Write a synthetic moving-shapes video/image dataset with captions.csv.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--frames", type=int, default=24, help="frames per video")
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", type=int, default=0, help="number of broken entries to add")
    p.add_argument("--vocabulary", choices=VOCABULARIES, default="full",
                   help="caption factors: full (9 colours, gradients, 8 motions) or simple (the CPU demo's)")
    a = p.parse_args(argv)
    try:
        csv_path = make_synthetic_dataset(a.out_dir, num_videos=a.num_videos, num_images=a.num_images,
                                          frames=a.frames, size=tuple(a.size), fps=a.fps, seed=a.seed,
                                          corrupt=a.corrupt, vocabulary=a.vocabulary)
    except ValueError as e:
        p.error(str(e))
    codec = pick_video_codec() if (a.num_videos or a.corrupt) else "-"
    print(f"wrote {csv_path}")
    videos = f"{a.num_videos} videos ({a.frames} frames, {a.size[0]}x{a.size[1]}, {a.fps} fps, codec {codec})" \
        if a.num_videos else "0 videos"
    print(f"  {videos}, {a.num_images} images, {a.corrupt} corrupt entries")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    for row in rows[:8]:
        print(f"  {row[0]}: {row[1]}")
    if len(rows) > 8:
        print(f"  ... and {len(rows) - 8} more (see {csv_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
