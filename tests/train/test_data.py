"""stdit.train.data / stdit.train.synthetic: CSV parsing, decoding, temporal/spatial sampling, bad files,
resumable loading. Everything runs on small synthetic clips written into tmp dirs (CPU, a few seconds)."""

import csv
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("PIL")

from stdit.train.data import (  # noqa: E402
    BadSampleWarning,
    ResumableBatchSampler,
    VideoTextDataset,
    collate_skip_bad,
    count_skipped,
    make_dataloader,
    read_csv,
    resize_center_crop,
    sample_frame_indices,
)
from stdit.train.synthetic import COLORS, MOTIONS, SHAPES, main as synthetic_main, make_synthetic_dataset  # noqa: E402
from stdit.train.synthetic import write_mp4  # noqa: E402

RAMP_T = 40
RAMP_STEP = 6  # frame k has grey level 6k (0..234): frame index = level / 6


def _write_csv(path: Path, rows, header=None):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _frame_ids(video: torch.Tensor) -> np.ndarray:
    """Mean grey level of each frame of a (3, T, H, W) [-1, 1] ramp clip -> frame index (float). The
    checks below compare with atol=0.5: the nearest frame must be the expected one (lossy video coding
    moves the grey level; this identifies frames, it is not a precision bound)."""
    level = (video.mean(dim=(0, 2, 3)) + 1.0) * 127.5
    return level.numpy() / RAMP_STEP


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    t0 = time.perf_counter()
    csv_path = make_synthetic_dataset(out, corrupt=3)
    return csv_path, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """A 40-frame 48x64 grey ramp video (frame k encodes k) and a CSV with 10 rows pointing at it."""
    d = tmp_path_factory.mktemp("ramp")
    frames = np.stack([np.full((48, 64, 3), RAMP_STEP * k, np.uint8) for k in range(RAMP_T)])
    write_mp4(d / "ramp.mp4", frames, fps=8)
    csv_path = _write_csv(d / "ramp.csv", [("ramp.mp4", f"ramp {i}") for i in range(10)])
    return csv_path


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_dataset_content_speed_and_determinism(synth, tmp_path):
    csv_path, _ = synth
    rows = list(csv.reader(open(csv_path, newline="")))
    assert rows[0] == ["path", "text", "num_frames"]
    body = rows[1:]
    assert len(body) == 8 + 4 + 3
    for path, text, nf in body[:8]:
        assert path.endswith(".mp4") and (csv_path.parent / path).is_file() and nf == "24"
        assert any(f" {c} " in f" {text} " for c in COLORS) and any(s in text for s in SHAPES)
        assert any(f"moving {m} on" in text for m in MOTIONS) and "background" in text
        with av.open(str(csv_path.parent / path)) as c:
            n = sum(1 for _ in c.decode(video=0))
        assert n == 24
    for path, text, nf in body[8:12]:
        assert path.endswith(".png") and nf == "1" and any(s in text for s in SHAPES)
    assert [Path(p).name.split("_")[0] for p, _, _ in body[12:]] == ["truncated", "garbage", "missing"]
    assert not (csv_path.parent / body[14][0]).exists()

    # default call is fast and deterministic for a seed
    t0 = time.perf_counter()
    a = make_synthetic_dataset(tmp_path / "a")
    assert time.perf_counter() - t0 < 3.0
    b = make_synthetic_dataset(tmp_path / "b")
    c = make_synthetic_dataset(tmp_path / "c", seed=1)
    assert a.read_text() == b.read_text() != c.read_text()
    with av.open(str(a.parent / "videos/video_003.mp4")) as ca, av.open(str(b.parent / "videos/video_003.mp4")) as cb:
        fa = np.stack([f.to_ndarray(format="rgb24") for f in ca.decode(video=0)])
        fb = np.stack([f.to_ndarray(format="rgb24") for f in cb.decode(video=0)])
    np.testing.assert_array_equal(fa, fb)
    # every clip is byte-identical, not just one decoded clip (x264's mb-tree once made them differ)
    for va in sorted((a.parent / "videos").glob("*.mp4")):
        assert va.read_bytes() == (b.parent / "videos" / va.name).read_bytes(), va.name
    assert (a.parent / "images/image_001.png").read_bytes() == (b.parent / "images/image_001.png").read_bytes()


