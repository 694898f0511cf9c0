"""Open-Sora 1.2's random conditioning masks: each kind's shape rules, the kind frequencies, seeding, validation."""

import pytest
import torch

from stdit.train.masks import MASK_KINDS, MaskGenerator, validate_mask_ratios


def _masks(kind: str, T: int, n: int = 200, seed: int = 0) -> torch.Tensor:
    gen = MaskGenerator({kind: 1.0}) if kind != "identity" else MaskGenerator({})
    return gen.get_masks(n, T, torch.Generator().manual_seed(seed))


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of given (False) frames."""
    out, start = [], None
    for i, v in enumerate(row.tolist() + [True]):
        if not v and start is None:
            start = i
        elif v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("T", [2, 3, 4, 7, 8, 16])
def test_each_kind_follows_its_shape_rule(T):
    q = max(1, T // 4)
    for kind in MASK_KINDS:
        m = _masks(kind, T)
        assert m.shape == (200, T) and m.dtype == torch.bool
        for row in m:
            runs, given = _runs(row), (~row).sum().item()
            if kind == "identity":
                assert row.all()
            elif kind == "image_head":
                assert runs == [(0, 1)]
            elif kind == "image_tail":
                assert runs == [(T - 1, 1)]
            elif kind == "image_head_tail":
                assert (~row).nonzero().flatten().tolist() == [0, T - 1]
            elif kind == "image_random":
                assert given == 1
            elif kind == "quarter_head":
                assert len(runs) == 1 and runs[0][0] == 0 and 1 <= runs[0][1] <= q
            elif kind == "quarter_tail":
                assert len(runs) == 1 and sum(runs[0]) == T and 1 <= runs[0][1] <= q
            elif kind == "quarter_random":
                assert len(runs) == 1 and 1 <= runs[0][1] <= q
            elif kind == "quarter_head_tail":
                k = (~row[: T // 2 + 1]).sum().item() if T > 2 else T // 2
                assert not row[:k].any() and not row[T - k:].any() and 1 <= k <= q
                assert row[k:T - k].all()
            elif kind == "intepolate":
                assert torch.equal(row, torch.arange(T) % 2 == 1) or torch.equal(row, torch.arange(T) % 2 == 0)
            elif kind == "random":
                assert row.any()  # at least one frame left to generate
        if kind == "intepolate":  # both phases occur
            assert len({tuple(r.tolist()) for r in m}) == 2
        if kind in ("quarter_head", "quarter_random") and q > 1:  # every size 1..T//4 occurs
            sizes = {(~r).sum().item() for r in m}
            assert sizes == set(range(1, q + 1))
        if kind in ("image_random", "quarter_random"):  # the position varies over the whole clip
            starts = {_runs(r)[0][0] for r in m}
            assert min(starts) == 0 and max(starts) == T - 1  # a size-1 run can sit at the end


def test_random_kind_gives_a_fraction_between_0_1_and_0_9():
    m = _masks("random", 2000, n=300)
    given = (~m).float().mean(1)  # per sample ~ r ~ U(0.1, 0.9), binomial spread ~0.011 at T = 2000
    assert 0.05 < given.min() < 0.15 and 0.85 < given.max() < 0.95
    assert abs(given.mean().item() - 0.5) < 0.05
    # a draw that would give every frame leaves the last one to generate: at T = 2 that happens often
    rows = {tuple(r.tolist()) for r in _masks("random", 2, n=300)}
    assert (False, True) in rows and (False, False) not in rows


def test_images_are_never_masked():
    gen = MaskGenerator({"image_head": 0.5, "random": 0.5})
    assert gen.get_masks(32, 1, torch.Generator().manual_seed(0)).all()


def test_kind_frequencies_follow_the_ratios():
    ratios = {"random": 0.05, "intepolate": 0.005, "quarter_head": 0.2, "image_head": 0.3, "image_tail": 0.1}
    gen = MaskGenerator(ratios)
    assert gen.mask_ratios["identity"] == pytest.approx(1 - sum(ratios.values()))
    _, kinds = gen.get_masks(20000, 8, torch.Generator().manual_seed(3), return_kinds=True)
    for kind, p in gen.mask_ratios.items():
        f = kinds.count(kind) / len(kinds)
        assert abs(f - p) < 4 * (p * (1 - p) / len(kinds)) ** 0.5 + 1e-3, (kind, f, p)
    assert not MaskGenerator({}).active and gen.active


def test_masks_are_a_function_of_the_generator_seed():
    gen = MaskGenerator({"random": 0.3, "quarter_random": 0.3, "image_random": 0.3})
    a = gen.get_masks(16, 9, torch.Generator().manual_seed(5))
    b = gen.get_masks(16, 9, torch.Generator().manual_seed(5))
    c = gen.get_masks(16, 9, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_ratios_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown kind 'interpolate'; expected some of \['identity'"):
        validate_mask_ratios({"interpolate": 0.1})
    with pytest.raises(ValueError, match=r"image_head must be a probability in \[0, 1\], got 1.5"):
        validate_mask_ratios({"image_head": 1.5})
    with pytest.raises(ValueError, match=r"sum to 1.2; at most 1"):
        validate_mask_ratios({"image_head": 0.6, "random": 0.6})
    with pytest.raises(ValueError, match=r"with identity given the probabilities must sum to 1"):
        validate_mask_ratios({"identity": 0.5, "random": 0.2})
    with pytest.raises(TypeError, match="mask_ratios: expected a table"):
        validate_mask_ratios([0.1])
    with pytest.raises(ValueError, match="num_frames: expected an int >= 1"):
        MaskGenerator({}).get_masks(2, 0, torch.Generator())
    assert validate_mask_ratios({"identity": 0.5, "random": 0.5}) == {"identity": 0.5, "random": 0.5}
