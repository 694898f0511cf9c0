"""Random conditioning masks for Open-Sora 1.2-style training: which frames of a clip are given, which generated.

Open-Sora 1.2 trains one model for text-to-video, image-to-video, video extension, interpolation and
connection by marking some latent frames as conditioning frames: the rectified-flow loss keeps them
clean (x_t = x0 there) and leaves them out of the mean, and STDiT3 feeds them timestep 0 (its
``x_mask``). A mask is (B, T) bool, True = a frame to generate, False = a given frame.

``mask_ratios`` (the ``[diffusion] mask_ratios`` table) gives the probability of each kind; what is left
to 1 is ``identity`` (no conditioning: every frame generated). Per sample one kind is drawn, then:

    identity           all True
    random             r ~ U(0.1, 0.9), then per frame u ~ U[0, 1): generated where u > r (about a fraction r
                       given); if no frame is left to generate, the last one is
    intepolate         (Open-Sora's spelling) every other frame given, starting at frame 0 or 1 (each p = 1/2)
    quarter_random     k ~ {1..max(1, T // 4)} consecutive frames given, at a uniform start
    quarter_head       the first k frames given, k as above
    quarter_tail       the last k frames given
    quarter_head_tail  the first k and the last k frames given (one k)
    image_random       one frame given, at a uniform position
    image_head         frame 0 given
    image_tail         the last frame given
    image_head_tail    the first and the last frame given

A clip of T = 1 (an image) is never masked. Open-Sora's quarter kinds draw k from {1..T // 4}, which
fails for T < 4 (an empty range); here k is at least 1 (a 2-frame clip with quarter_head_tail is all
given, as Open-Sora's image_head_tail makes it). Draws come from a ``torch.Generator`` the caller seeds
(the trainer: from the run's seed and the step), so a resumed run draws the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["MASK_KINDS", "MaskGenerator", "validate_mask_ratios"]

MASK_KINDS = (
    "identity", "random", "intepolate", "quarter_random", "quarter_head", "quarter_tail", "quarter_head_tail",
    "image_random", "image_head", "image_tail", "image_head_tail",
)  # fmt: skip


def validate_mask_ratios(mask_ratios: Mapping[str, float]) -> dict[str, float]:
    """``mask_ratios`` checked (known kinds, each probability in [0, 1], sum <= 1) and completed with
    ``identity`` = the rest, in MASK_KINDS order. Raises ValueError naming the kind at fault."""
    if not isinstance(mask_ratios, Mapping):
        raise TypeError(f"mask_ratios: expected a table {{kind = probability}}, got {mask_ratios!r}")
    out = {}
    for kind, p in mask_ratios.items():
        if kind not in MASK_KINDS:
            raise ValueError(f"mask_ratios: unknown kind {kind!r}; expected some of {list(MASK_KINDS)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"mask_ratios: {kind} must be a probability in [0, 1], got {p!r}")
        out[kind] = float(p)
    total = sum(v for k, v in out.items() if k != "identity")
    if "identity" in out:
        if not math.isclose(total + out["identity"], 1.0, abs_tol=1e-6):
            raise ValueError(f"mask_ratios: with identity given the probabilities must sum to 1, got "
                             f"{total + out['identity']:.6g}")
    elif total > 1.0 + 1e-6:
        raise ValueError(f"mask_ratios: the probabilities sum to {total:.6g}; at most 1 (the rest is identity: no mask)")
    out["identity"] = out.get("identity", max(0.0, 1.0 - total))
    return {k: out[k] for k in MASK_KINDS if k in out}


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in [lo, hi] (both ends included)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


class MaskGenerator:
    """Draws Open-Sora 1.2's conditioning masks (see the module docstring) from ``mask_ratios``."""

    def __init__(self, mask_ratios: Mapping[str, float]):
        self.mask_ratios = validate_mask_ratios(mask_ratios)
        self._kinds = list(self.mask_ratios)
        self._edges = torch.tensor(list(self.mask_ratios.values()), dtype=torch.float64).cumsum(0)

    @property
    def active(self) -> bool:
        """Whether any mask can differ from all-True."""
        return self.mask_ratios.get("identity", 0.0) < 1.0

    def draw_kind(self, g: torch.Generator) -> str:
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        i = int(torch.searchsorted(self._edges, torch.tensor(u, dtype=torch.float64), right=True))
        return self._kinds[min(i, len(self._kinds) - 1)]  # u within rounding of 1.0: the last kind

    def mask(self, kind: str, num_frames: int, g: torch.Generator) -> torch.Tensor:
        """The (T,) bool mask of one sample of ``kind`` (True = generate)."""
        if kind not in MASK_KINDS:
            raise ValueError(f"kind: expected one of {list(MASK_KINDS)}, got {kind!r}")
        T = num_frames
        m = torch.ones(T, dtype=torch.bool)
        if T <= 1 or kind == "identity":
            return m
        quarter = max(1, T // 4)
        if kind == "random":
            ratio = 0.1 + 0.8 * float(torch.rand((), generator=g, dtype=torch.float64))
            m = torch.rand(T, generator=g, dtype=torch.float64) > ratio
            if not m.any():
                m[-1] = True
        elif kind == "intepolate":
            m[_randint(0, 1, g)::2] = False
        elif kind == "quarter_random":
            k = _randint(1, quarter, g)
            start = _randint(0, T - k, g)
            m[start:start + k] = False
        elif kind == "quarter_head":
            m[:_randint(1, quarter, g)] = False
        elif kind == "quarter_tail":
            m[T - _randint(1, quarter, g):] = False
        elif kind == "quarter_head_tail":
            k = _randint(1, quarter, g)
            m[:k] = False
            m[T - k:] = False
        elif kind == "image_random":
            m[_randint(0, T - 1, g)] = False
        elif kind == "image_head":
            m[0] = False
        elif kind == "image_tail":
            m[-1] = False
        elif kind == "image_head_tail":
            m[0] = m[-1] = False
        return m

    def get_masks(self, batch: int, num_frames: int, generator: torch.Generator, *,
                  device: torch.device | str = "cpu", return_kinds: bool = False):
        """(B, T) bool masks, one kind drawn per sample; with ``return_kinds`` also the list of kinds."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
        kinds = [self.draw_kind(generator) for _ in range(batch)]
        masks = torch.stack([self.mask(k, num_frames, generator) for k in kinds]).to(device)
        return (masks, kinds) if return_kinds else masks
