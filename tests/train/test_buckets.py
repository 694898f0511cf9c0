"""Open-Sora 1.2-style buckets: the config table, assigning samples, and the batch sampler (determinism,
resume, no mixed shapes, per-bucket batch sizes, data-parallel sharding); a bucketed cache."""

import warnings
from collections import Counter

import pytest

from stdit.train.buckets import ASPECT_RATIOS, RESOLUTIONS, Bucket, BucketBatchSampler, BucketConfig, bucket_hw

TABLE = {
    "64px": {"1": [1.0, 4], "16": [[1.0, 0.5], 2], "8": [1.0, 3]},
    "32px": {"1": [1.0, 8], "8": [1.0, 6], "4": [1.0, 5]},
}


def test_bucket_shapes_have_the_area_and_ratio_in_multiples_of_16():
    for res, area in RESOLUTIONS.items():
        for ar in ASPECT_RATIOS:
            h, w = bucket_hw(area, ar)
            assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
            if area >= 144 * 256:  # large enough that rounding to 16 is a small change
                assert abs(h * w / area - 1) < 0.12 and abs(h / w / ar - 1) < 0.12, (res, ar, h, w)
    assert bucket_hw(240 * 426, 0.56) == (240, 432) and bucket_hw(64 * 64, 1.0) == (64, 64)
    assert bucket_hw(256 * 256, 0.5) == (176, 368)  # sqrt(65536 * 0.5) = 181 -> 176; 362 -> 368


def test_assignment_follows_open_sora_rules():
    cfg = BucketConfig(TABLE, aspect_ratios=[0.5, 1.0, 2.0])
    a = lambda T, H, W, fi=1, i=0: cfg.assign(T, H, W, frame_interval=fi, seed=0, index=i)
    # an image goes to the largest resolution it covers (area >= 0.8 x the bucket's) with a frames-1 entry
    assert a(1, 64, 64) == Bucket("64px", 1, 1.0, 64, 64)
    assert a(1, 58, 58) == Bucket("64px", 1, 1.0, 64, 64)  # 3364 >= 0.8 * 4096
    assert a(1, 57, 57) == Bucket("32px", 1, 1.0, 32, 32)  # 3249 < 3277
    assert a(1, 20, 20) is None  # smaller than every resolution
    # a video takes the largest frame count whose clip fits ((t - 1) * interval + 1 <= T), never the image bucket
    assert a(8, 64, 64) == Bucket("64px", 8, 1.0, 64, 64)
    assert a(7, 64, 64) == Bucket("32px", 4, 1.0, 32, 32)  # 64px has nothing under 8 frames: next resolution
    assert a(15, 64, 64, fi=2) == Bucket("64px", 8, 1.0, 64, 64)  # 7 * 2 + 1 = 15 fits
    assert a(14, 64, 64, fi=2) == Bucket("32px", 4, 1.0, 32, 32)  # 64px has no 4-frame entry: next resolution
    assert a(3, 64, 64) is None  # too short for any video bucket
    # the closest aspect ratio (H / W) of the set
    assert a(1, 64, 128).aspect_ratio == 0.5 and a(1, 64, 128).shape == (1, 48, 96)
    assert a(1, 100, 64).aspect_ratio == 2.0 and a(1, 80, 64).aspect_ratio == 1.0  # 1.25 is closer to 1 than to 2
    # [p_resolution, p_frames]: a failed frames draw tries the next smaller frame count at that resolution
    got = Counter(a(16, 64, 64, i=i).num_frames for i in range(2000))
    assert set(got) == {16, 8} and abs(got[16] / 2000 - 0.5) < 0.05


def test_keep_probability_moves_samples_to_smaller_resolutions():
    cfg = BucketConfig({"64px": {"1": [0.3, 4]}, "32px": {"1": [1.0, 8]}}, aspect_ratios=[1.0])
    got = Counter(cfg.assign(1, 64, 64, seed=5, index=i).resolution for i in range(3000))
    assert abs(got["64px"] / 3000 - 0.3) < 0.03 and got["32px"] == 3000 - got["64px"]
    # a function of (seed, epoch, index): the same again, and a different epoch redraws
    first = [cfg.assign(1, 64, 64, seed=5, epoch=0, index=i) for i in range(200)]
    assert first == [cfg.assign(1, 64, 64, seed=5, epoch=0, index=i) for i in range(200)]
    assert first != [cfg.assign(1, 64, 64, seed=5, epoch=1, index=i) for i in range(200)]
    nothing = BucketConfig({"64px": {"1": [0.0, 4]}}, aspect_ratios=[1.0])
    assert all(nothing.assign(1, 64, 64, index=i) is None for i in range(50))