def test_synthetic_caption_describes_motion(tmp_path):
    """The caption's direction matches where the shape actually goes (centroid of non-background pixels)."""
    csv_path = make_synthetic_dataset(tmp_path, num_videos=6, num_images=0, frames=12, size=(64, 64), seed=3)
    for path, text, _ in list(csv.reader(open(csv_path)))[1:]:
        with av.open(str(tmp_path / path)) as c:
            fr = [f.to_ndarray(format="rgb24").astype(np.float32) for f in c.decode(video=0)]
        color = text.split()[1]  # "a red circle moving ..."

        def centroid(img):
            mask = np.abs(img - np.asarray(COLORS[color], np.float32)).sum(-1) < 60
            ys, xs = np.nonzero(mask)
            return xs.mean(), ys.mean()

        (x0, y0), (x1, y1) = centroid(fr[0]), centroid(fr[-1])
        if "left to right" in text:
            assert x1 > x0 + 10
        if "right to left" in text:
            assert x1 < x0 - 10
        if "top to bottom" in text or "from top" in text:
            assert y1 > y0 + 10
        if "bottom to top" in text or "from bottom" in text:
            assert y1 < y0 - 10


def test_synthetic_simple_vocabulary(tmp_path):
    """vocabulary="simple": only the demo's colours, plain backgrounds and axis-aligned motions; bad names refused."""
    from stdit.train.synthetic import SIMPLE_BACKGROUNDS, SIMPLE_COLORS, SIMPLE_MOTIONS

    csv_path = make_synthetic_dataset(tmp_path / "s", num_videos=12, num_images=4, frames=4, size=(32, 32),
                                      vocabulary="simple")
    rows = list(csv.reader(open(csv_path)))[1:]
    assert len(rows) == 16
    for path, text, _ in rows:
        words = text.split()
        assert words[1] in SIMPLE_COLORS and words[2] in SHAPES and "gradient" not in text
        assert any(text.endswith(f"on a {bg} background") for bg in SIMPLE_BACKGROUNDS)
        if path.startswith("videos/"):
            assert any(f"moving {m} on" in text for m in SIMPLE_MOTIONS)
    assert len({r[1].split()[1] for r in rows}) > 1
    assert len({r[1] for r in rows if r[0].startswith("videos/")}) == 12  # combinations cycle: no repeats yet
    with pytest.raises(ValueError, match="vocabulary: expected one of"):
        make_synthetic_dataset(tmp_path / "bad", vocabulary="tiny")


def test_synthetic_cli(tmp_path, capsys):
    assert synthetic_main([str(tmp_path / "cli"), "--num-videos", "2", "--num-images", "1", "--frames", "6",
                           "--size", "32", "48", "--corrupt", "1"]) == 0
    out = capsys.readouterr().out
    assert "captions.csv" in out and "2 videos" in out and "1 corrupt" in out
    ds = VideoTextDataset(tmp_path / "cli" / "captions.csv", num_frames=3, frame_interval=1, image_size=(16, 16))
    assert len(ds) == 4


