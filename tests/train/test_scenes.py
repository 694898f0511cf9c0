"""split_scenes: a two-shot video is cut into two clips at the shot boundary; a missing PySceneDetect
gives an ImportError saying what to install."""

import pytest

from stdit.train.scenes import split_scenes


def _write_two_shot_video(path, n=20, size=64, fps=10):
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(2 * n):
            v = 0 if i < n else 255
            img = np.full((size, size, 3), v, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_split_scenes_two_shots(tmp_path):
    pytest.importorskip("scenedetect", reason="PySceneDetect not installed (pip install scenedetect)")
    pytest.importorskip("cv2", reason="PySceneDetect needs OpenCV (pip install opencv-python-headless)")
    av = pytest.importorskip("av")

    src = tmp_path / "two.mp4"
    _write_two_shot_video(src)
    clips = split_scenes(src, tmp_path / "clips", threshold=27.0, min_scene_len=5)
    assert [p.name for p in clips] == ["two-scene-000.mp4", "two-scene-001.mp4"]
    means, counts = [], []
    for p in clips:
        with av.open(str(p)) as c:
            frames = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
        counts.append(len(frames))
        means.append(sum(float(f.mean()) for f in frames) / len(frames))
    assert counts == [20, 20]
    assert means[0] < 30 and means[1] > 225


def test_split_scenes_import_error_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "scenedetect" or name.startswith("scenedetect."):
            raise ImportError("No module named 'scenedetect'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scenedetect"):
        split_scenes(tmp_path / "x.mp4", tmp_path)