def test_bad_tables_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown resolution '77p'; expected some of \['32px'"):
        BucketConfig({"77p": {"1": [1.0, 2]}})
    with pytest.raises(ValueError, match=r"frame count 'x' must be a positive int"):
        BucketConfig({"64px": {"x": [1.0, 2]}})
    with pytest.raises(ValueError, match=r"'64px' frames 4 must be \[keep_prob, batch_size\]"):
        BucketConfig({"64px": {"4": 1.0}})
    with pytest.raises(ValueError, match=r"'64px' frames 4 keep probability must be a number in \[0, 1\], got 1.5"):
        BucketConfig({"64px": {"4": [1.5, 2]}})
    with pytest.raises(ValueError, match=r"'64px' frames 4 batch size must be an int >= 1, got 0"):
        BucketConfig({"64px": {"4": [1.0, 0]}})
    with pytest.raises(ValueError, match=r"'64px' frames 1 keep must be a probability"):
        BucketConfig({"64px": {"1": [[1.0, 0.5], 2]}})
    with pytest.raises(ValueError, match=r"aspect_ratios: expected positive H/W values"):
        BucketConfig(TABLE, aspect_ratios=[0.0])
    with pytest.raises(ValueError, match=r"buckets: expected a table"):
        BucketConfig({})


def _sampler_setup(n=120, seed=3, world=1, rank=0, start_step=0):
    """A synthetic population of sizes; assignment per epoch as BatchSource does it."""
    cfg = BucketConfig(TABLE, aspect_ratios=[0.5, 1.0, 2.0])
    sizes = [((1, 8, 16, 7)[i % 4], (64, 40, 72, 32)[i % 3], (64, 64, 36)[i % 5 % 3]) for i in range(n)]
    assign = lambda epoch: [cfg.assign(*s, seed=seed, epoch=epoch, index=i) for i, s in enumerate(sizes)]
    epoch = {"e": 0}
    sampler = BucketBatchSampler(assign, cfg.batch_size, seed=seed, start_step=start_step, rank=rank, world=world,
                                 epoch_source=lambda: epoch["e"], item=lambda i, b: (i, b))  # fmt: skip
    return cfg, assign, sampler, epoch


def test_batches_never_mix_shapes_and_use_their_bucket_batch_size():
    cfg, assign, sampler, _ = _sampler_setup()
    buckets = assign(0)
    batches = list(sampler)
    assert len(batches) == sampler.steps(0) > 5 and len({b[0][1] for b in batches}) >= 3  # several shapes
    seen = []
    for batch in batches:
        keys = {b for _, b in batch}
        assert len(keys) == 1  # one bucket, so one shape
        (key,) = keys
        assert len(batch) == cfg.batch_size(key) and all(buckets[i] == key for i, _ in batch)
        seen += [i for i, _ in batch]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    # every bucket loses at most batch_size - 1 samples to the incomplete rest
    per_bucket = Counter(b for b in buckets if b is not None)
    used = Counter(buckets[i] for i in seen)
    assert all(0 <= per_bucket[k] - used[k] < cfg.batch_size(k) for k in per_bucket)


def test_order_is_a_function_of_seed_and_epoch():
    _, _, a, ea = _sampler_setup()
    _, _, b, eb = _sampler_setup()
    _, _, c, _ = _sampler_setup(seed=4)
    first = list(a)
    assert first == list(b) and first != list(c)
    ea["e"] = eb["e"] = 1
    second = list(a)
    assert second == list(b) and second != first


def test_resume_mid_epoch_serves_exactly_the_rest():
    _, _, full, epoch = _sampler_setup()
    epoch["e"] = 2
    everything = list(full)
    for k in (0, 1, 5, len(everything) - 1, len(everything)):
        _, _, resumed, e2 = _sampler_setup(start_step=k)
        e2["e"] = 2
        assert len(resumed) == len(everything) - k
        assert list(resumed) == everything[k:]
        assert list(resumed) == everything  # the next pass (epoch) starts from the beginning


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_shards_are_disjoint_and_complete(world):
    _, _, single, _ = _sampler_setup()
    global_batches = single.batches(0)
    per_rank = [list(_sampler_setup(world=world, rank=r)[2]) for r in range(world)]
    steps = len(global_batches) // world
    assert all(len(p) == steps for p in per_rank)  # every rank takes the same number of steps
    for s in range(steps):  # step s: rank r trains global batch s * world + r
        for r in range(world):
            key, indices = global_batches[s * world + r]
            assert per_rank[r][s] == [(i, key) for i in indices]
    samples = [i for p in per_rank for batch in p for i, _ in batch]
    assert len(samples) == len(set(samples))  # disjoint
    expected = {i for _, idx in global_batches[: steps * world] for i in idx}
    assert set(samples) == expected  # complete: nothing of the epoch's usable batches is left out
    resumed = [list(_sampler_setup(world=world, rank=r, start_step=2)[2]) for r in range(world)]
    assert resumed == [p[2:] for p in per_rank]


def test_sampler_argument_errors():
    cfg = BucketConfig(TABLE)
    with pytest.raises(ValueError, match=r"rank: expected 0 <= rank < world = 2, got 2"):
        BucketBatchSampler(lambda e: [], cfg.batch_size, rank=2, world=2)
    with pytest.raises(ValueError, match=r"start_step: expected an int >= 0"):
        BucketBatchSampler(lambda e: [], cfg.batch_size, start_step=-1)


def test_bucketed_cache_holds_one_bucket_per_shard(tmp_path):
    """prepare_stage with [data.buckets] encodes each sample at its bucket (the draws of epoch 0), bucket by
    bucket; the cache serves the buckets back and a stage with other buckets refuses it."""
    import torch
    from stdit.train.build import build_encoders
    from stdit.train.config import ConfigError, from_dict
    from stdit.train.prepare import (
        CachedLatentDataset,
        check_cache_matches,
        prepare_stage,
    )
    from stdit.train.synthetic import make_synthetic_dataset

    csv = make_synthetic_dataset(tmp_path / "d", num_videos=4, num_images=3, frames=9, size=(32, 48), seed=2, corrupt=1)
    raw = {"data": {"csv": str(csv), "frame_interval": 2, "buckets": {"32px": {"1": [1.0, 2], "4": [[1.0, 0.5], 2],
                                                                              "2": [1.0, 2]}}},
           "encoders": {"model_max_length": 8}, "run": {"out_dir": str(tmp_path / "o"), "seed": 1}}  # fmt: skip
    cfg = from_dict(raw)
    vae, text = build_encoders(cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_stage(cfg, tmp_path / "cache", vae, text, shard_size=64, progress=False)
    ds = CachedLatentDataset(tmp_path / "cache")
    assert len(ds) == 7 and ds.num_skipped == 1
    config = BucketConfig(raw["data"]["buckets"])
    want = {}
    from stdit.train.data import VideoTextDataset

    source = VideoTextDataset(csv, frame_interval=2)
    for i in range(len(source)):
        size = source.media_size(i) if i < 7 else None
        if size:
            want[source.samples[i].path] = config.assign(*size, frame_interval=2, seed=1, epoch=0, index=i)
    got = {ds[i]["path"]: ds.bucket(i) for i in range(len(ds))}
    assert got == want and len(set(got.values())) >= 2
    for i in range(len(ds)):  # latents at the bucket's shape; video fps over the frame interval, images 120
        b, item = ds.bucket(i), ds[i]
        assert tuple(item["latents"].shape[1:]) == (b.num_frames, b.height // 8, b.width // 8)
        assert item["fps"] == (120.0 if b.num_frames == 1 else 4.0)  # synthetic videos are 8 fps, interval 2
    assert all(len({ds.bucket(i) for i in range(s["first"], s["first"] + s["count"])}) == 1 for s in ds.shards)
    check_cache_matches(cfg, tmp_path / "cache", vae, text)
    other = from_dict({**raw, "data": {**raw["data"], "buckets": {"32px": {"1": [1.0, 2]}}}})
    with pytest.raises(ValueError, match=r"prepared from other data or encoders: buckets"):
        check_cache_matches(other, tmp_path / "cache", vae, text)
    with pytest.raises(ConfigError, match=r"\[data.buckets\] need a model that takes any input size"):
        from stdit.train.build import build_model

        build_model(from_dict({**raw, "model": {"preset": "STDiT-mini"}}), 8, torch.device("cpu"))
