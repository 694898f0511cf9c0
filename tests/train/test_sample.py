"""stdit sample's writers: the frames come back from the mp4 / GIF / PNG sheet, each written atomically
(no temporary file left, an existing file replaced whole). Sampling itself: test_trainer's demo chain."""

import numpy as np
import pytest

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from stdit.train.sample import write_sheet, write_video  # noqa: E402


def _frames(T=4, H=16, W=24):
    levels = np.linspace(0, 240, T).astype(np.uint8)
    return np.stack([np.full((H, W, 3), v, np.uint8) for v in levels])


def test_write_video_mp4_and_gif(tmp_path):
    frames = _frames()
    mp4 = tmp_path / "out" / "v.mp4"
    assert write_video(frames, mp4, fps=8) == mp4
    with av.open(str(mp4)) as c:
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert got.shape == frames.shape
    assert np.abs(got.astype(int) - frames.astype(int)).max() <= 4  # lossy coding: measured max 1 grey level
    gif = write_video(frames[::-1], tmp_path / "out" / "v.gif", fps=8)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (24, 16)
    write_video(frames[:2], mp4, fps=8)  # replaced whole
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.gif", "v.mp4"]


def test_write_sheet(tmp_path):
    frames = _frames()
    sheet = write_sheet(frames, tmp_path / "s.png")
    assert np.array_equal(np.asarray(Image.open(sheet)), np.concatenate(list(frames), axis=1))
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]
    with pytest.raises(ValueError, match="sheet"):
        write_sheet(frames, tmp_path / "s.jpg")