# ----------------------------------------------------------------------------------------------------- CSV
def test_csv_header_any_order_headerless_and_quoted_commas(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _write_csv(tmp_path / "a.csv", [("7", "a cat, a dog, and a bird", "x.mp4"), ("", "plain", "/abs/y.png")],
                   header=["num_frames", "text", "path"])
    s = read_csv(a)
    assert [x.text for x in s] == ["a cat, a dog, and a bird", "plain"]
    assert s[0].path == str(tmp_path / "x.mp4") and s[1].path == "/abs/y.png"
    assert s[0].num_frames == 7 and s[1].num_frames is None and s[1].is_image and not s[0].is_image

    b = tmp_path / "b.csv"
    b.write_text('x.mp4,"hello, world",12\ny.mp4,"he said ""hi"", then left"\n')
    s = read_csv(b, root=tmp_path / "sub")
    assert [x.text for x in s] == ["hello, world", 'he said "hi", then left']
    assert s[0].path == str(tmp_path / "sub" / "x.mp4") and [x.num_frames for x in s] == [12, None]

    c = _write_csv(tmp_path / "c.csv", [("x.mp4", "only text")], header=["path", "text"])
    assert read_csv(c)[0].num_frames is None


def test_dataset_reads_headerless_csv_with_commas(synth, tmp_path):
    csv_path, _ = synth
    rows = list(csv.reader(open(csv_path)))[1:3]
    hl = _write_csv(tmp_path / "hl.csv", [(str(csv_path.parent / p), t + ", with a comma") for p, t, _ in rows])
    ds = VideoTextDataset(hl, num_frames=2, frame_interval=1, image_size=(16, 16))
    s = ds[1]
    assert s["text"] == rows[1][1] + ", with a comma" and s["video"].shape == (3, 2, 16, 16)


# ------------------------------------------------------------------------------------------ samples, shapes
def test_shapes_range_and_fields(synth):
    csv_path, _ = synth
    ds = VideoTextDataset(csv_path, num_frames=4, frame_interval=2, image_size=(32, 40))
    texts = [r[1] for r in list(csv.reader(open(csv_path)))[1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for i in range(12):
            s = ds[i]
            t = 4 if i < 8 else 1  # videos then images (T = 1)
            assert s["video"].shape == (3, t, 32, 40) and s["video"].dtype == torch.float32
            assert s["num_frames"] == t and s["index"] == i and s["text"] == texts[i]
            assert Path(s["path"]).is_file()
            v = s["video"]
            assert v.min() >= -1.0 and v.max() <= 1.0 and v.max() - v.min() > 0.5
        img = VideoTextDataset(csv_path, num_frames=7, image_size=(16, 16))[9]
        assert img["video"].shape == (3, 1, 16, 16) and img["num_frames"] == 1


def test_frame_interval_honoured(ramp):
    ds = VideoTextDataset(ramp, num_frames=5, frame_interval=3, image_size=(16, 16))
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(3):
            ids = _frame_ids(ds[i]["video"])
            k0 = int(round(ids[0]))
            assert 0 <= k0 <= RAMP_T - 13
            np.testing.assert_allclose(ids, k0 + 3 * np.arange(5), atol=0.5)
            starts.add(k0)
    assert len(starts) > 1  # random temporal crop


def test_short_video_policy(ramp):
    # span 4*20+1 = 81 > 40 frames: the largest stride that fits, (40-1)//4 = 9
    ids = _frame_ids(VideoTextDataset(ramp, num_frames=5, frame_interval=20, image_size=(8, 8))[0]["video"])
    k0 = int(round(ids[0]))
    np.testing.assert_allclose(ids, k0 + 9 * np.arange(5), atol=0.5)
    # fewer frames than num_frames: every frame once, then the last one repeated
    ids = _frame_ids(VideoTextDataset(ramp, num_frames=45, frame_interval=1, image_size=(8, 8))[0]["video"])
    want = np.r_[np.arange(RAMP_T), np.full(5, RAMP_T - 1)]
    np.testing.assert_allclose(ids, want, atol=0.5)
    # the index rule itself
    rng = np.random.default_rng(0)
    assert sample_frame_indices(3, 5, 2, rng) == [0, 1, 2, 2, 2]
    for _ in range(20):
        idx = sample_frame_indices(100, 16, 3, rng)
        assert np.all(np.diff(idx) == 3) and 0 <= idx[0] and idx[-1] <= 99
    assert {sample_frame_indices(46, 16, 3, rng)[0] for _ in range(5)} == {0}  # exactly fits


def test_resize_center_crop_non_square(tmp_path):
    # 48x96 video: white top 8 rows; columns: red | green | blue thirds
    h, w = 48, 96
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :32] = (255, 0, 0)
    img[:, 32:64] = (0, 255, 0)
    img[:, 64:] = (0, 0, 255)
    img[:8] = 255
    write_mp4(tmp_path / "wide.mp4", np.stack([img] * 6), fps=8)
    csv_path = _write_csv(tmp_path / "w.csv", [("wide.mp4", "wide")])

    # square target: shorter side (48) -> 32, centre 48x48 crop = columns 24..72: mostly green
    v = VideoTextDataset(csv_path, num_frames=2, frame_interval=1, image_size=(32, 32))[0]["video"]
    assert v.shape == (3, 2, 32, 32)
    rgb = (v[:, 0] + 1) * 127.5  # 3, 32, 32
    centre = rgb[:, 8:, 8:24].mean(dim=(1, 2))
    assert centre[1] > 200 and centre[0] < 60 and centre[2] < 60
    assert rgb[0, 12:, :2].mean() > 150 and rgb[2, 12:, -2:].mean() > 150  # red / blue slivers at the edges
    assert rgb[:, 0, 10:22].mean() > 200  # white band survives at the top (no vertical crop)

    # wide target (16, 48): scale 0.5 covers the width, crops rows 8..40 -> white band gone, 3 colour thirds
    v = VideoTextDataset(csv_path, num_frames=1, frame_interval=1, image_size=(16, 48))[0]["video"]
    rgb = (v[:, 0] + 1) * 127.5
    assert v.shape == (3, 1, 16, 48)
    assert rgb[:, :2].min() < 60  # no white band
    for third, ch in enumerate((0, 1, 2)):
        cols = rgb[:, :, third * 16 + 3: third * 16 + 13].mean(dim=(1, 2))
        assert cols[ch] > 200 and all(cols[o] < 60 for o in range(3) if o != ch)

    # the transform on its own: exact crop geometry on a tensor
    x = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8).expand(2, 3, 4, 8)
    y = resize_center_crop(x, (4, 4))
    assert torch.equal(y, x[..., 2:6])  # a crop with nothing to resize: exact


def test_container_without_frame_count(tmp_path):
    """Matroska records no frame count: the CSV hint is used, and a hint larger than the file (a stale
    num_frames) falls back to the frames actually decoded; without a hint the packets are counted."""
    frames = np.stack([np.full((48, 64, 3), RAMP_STEP * k, np.uint8) for k in range(RAMP_T)])
    write_mp4(tmp_path / "ramp.mkv", frames, fps=8, container_format="matroska")
    with av.open(str(tmp_path / "ramp.mkv")) as c:
        assert c.streams.video[0].frames == 0
    csv_path = _write_csv(tmp_path / "m.csv", [("ramp.mkv", "no hint", ""), ("ramp.mkv", "stale hint", "500"),
                                               ("ramp.mkv", "right hint", str(RAMP_T))],
                          header=["path", "text", "num_frames"])
    ds = VideoTextDataset(csv_path, num_frames=4, frame_interval=10, image_size=(8, 8))
    for i in range(3):
        for epoch in range(3):
            ds.set_epoch(epoch)
            ids = _frame_ids(ds[i]["video"])
            # span 31 <= 40: exact stride 10, start in [0, 9]
            assert 0 <= round(ids[0]) <= 9
            np.testing.assert_allclose(ids, round(ids[0]) + 10 * np.arange(4), atol=0.5)
    assert ds.num_bad == 0


# ------------------------------------------------------------------------------------------- determinism
def test_determinism_per_seed_epoch_index(ramp):
    def clip(ds, i):
        return _frame_ids(ds[i]["video"]).round().astype(int).tolist()

    a = VideoTextDataset(ramp, num_frames=4, frame_interval=2, image_size=(8, 8), seed=5)
    b = VideoTextDataset(ramp, num_frames=4, frame_interval=2, image_size=(8, 8), seed=5)
    assert [clip(a, i) for i in range(10)] == [clip(b, i) for i in reversed(range(10))][::-1]
    assert clip(a, 3) == clip(a, 3)
    e0 = [clip(a, i) for i in range(10)]
    a.set_epoch(1)
    e1 = [clip(a, i) for i in range(10)]
    assert e0 != e1  # varies across epochs
    a.set_epoch(0)
    assert [clip(a, i) for i in range(10)] == e0  # and comes back
    c = VideoTextDataset(ramp, num_frames=4, frame_interval=2, image_size=(8, 8), seed=6)
    assert [clip(c, i) for i in range(10)] != e0
    assert len({tuple(x) for x in e0}) > 1  # varies across indices

    # a random user transform is reproducible too
    def flip(v):
        return v.flip(-1) if torch.rand(()) < 0.5 else v

    t = VideoTextDataset(ramp, num_frames=2, frame_interval=1, image_size=(8, 8), transform=flip)
    assert torch.equal(t[4]["video"], t[4]["video"])


# --------------------------------------------------------------------------------------------- bad files
def test_bad_files_skipped_with_warning_and_counted(synth):
    csv_path, _ = synth
    ds = VideoTextDataset(csv_path, num_frames=3, frame_interval=1, image_size=(16, 16))
    names = [Path(p).name for p, _, _ in list(csv.reader(open(csv_path)))[13:]]
    for i, name in zip((12, 13, 14), names):
        with pytest.warns(BadSampleWarning, match=name):
            assert ds[i] is None
    assert ds.num_bad == 3 and [Path(p).name for p, _ in ds.bad_files] == names
    assert "FileNotFoundError" in ds.bad_files[2][1]

    good = ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        batch = collate_skip_bad([ds[12], good, ds[13], ds[1]])
    assert batch["video"].shape == (2, 3, 3, 16, 16) and batch["skipped"] == 2
    assert batch["index"].tolist() == [0, 1] and batch["num_frames"] == 3 and len(batch["text"]) == 2
    assert collate_skip_bad([None, None]) is None
    assert count_skipped(None, 4) == 4 and count_skipped(batch, 4) == 2


def test_collate_mixed_t_keeps_majority(synth):
    csv_path, _ = synth
    ds = VideoTextDataset(csv_path, num_frames=3, frame_interval=1, image_size=(16, 16))
    with pytest.warns(RuntimeWarning, match="mixes T"):
        b = collate_skip_bad([ds[8], ds[0], ds[1]])  # one image (T=1) + two videos (T=3)
    assert b["video"].shape[:3] == (2, 3, 3) and b["dropped_mixed"] == 1 and b["skipped"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_loader_pass_counts_bad(synth, num_workers):
    csv_path, _ = synth
    ds = VideoTextDataset(csv_path, num_frames=3, frame_interval=2, image_size=(16, 16))
    bad = {12, 13, 14}
    for drop_last in (False, True):
        dl = make_dataloader(ds, 2, num_workers=num_workers, seed=1, drop_last=drop_last)
        planned = list(ResumableBatchSampler(ds.group_keys(), 2, seed=1, drop_last=drop_last))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadSampleWarning)
            got = list(dl)
        assert len(got) == len(planned) == len(dl)
        skipped = sum(len(p) if b is None else b["skipped"] for p, b in zip(planned, got))
        served_bad = sum(len(bad & set(p)) for p in planned)
        assert skipped == served_bad
        if drop_last:  # full batches: count_skipped is exact
            assert sum(count_skipped(b, 2) for b in got) == served_bad
        else:
            assert served_bad == 3
            seen = sorted(i for b in got if b is not None for i in b["index"].tolist())
            assert seen == list(range(12))  # every good sample served once
        for b in got:
            if b is not None:
                assert b["video"].shape[2] == b["num_frames"] in (1, 3)
    if num_workers == 0:
        assert ds.num_bad >= 3


# ---------------------------------------------------------------------------------------------- resuming
def test_start_index_resume_yields_remaining(ramp):
    ds = VideoTextDataset(ramp, num_frames=2, frame_interval=1, image_size=(8, 8), seed=0)
    ds.set_epoch(3)
    full = [i for b in make_dataloader(ds, 2, seed=7) for i in b["index"].tolist()]
    assert sorted(full) == list(range(10))
    order = ResumableBatchSampler([0] * 10, 2, seed=7, epoch=3).order()
    assert full == order
    for start in (4, 3):  # 2 batches consumed; or any sample count for a single-kind CSV
        dl = make_dataloader(ds, 2, seed=7, start_index=start, drop_last=False)
        rest = [i for b in dl for i in b["index"].tolist()]
        assert rest == full[start:]
        ds.set_epoch(4)  # the next epoch after a resumed one starts at 0 with a new permutation
        nxt = [i for b in dl for i in b["index"].tolist()]
        assert sorted(nxt) == list(range(10)) and nxt != full
        ds.set_epoch(3)
    assert ResumableBatchSampler([0] * 10, 2, seed=7, epoch=4).order() != order
    assert ResumableBatchSampler([0] * 10, 2, shuffle=False).order() == list(range(10))


def test_resume_with_mixed_kinds_skips_batches():
    keys = [16, 1, 16, 16, 1, 1, 16, 16, 1, 16, 16, 16]  # 8 videos, 4 images: all batches full
    s = ResumableBatchSampler(keys, 2, seed=3, epoch=2)
    full = list(s)
    assert all(len({keys[i] for i in b}) == 1 for b in full)
    assert sorted(i for b in full for i in b) == list(range(12))
    assert list(ResumableBatchSampler(keys, 2, seed=3, epoch=2, start_index=4)) == full[2:]
    with pytest.raises(ValueError, match="start_index"):
        ResumableBatchSampler(keys, 2, start_index=3)


# ----------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments_name_the_argument(synth, tmp_path):
    csv_path, _ = synth
    for kw, name in [({"num_frames": 0}, "num_frames"), ({"num_frames": 2.0}, "num_frames"),
                     ({"frame_interval": 0}, "frame_interval"), ({"image_size": (256,)}, "image_size"),
                     ({"image_size": (0, 256)}, "image_size"), ({"image_size": 256}, "image_size"),
                     ({"image_size": (16.5, 16)}, "image_size"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=name):
            VideoTextDataset(csv_path, **kw)
    with pytest.raises(FileNotFoundError, match="csv_path"):
        VideoTextDataset(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="root"):
        VideoTextDataset(csv_path, root=tmp_path / "no_dir")
    notext = _write_csv(tmp_path / "nt.csv", [("a.mp4", "x")], header=["path", "caption_wrong"])
    with pytest.raises(ValueError, match="text"):
        VideoTextDataset(notext)
    onecol = _write_csv(tmp_path / "one.csv", [("a.mp4",)])
    with pytest.raises(ValueError, match="path"):
        VideoTextDataset(onecol)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="csv_path"):
        VideoTextDataset(empty)
    ds = VideoTextDataset(csv_path)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(ds, 0)
    with pytest.raises(ValueError, match="start_index"):
        make_dataloader(ds, 2, start_index=-1)
    with pytest.raises(ValueError, match="num_workers"):
        make_dataloader(ds, 2, num_workers=-1)
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


# ----------------------------------------------------------------------------------------------- buckets
def test_media_size_from_csv_columns_or_headers_and_bucket_items(ramp, tmp_path):
    """media_size: the CSV's num_frames / height / width (Open-Sora 1.2's columns) when all are there, else
    the file's headers; dataset[(i, T, H, W)] decodes sample i at that shape with the clip's frame rate
    (the video's over frame_interval); images are 1 frame at 120 fps."""
    from PIL import Image
    from stdit.train.data import IMAGE_FPS, probe_media

    assert probe_media(ramp.parent / "ramp.mp4") == (RAMP_T, 48, 64, 8.0)
    Image.fromarray(np.zeros((20, 36, 3), np.uint8)).save(tmp_path / "im.png")
    (tmp_path / "ramp.mp4").symlink_to(ramp.parent / "ramp.mp4")
    csv_path = _write_csv(tmp_path / "c.csv", [("ramp.mp4", "a", "40", "480", "640"), ("ramp.mp4", "b", "", "", ""),
                                               ("im.png", "c", "", "", ""), ("missing.mp4", "d", "", "", "")],
                          header=["path", "text", "num_frames", "height", "width"])  # fmt: skip
    assert read_csv(csv_path)[0].height == 480 and read_csv(csv_path)[1].height is None
    ds = VideoTextDataset(csv_path, num_frames=4, frame_interval=3, image_size=(16, 16))
    assert ds.media_size(0) == (40, 480, 640)  # the CSV's word (not probed)
    assert ds.media_size(1) == (RAMP_T, 48, 64) and ds.media_size(2) == (1, 20, 36)
    with pytest.warns(BadSampleWarning, match="leaving out sample 3"):
        assert ds.media_size(3) is None
    item = ds[(1, 6, 32, 48)]
    assert item["video"].shape == (3, 6, 32, 48) and item["fps"] == 8.0 // 3
    ids = _frame_ids(item["video"])
    np.testing.assert_allclose(ids, ids[0] + 3 * np.arange(6), atol=0.5)  # 6 frames every 3rd
    assert ds[1]["video"].shape == (3, 4, 16, 16)  # a plain index keeps the stage's shape
    image = ds[(2, 1, 16, 32)]
    assert image["video"].shape == (3, 1, 16, 32) and image["fps"] == IMAGE_FPS
    batch = collate_skip_bad([ds[(1, 2, 16, 16)], ds[(0, 2, 16, 16)]])
    assert torch.equal(batch["fps"], torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match=r"index: expected an int or \(index, T, H, W\)"):
        ds[(1, 2)]
