"""Frozen encoders: tiny random VAE / T5 built in code, offline reload from save_pretrained folders."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from stdit.train.encoders import OPEN_SORA_SCALING_FACTOR, TextEncoder, VideoVAE, word_vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.tiny(seed=0)


@pytest.fixture(scope="module")
def t5():
    return TextEncoder.tiny(seed=0, d_model=32, model_max_length=16)


# |latents of frames encoded in batches of different sizes|: measured 0 to 1.5e-7 (max |latent| 0.12;
# convolutions may round differently per batch size); 10x that
BATCHING_ATOL = 1.5e-6


def _video(B=2, T=3, H=32, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------- VAE


def test_vae_frozen_eval(vae):
    assert not vae.training and not vae.vae.training
    assert all(not p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.vae.training
    assert vae.scaling_factor == OPEN_SORA_SCALING_FACTOR and vae.downsample == 8


def test_vae_latent_shape_and_scaling(vae):
    x = _video()
    z = vae.encode(x, sample=False)
    assert z.shape == (2, 4, 3, 4, 6)
    assert not z.requires_grad
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 3, 32, 48)
    with torch.no_grad():
        raw = vae.vae.encode(frames).latent_dist.mode()
    ref = (raw * 0.18215).reshape(2, 3, 4, 4, 6).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(z, ref, rtol=0, atol=BATCHING_ATOL)  # micro-batches of 4 frames vs all 6


def test_vae_micro_batch_matches_one_batch(vae):
    x = _video(B=2, T=5)
    one = VideoVAE(vae.vae, micro_batch_size=64).encode(x, sample=False)
    for mb in (1, 3):
        got = VideoVAE(vae.vae, micro_batch_size=mb).encode(x, sample=False)
        torch.testing.assert_close(got, one, rtol=0, atol=BATCHING_ATOL)


def test_vae_sampling_deterministic_with_generator(vae):
    x = _video()
    a = vae.encode(x, generator=torch.Generator().manual_seed(3))
    b = vae.encode(x, generator=torch.Generator().manual_seed(3))
    c = vae.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_decode_round_trip_shape(vae):
    x = _video(B=1, T=2)
    z = vae.encode(x, sample=False)
    y = vae.decode(z)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1


def test_vae_shape_errors(vae):
    with pytest.raises(ValueError, match="videos"):
        vae.encode(torch.zeros(3, 2, 16, 16))
    with pytest.raises(ValueError, match="videos"):
        vae.encode(torch.zeros(1, 3, 2, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))


def test_vae_from_pretrained_offline(vae, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae.save_pretrained(tmp_path / "vae")
    loaded = VideoVAE.from_pretrained(tmp_path / "vae", dtype=torch.float32, device="cpu")
    x = _video(B=1, T=2)
    assert torch.equal(loaded.encode(x, sample=False), vae.encode(x, sample=False))  # same weights, same math
    assert all(not p.requires_grad for p in loaded.parameters())


def test_vae_missing_dir_guidance(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sd-vae-ft-ema.*config\.json.*diffusion_pytorch_model\.safetensors"):
        VideoVAE.from_pretrained(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing weights"):
        VideoVAE.from_pretrained(tmp_path / "half")


# ------------------------------------------------------------------------------------------------- T5


def test_t5_shapes_and_mask(t5):
    caps = ["a cat", "", "héllo", None]
    y, mask = t5.encode(caps)
    assert y.shape == (4, 1, 16, 32) and mask.shape == (4, 16) and mask.dtype == torch.int64
    lens = [len("a cat".encode()) + 1, 1, len("héllo".encode()) + 1, 1]  # bytes + EOS
    assert mask.sum(1).tolist() == lens
    for row, n in zip(mask, lens):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert torch.isfinite(y).all()
    assert not t5.training and all(not p.requires_grad for p in t5.parameters())


def test_t5_truncation_and_determinism(t5):
    long = "x" * 100
    ids, mask = t5.tokenize([long])
    assert mask.sum().item() == 16 and ids[0, -1].item() == t5.tokenizer.eos_token_id
    y1, _ = t5.encode([long, "b"])
    y2, _ = t5.encode([long, "b"])
    assert torch.equal(y1, y2)
    # an independent tiny model with the same seed is the same model
    y3, _ = TextEncoder.tiny(seed=0, d_model=32, model_max_length=16).encode([long, "b"])
    assert torch.equal(y1, y3)


def test_t5_default_length_is_120():
    te = TextEncoder.tiny(seed=1, d_model=16)
    y, mask = te.encode(["hello"])
    assert y.shape == (1, 1, 120, 16) and mask.shape == (1, 120)


def test_t5_caption_errors(t5):
    with pytest.raises(TypeError, match="captions"):
        t5.encode("a single string")
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        t5.encode(["ok", 3])


def test_t5_from_pretrained_offline(t5, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t5.save_pretrained(tmp_path / "t5")
    loaded = TextEncoder.from_pretrained(tmp_path / "t5", model_max_length=16, dtype=torch.float32, device="cpu")
    caps = ["a red ball", ""]
    y1, m1 = t5.encode(caps)
    y2, m2 = loaded.encode(caps)
    assert torch.equal(y2, y1) and torch.equal(m1, m2)


def test_t5_missing_dir_guidance(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t5-v1_1-xxl.*config\.json.*spiece\.model"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    d = tmp_path / "half"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing tokenizer"):
        TextEncoder.from_pretrained(d)


def test_tiny_word_tokenizer(tmp_path, monkeypatch):
    """tokenizer="words": one id per word of the synthetic captions (case and punctuation ignored), unknown
    words -> <unk>, EOS appended, padded like any tokenizer; saved and reloaded offline it encodes the same."""
    from stdit.train.synthetic import COLORS, MOTIONS, SHAPES

    vocab = word_vocabulary()
    assert vocab[:3] == ["<pad>", "</s>", "<unk>"] and len(set(vocab)) == len(vocab)
    assert {"red", "circle", "left", "background", "dark"} <= set(vocab)
    assert all(w in vocab for group in (COLORS, SHAPES, MOTIONS) for phrase in group for w in phrase.split())
    from stdit.train.synthetic import make_synthetic_dataset

    for voc in ("full", "simple"):  # every word the generator writes has an id (none falls to <unk>)
        csv_path = make_synthetic_dataset(tmp_path / voc, num_videos=0, num_images=30, size=(16, 16), vocabulary=voc)
        words = {w for line in csv_path.read_text().splitlines()[1:] for w in line.split(",")[1].split()}
        assert words <= set(vocab), words - set(vocab)
    te = TextEncoder.tiny(seed=0, model_max_length=12, tokenizer="words")
    assert "words" in te.describe()["name"]
    ids, mask = te.tokenize(["a red circle moving left to right", "A RED, circle!", "a zebra", ""])
    idx = {w: i for i, w in enumerate(vocab)}
    a, red, circle = idx["a"], idx["red"], idx["circle"]
    assert ids[0, :8].tolist() == [a, red, circle, idx["moving"], idx["left"], idx["to"], idx["right"], 1]
    assert ids[1, :4].tolist() == [a, red, circle, 1]  # case and punctuation ignored
    assert ids[2, :3].tolist() == [a, 2, 1]
    assert mask.sum(1).tolist() == [8, 4, 3, 1] and ids[3, 0].item() == 1
    y, m = te.encode(["a red circle", "a green circle"])
    assert y.shape == (2, 1, 12, 32) and not torch.equal(y[0], y[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    te.save_pretrained(tmp_path / "w")
    loaded = TextEncoder.from_pretrained(tmp_path / "w", model_max_length=12, device="cpu")
    y2, m2 = loaded.encode(["a red circle", "a green circle"])
    assert torch.equal(y2, y) and torch.equal(m, m2)
    with pytest.raises(ValueError, match="tokenizer: expected one of"):
        TextEncoder.tiny(tokenizer="chars")
