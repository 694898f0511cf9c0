"""Quality of an accelerated sample against the plain one: latents and decoded frames.

An acceleration is judged by how far its output moves from the output of the same prompt and seed
sampled without it (PAB's and TeaCache's protocol):

- latents (B, C, T, H, W): the relative L2 error ||x - ref|| / ||ref|| and the PSNR over the
  reference's range (max - min of ref);
- frames (T, H, W, C), uint8 or floats with a stated data range (e.g. 2.0 for [-1, 1]): PSNR over the
  whole clip, and SSIM as Wang et al. (2004) define it: an 11x11 Gaussian window of sigma 1.5
  (truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population (not sample) statistics, the SSIM map
  averaged over the positions where the window fits, per channel and frame, then over channels and
  frames (scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1)`` per frame, averaged; tests/bench/test_quality.py
  checks it against that and against a direct loop). Written here in torch: no maintained SSIM library
  is among our dependencies and the GPU image has no network to fetch one.
- LPIPS (AlexNet) only when the ``lpips`` package and torchvision's AlexNet weights are already on
  this machine (torch hub's checkpoint folder): nothing is downloaded. ``LPIPSMetric.load()`` says
  why not otherwise, once.

Identical inputs give rel-L2 0 and PSNR inf. Everything is computed in float64 on the CPU.

Dimension alphabet: B batch, C channels, T frames, H, W height and width.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LPIPSMetric", "SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "compare_frames", "compare_latents", "gaussian_window",
    "latent_psnr", "psnr", "rel_l2", "ssim", "video_frames",
]  # fmt: skip

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: the 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03
LPIPS_UNAVAILABLE = "n/a: weights not available"


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or numpy array, got {type(x).__name__}")
    return x.detach().to("cpu", torch.float64)


def _pair(x, ref, names=("x", "ref")) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_float64(x, names[0]), _as_float64(ref, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]}: shape {tuple(a.shape)} does not match {names[1]} {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{names[0]}: empty tensor")
    return a, b


def _data_range(x, data_range: float | None) -> float:
    """The stated range, or 255 for uint8 input; floats need it stated."""
    if data_range is None:
        if (isinstance(x, torch.Tensor) and x.dtype == torch.uint8) or (isinstance(x, np.ndarray) and x.dtype == np.uint8):
            return 255.0
        raise ValueError("data_range: floats need their range stated (e.g. 2.0 for [-1, 1], 1.0 for [0, 1]); "
                         "uint8 input defaults to 255")  # fmt: skip
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range: expected a positive number, got {data_range!r}")
    return float(data_range)


# ------------------------------------------------------------------------------------------------
# Latents
# ------------------------------------------------------------------------------------------------


def rel_l2(x, ref) -> float:
    """||x - ref||_2 / ||ref||_2 over all elements (0 when equal; inf when ref is 0 and x is not)."""
    a, b = _pair(x, ref)
    num, den = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def psnr(x, ref, *, data_range: float | None = None) -> float:
    """10 log10(data_range^2 / MSE) in dB over all elements; inf when x equals ref."""
    R = _data_range(x, data_range)
    a, b = _pair(x, ref)
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0.0 else 10.0 * math.log10(R * R / mse)


def latent_psnr(x, ref) -> float:
    """PSNR of latents over the reference latents' range (max - min of ref)."""
    b = _as_float64(ref, "ref")
    R = (b.max() - b.min()).item() if b.numel() else 0.0
    if not R > 0:
        raise ValueError("ref: constant latents have no range to compute a PSNR over")
    return psnr(x, ref, data_range=R)


def compare_latents(x, ref) -> dict:
    """{"latent_rel_l2", "latent_psnr"} of latents x against the reference latents ref (same shape)."""
    return {"latent_rel_l2": rel_l2(x, ref), "latent_psnr": latent_psnr(x, ref)}


# ------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------


def video_frames(video: torch.Tensor) -> np.ndarray:
    """A decoded video (1, 3, T, H, W) in [-1, 1] -> frames (T, H, W, 3) uint8, as a written sample
    stores them (stdit.train.sample)."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video: expected a (1, 3, T, H, W) tensor in [-1, 1], got {got}")
    frames = (video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5
    return frames.round().to(torch.uint8).cpu().numpy()


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """The normalised 1-D Gaussian (2r + 1,), r = int(truncate * sigma + 0.5), float64 (scipy's
    gaussian_filter kernel); the 2-D window is its outer product with itself."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _as_frames(x, name: str) -> torch.Tensor:
    """(T, H, W, C) or (H, W, C) -> (T*C, 1, H, W) float64 planes."""
    t = _as_float64(x, name)
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"{name}: expected frames (T, H, W, C) or one frame (H, W, C), got shape {tuple(t.shape)}")
    T, H, W, C = t.shape
    return t.permute(0, 3, 1, 2).reshape(T * C, 1, H, W)


