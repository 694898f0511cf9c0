"""Quality metrics (stdit.bench.quality) against oracles computed another way: SSIM against a float64
loop over every window position of the definition (always) and against scikit-image's
structural_similarity (when installed); PSNR and the latent metrics against numpy formulas; the
exact cases (identical input: rel-L2 0, PSNR inf, SSIM 1) and bad input."""

import math

import numpy as np
import pytest
import torch

from stdit.bench import quality


def _loop_ssim(a: np.ndarray, b: np.ndarray, R: float) -> float:
    """Wang et al. (2004) written out: for each (frame, channel) and every position where the 11x11
    Gaussian window fits, the weighted means, variances and covariance, then the SSIM formula; the mean
    over positions, then over frames and channels. float64, plain loops."""
    r, sigma = 5, 1.5
    g = np.array([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)])
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
    T, H, W, C = a.shape
    per_plane = []
    for t in range(T):
        for c in range(C):
            vals = []
            for i in range(r, H - r):
                for j in range(r, W - r):
                    pa = a[t, i - r:i + r + 1, j - r:j + r + 1, c].astype(np.float64)
                    pb = b[t, i - r:i + r + 1, j - r:j + r + 1, c].astype(np.float64)
                    ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                    va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                    cov = (w2 * (pa - ma) * (pb - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
            per_plane.append(np.mean(vals))
    return float(np.mean(per_plane))


def _noisy_pair(shape, seed=0, noise=20.0):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, shape).astype(np.uint8)
    smooth = np.cumsum(np.cumsum(rng.normal(size=shape), axis=1), axis=2)  # structure, not just noise
    ref = np.clip((smooth - smooth.min()) / np.ptp(smooth) * 255 * 0.7 + ref * 0.3, 0, 255).astype(np.uint8)
    x = np.clip(ref + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)
    return x, ref


def test_ssim_matches_the_definition_written_as_loops():
    x, ref = _noisy_pair((2, 13, 14, 2))  # 3 x 4 window positions per plane
    assert quality.ssim(x, ref) == pytest.approx(_loop_ssim(x, ref, 255.0), abs=1e-12)
    xf, rf = x / 127.5 - 1.0, ref / 127.5 - 1.0  # the same frames as [-1, 1] floats: range 2
    assert quality.ssim(torch.from_numpy(xf), torch.from_numpy(rf), data_range=2.0) == pytest.approx(
        _loop_ssim(xf, rf, 2.0), abs=1e-12)
    assert quality.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert quality.ssim(x, ref) < 0.99  # the noise shows


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, ref = _noisy_pair((3, 40, 33, 3), seed=1)
    want = np.mean([
        metrics.structural_similarity(x[t], ref[t], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255, channel_axis=-1)
        for t in range(3)
    ])  # fmt: skip
    assert quality.ssim(x, ref) == pytest.approx(want, abs=1e-10)
    assert quality.psnr(x, ref) == pytest.approx(metrics.peak_signal_noise_ratio(ref, x, data_range=255), abs=1e-10)


def test_psnr_and_latent_metrics_against_numpy():
    x, ref = _noisy_pair((2, 16, 16, 3), seed=2)
    mse = np.mean((x.astype(np.float64) - ref) ** 2)
    assert quality.psnr(x, ref) == pytest.approx(10 * np.log10(255.0**2 / mse), abs=1e-10)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 3, 5, 5, generator=g)
    other = lat + 0.05 * torch.randn(lat.shape, generator=g)
    a, b = other.double().numpy(), lat.double().numpy()
    got = quality.compare_latents(other, lat)
    assert got["latent_rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)
    rng = b.max() - b.min()
    assert got["latent_psnr"] == pytest.approx(10 * np.log10(rng**2 / np.mean((a - b) ** 2)), rel=1e-12)


def test_identical_inputs_are_exact():
    lat = torch.randn(1, 4, 2, 3, 3)
    assert quality.compare_latents(lat.clone(), lat) == {"latent_rel_l2": 0.0, "latent_psnr": math.inf}
    frames = np.random.default_rng(3).integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
    out = quality.compare_frames(frames, frames.copy(), lpips="n/a: test")
    assert out["frame_psnr"] == math.inf and out["frame_ssim"] == pytest.approx(1.0) and out["lpips"] == "n/a: test"


def test_video_frames_round_like_a_written_sample():
    video = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    frames = quality.video_frames(video)
    assert frames.shape == (5, 1, 1, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 64, 128, 255, 255]  # 63.75 -> 64, 127.5 -> 128 (round half even: 128)


def test_bad_input_is_refused():
    x = np.zeros((2, 12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="data_range"):
        quality.ssim(x.astype(np.float32), x.astype(np.float32))
    with pytest.raises(ValueError, match="data_range"):
        quality.psnr(x, x, data_range=0)
    with pytest.raises(ValueError, match="window"):
        quality.ssim(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        quality.psnr(x, x[:1])
    with pytest.raises(ValueError, match="frames"):
        quality.ssim(np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8))
    with pytest.raises(TypeError, match="x: expected a tensor"):
        quality.rel_l2([1.0], [1.0])
    with pytest.raises(ValueError, match="constant"):
        quality.latent_psnr(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="video"):
        quality.video_frames(torch.zeros(3, 2, 4, 4))


def test_lpips_is_never_downloaded(tmp_path):
    got = quality.LPIPSMetric.load(hub_dir=tmp_path)  # an empty hub folder: no weights here
    assert isinstance(got, str) and got.startswith("n/a: weights not available")
