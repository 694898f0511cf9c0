"""prepare_dataset -> shards + index.json -> CachedLatentDataset; resume after an interruption."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from stdit.common.files import temp_name  # noqa: E402
from stdit.train.encoders import TextEncoder, VideoVAE  # noqa: E402
from stdit.train.prepare import CachedLatentDataset, prepare_dataset, shard_name  # noqa: E402

L = 12
# |cached - directly encoded| latents: measured 0 to 1.5e-7 (max |latent| 0.12) when the same frames go
# through the tiny VAE in batches of other sizes; 10x that
BATCHING_ATOL = 1.5e-6


@pytest.fixture(scope="module")
def encoders():
    return VideoVAE.tiny(seed=0), TextEncoder.tiny(seed=0, d_model=16, model_max_length=L)


def _samples(n=5, T=2, H=16, W=16, bad=(2,), image_at=()):
    """n valid samples (+ a None after each index in ``bad``); ``image_at`` samples have T=1."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        t = 1 if i in image_at else T
        video = torch.rand(3, t, H, W, generator=g) * 2 - 1
        out.append({"video": video, "text": f"caption {i}", "path": f"/v/{i}.mp4"})
        if i in bad:
            out.append(None)
    return out


def test_prepare_and_load(encoders, tmp_path):
    vae, te = encoders
    samples = _samples(5)
    index_path = prepare_dataset(
        samples, tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False, sample_posterior=False
    )
    index = json.loads(index_path.read_text())
    assert index["num_samples"] == 5 and index["num_skipped"] == 1 and index["num_shards"] == 3
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]
    assert index["shards"][0]["latent_shape"] == [4, 2, 2, 2] and index["shards"][0]["y_shape"] == [1, L, 16]
    assert index["y_dtype"] == "bfloat16" and index["encoders"]["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", *(shard_name(k) for k in range(3))]

    ds = CachedLatentDataset(tmp_path)
    assert len(ds) == 5 and ds.num_skipped == 1
    valid = [s for s in samples if s is not None]
    direct = vae.encode(torch.stack([s["video"] for s in valid]), sample=False)
    y_direct, m_direct = te.encode([s["text"] for s in valid])
    for i, s in enumerate(valid):
        item = ds[i]
        assert item["path"] == s["path"] and item["text"] == s["text"]
        assert item["latents"].shape == (4, 2, 2, 2) and item["y"].shape == (1, L, 16)
        assert item["mask"].shape == (L,)
        # encoded in other batches than `direct` (convolutions may round differently per batch size)
        torch.testing.assert_close(item["latents"], direct[i], rtol=0, atol=BATCHING_ATOL)
        torch.testing.assert_close(item["y"], y_direct[i].to(torch.bfloat16).float())  # stored in bf16
        assert torch.equal(item["mask"], m_direct[i])
    assert ds[-1]["path"] == valid[-1]["path"]
    with pytest.raises(IndexError):
        ds[5]
    assert CachedLatentDataset(tmp_path, dtype=torch.bfloat16)[0]["latents"].dtype == torch.bfloat16


def test_dataset_pickles_and_batches(encoders, tmp_path):
    import pickle

    vae, te = encoders
    prepare_dataset(_samples(3, bad=()), tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)
    ds = CachedLatentDataset(tmp_path)
    ds[0]  # opens a handle
    clone = pickle.loads(pickle.dumps(ds))  # as DataLoader workers under spawn do
    assert torch.equal(clone[2]["latents"], ds[2]["latents"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["latents"].shape == (2, 4, 2, 2, 2) and batch["mask"].shape == (2, L) and len(batch["text"]) == 2


def test_shape_change_starts_new_shard(encoders, tmp_path):
    vae, te = encoders
    samples = _samples(4, bad=(), image_at=(2,))  # T = 2, 2, 1, 2
    prepare_dataset(samples, tmp_path, vae=vae, text_encoder=te, shard_size=4, progress=True)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [2, 1, 1]
    assert [s["latent_shape"][1] for s in index["shards"]] == [2, 1, 2]
    ds = CachedLatentDataset(tmp_path)
    assert [ds[i]["latents"].shape[1] for i in range(4)] == [2, 2, 1, 2]


def test_resume_after_interruption(encoders, tmp_path, monkeypatch):
    vae, te = encoders
    samples = _samples(5)
    prepare_dataset(samples, tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)
    ref = CachedLatentDataset(tmp_path)
    ref_latents = [ref[i]["latents"] for i in range(len(ref))]
    del ref

    # simulate an interruption: shard 1 never renamed into place (left under its temporary name), no
    # index.json yet
    leftover = temp_name(tmp_path / shard_name(1))
    (tmp_path / shard_name(1)).rename(leftover)
    (tmp_path / "index.json").unlink()
    mtime0 = (tmp_path / shard_name(0)).stat().st_mtime_ns
    with pytest.raises(FileNotFoundError, match="index.json"):
        CachedLatentDataset(tmp_path)

    calls = []
    orig = VideoVAE.encode

    def counting(self, videos, **kw):
        calls.append(videos.shape[0])
        return orig(self, videos, **kw)

    monkeypatch.setattr(VideoVAE, "encode", counting)
    prepare_dataset(samples, tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)
    assert calls == [2]  # only shard 1 was encoded again
    assert (tmp_path / shard_name(0)).stat().st_mtime_ns == mtime0  # complete shard reused
    assert not leftover.exists() and not list(tmp_path.glob(".*"))
    ds = CachedLatentDataset(tmp_path)
    assert len(ds) == 5 and ds.num_skipped == 1
    for i in range(5):  # per-shard posterior seeds: identical to the uninterrupted run
        assert torch.equal(ds[i]["latents"], ref_latents[i])


def test_resume_with_changed_stream_errors(encoders, tmp_path):
    vae, te = encoders
    samples = _samples(4, bad=())
    prepare_dataset(samples, tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)
    samples[1]["path"] = "/v/other.mp4"
    with pytest.raises(RuntimeError, match="other samples"):
        prepare_dataset(samples, tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)


def test_missing_or_corrupt_shard_is_named(encoders, tmp_path):
    vae, te = encoders
    prepare_dataset(_samples(4, bad=()), tmp_path, vae=vae, text_encoder=te, shard_size=2, progress=False)
    (tmp_path / shard_name(1)).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=shard_name(1)):
        CachedLatentDataset(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match=shard_name(1)):
        CachedLatentDataset(tmp_path)
    ds = CachedLatentDataset(tmp_path, validate=False)  # lazily: fails when the shard is needed
    ds[0]
    with pytest.raises(FileNotFoundError, match=shard_name(1)):
        ds[2]
    (tmp_path / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="index.json"):
        CachedLatentDataset(tmp_path)


def test_bad_video_shape_named(encoders, tmp_path):
    vae, te = encoders
    with pytest.raises(ValueError, match="video"):
        prepare_dataset([{"video": torch.zeros(2, 16, 16), "text": "", "path": "x"}], tmp_path,
                        vae=vae, text_encoder=te, progress=False)