def ssim(frames, ref, *, data_range: float | None = None) -> float:
    """Mean SSIM of frames (T, H, W, C) (or one frame (H, W, C)) against ref of the same shape: per
    frame and channel, the SSIM map where the 11x11 window fits, averaged, then the mean over frames and
    channels (see the module docstring). uint8 input has data_range 255; floats need it stated."""
    R = _data_range(frames, data_range)
    a, b = _as_frames(frames, "frames"), _as_frames(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"frames: {tuple(a.shape)} planes (T*C, 1, H, W) do not match ref's {tuple(b.shape)}")
    w = gaussian_window()
    if min(a.shape[-2:]) < w.numel():
        raise ValueError(f"frames: SSIM's {w.numel()}x{w.numel()} window needs frames of at least that size, got "
                         f"{tuple(a.shape[-2:])}")  # fmt: skip

    def blur(img: torch.Tensor) -> torch.Tensor:  # separable valid filtering: (N, 1, H, W) -> (N, 1, H-2r, W-2r)
        return F.conv2d(F.conv2d(img, w.view(1, 1, 1, -1)), w.view(1, 1, -1, 1))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * R) ** 2, (SSIM_K2 * R) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()  # every plane has the same number of positions: the mean of the per-plane means


class LPIPSMetric:
    """LPIPS (AlexNet, v0.1) from the ``lpips`` package with torchvision's AlexNet weights read from torch
    hub's checkpoint folder; never downloads. ``load()`` returns the metric or a reason string."""

    ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, as torch hub caches them

    def __init__(self, net):
        self.net = net

    @classmethod
    def load(cls, hub_dir: str | Path | None = None) -> LPIPSMetric | str:
        """The metric, or why not ("n/a: ...") when the package or its weights are not on this machine."""
        try:
            import lpips
            import torchvision  # noqa: F401 - lpips builds its backbone from torchvision
        except ImportError as e:
            return f"{LPIPS_UNAVAILABLE} (the lpips package is not installed: {e.name})"
        hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
        backbone = hub / "checkpoints" / cls.ALEXNET_FILE
        if not backbone.is_file():
            return f"{LPIPS_UNAVAILABLE} (no {backbone}; nothing is downloaded)"
        # pnet_rand: build the backbone without asking torchvision to download it, then load the local file
        # into its convolutions (lpips keeps torchvision's feature layers, in order); the linear heads ship
        # inside the lpips package.
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]
        keys = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("features.")}, key=lambda k: int(k.split(".")[1]))
        if len(keys) != len(convs):
            return f"{LPIPS_UNAVAILABLE} ({backbone} has {len(keys)} conv layers, lpips' AlexNet {len(convs)})"
        with torch.no_grad():
            for conv, k in zip(convs, keys):
                conv.weight.copy_(state[f"{k}.weight"])
                conv.bias.copy_(state[f"{k}.bias"])
        return cls(net.eval())

    @torch.no_grad()
    def __call__(self, frames, ref) -> float:
        """Mean LPIPS over frames (T, H, W, 3) uint8 against ref."""
        def planes(x, name):  # -> (T, 3, H, W) in [-1, 1]
            t = _as_float64(x, name)
            return (t.permute(0, 3, 1, 2) / 127.5 - 1.0).float()

        a, b = planes(frames, "frames"), planes(ref, "ref")
        return self.net(a, b).mean().item()


def compare_frames(frames, ref, *, data_range: float | None = None, lpips: LPIPSMetric | str | None = None) -> dict:
    """{"frame_psnr", "frame_ssim", "lpips"} of frames (T, H, W, C) against ref; ``lpips`` is a loaded
    :class:`LPIPSMetric` (its value) or a reason string (reported as is); None: not asked for."""
    out = {"frame_psnr": psnr(frames, ref, data_range=data_range), "frame_ssim": ssim(frames, ref, data_range=data_range)}
    out["lpips"] = lpips(frames, ref) if isinstance(lpips, LPIPSMetric) else lpips
    return out
