"""Cut long videos into single-shot clips before training (``stdit prepare --split-scenes``).

Shot boundaries come from PySceneDetect's ``ContentDetector`` (the ``scenedetect`` package, run on its
PyAV backend); every scene is re-encoded as its own clip with PyAV. Needs ``pip install scenedetect``
(its detectors import OpenCV: ``opencv-python`` or ``opencv-python-headless``) and ``av``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

from .extras import train_imports

__all__ = ["detect_scenes", "split_scenes"]


def _import_scenedetect():
    with train_imports("scenedetect"):
        from scenedetect import ContentDetector, SceneManager, open_video
    return ContentDetector, SceneManager, open_video


def _seconds(timecode) -> float:
    """A PySceneDetect timecode in seconds (``.seconds`` in scenedetect >= 0.7, ``get_seconds()`` before)."""
    v = getattr(timecode, "seconds", None)
    return float(v if v is not None and not callable(v) else timecode.get_seconds())


def detect_scenes(
    video_path: str | os.PathLike, *, threshold: float = 27.0, min_scene_len: int = 15
) -> list[tuple[float, float]]:
    """Shot boundaries of a video as (start, end) seconds, via PySceneDetect's ContentDetector on PyAV.

    A video without a detected cut gives one scene covering all of it; the last scene's end is +inf so
    the tail frames belong to it whatever the rounding of the end timecode.
    """
    ContentDetector, SceneManager, open_video = _import_scenedetect()
    video = open_video(str(video_path), backend="pyav")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_scene_len))
    manager.detect_scenes(video=video, show_progress=False)
    scenes = [(_seconds(a), _seconds(b)) for a, b in manager.get_scene_list()]
    if not scenes:
        return [(0.0, float("inf"))]
    scenes[-1] = (scenes[-1][0], float("inf"))
    return scenes


def split_scenes(
    video_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threshold: float = 27.0,
    min_scene_len: int = 15,
    codec: str = "libx264",
) -> list[Path]:
    """Split a video at shot boundaries (PySceneDetect ContentDetector, ``threshold``, ``min_scene_len``
    frames) and write each scene as its own clip ``out_dir/<stem>-scene-000.mp4`` ... (re-encoded with PyAV,
    same frame rate and size rounded down to even; ``codec`` falls back to mpeg4 if unavailable). Returns
    the clip paths in order.
    """
    scenes = detect_scenes(video_path, threshold=threshold, min_scene_len=min_scene_len)
    with train_imports("av"):
        import av

    src_path = Path(video_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if codec not in av.codecs_available:
        codec = "mpeg4"
    paths: list[Path] = []
    sink = ostream = None

    def close_sink() -> None:
        for pkt in ostream.encode():  # flush the encoder's delayed frames
            sink.mux(pkt)
        sink.close()

    with av.open(str(src_path)) as src:
        stream = src.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        start0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        half_frame = 0.5 / float(rate)
        k = -1  # scene of the previous frame
        try:
            for frame in src.decode(stream):
                t = (float(frame.time) if frame.time is not None else 0.0) - start0
                # scene of this frame (frame times are rounded; half a frame of slack at the cut)
                kk = max(k, 0)
                while kk + 1 < len(scenes) and t + half_frame >= scenes[kk + 1][0]:
                    kk += 1
                if kk != k:
                    if sink is not None:
                        close_sink()
                    k = kk
                    p = out / f"{src_path.stem}-scene-{len(paths):03d}.mp4"
                    sink = av.open(str(p), mode="w")
                    ostream = sink.add_stream(codec, rate=rate)
                    ostream.width = frame.width - frame.width % 2  # yuv420p needs even sizes
                    ostream.height = frame.height - frame.height % 2
                    ostream.pix_fmt = "yuv420p"
                    ostream.time_base = Fraction(1, 1) / rate
                    paths.append(p)
                    n_out = 0
                img = frame.reformat(width=ostream.width, height=ostream.height, format="yuv420p")
                img.pts = n_out  # constant frame rate, time base 1/rate
                n_out += 1
                for pkt in ostream.encode(img):
                    sink.mux(pkt)
        finally:
            if sink is not None:
                close_sink()
    return paths
