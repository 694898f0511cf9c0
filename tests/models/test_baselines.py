"""The full-attention DiT and Latte baselines (stdit.models.dit, stdit.models.latte).

No golden data exists for these (Open-Sora never released the benchmark's DiT), so the tests check
shapes, agreement between attention backends, gradients, which tokens each block mixes, and the
XL/2 parameter counts against arithmetic done here from the layer sizes.
"""

import pytest
import torch

from stdit.kernels import availability
from stdit.models import (
    DIT_PRESETS,
    LATTE_PRESETS,
    DiT,
    Latte,
    count_parameters,
    dit_from_preset,
    latte_from_preset,
    stdit_from_preset,
)
from stdit.models.dit import PixArtBlock

BUILDERS = {"DiT": (dit_from_preset, "DiT-tiny"), "Latte": (latte_from_preset, "Latte-tiny")}
STDIT_XL2_PARAMS = 759_620_768  # Open-Sora 1.0 STDiT-XL/2, as tests/models/test_stdit_golden.py checks


def _tiny(name: str, **overrides) -> torch.nn.Module:
    """A tiny preset with every parameter random (the default init zeroes the final linear and the
    cross-attention projections, which would make backend comparisons trivially pass)."""
    build, preset = BUILDERS[name]
    torch.manual_seed(0)
    model = build(preset, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _inputs(model, batch: int = 2, frames: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T, H, W = model.input_size
    T = frames or T
    L, C_cap = model.y_embedder.y_embedding.shape
    x = torch.randn(batch, model.in_channels, T, H, W, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randn(batch, 1, L, C_cap, generator=g)
    mask = torch.ones(batch, L, dtype=torch.int64)
    mask[0, L // 2 :] = 0  # sample 0 has half its text tokens
    return x, t, y, mask


# ------------------------------------------------------------------------------------------------
# Shapes and structure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DiT", "Latte"])
@pytest.mark.parametrize("frames", [None, 3])  # the configured T, and an odd T (tables rebuilt)
def test_forward_shape(name, frames):
    model = _tiny(name, attention_backend="sdpa").eval()
    x, t, y, mask = _inputs(model, frames=frames)
    with torch.no_grad():
        out = model(x, t, y, mask)
    assert out.shape == (x.shape[0], model.out_channels, *x.shape[2:])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_block_layout():
    dit = dit_from_preset("DiT-tiny")
    latte = latte_from_preset("Latte-tiny")
    assert [b.attn.kind for b in dit.blocks] == ["full"] * dit.depth
    assert [b.attn.kind for b in latte.blocks] == ["spatial", "temporal"] * (latte.depth // 2)
    assert LATTE_PRESETS["Latte-XL/2"]["depth"] == 28
    for stdit_name in ("XL/2", "tiny", "mini"):
        assert DIT_PRESETS[f"DiT-{stdit_name}"]["hidden_size"] == LATTE_PRESETS[f"Latte-{stdit_name}"]["hidden_size"]


def test_default_init_output_is_zero():
    """The final linear starts at zero, as in STDiT/PixArt: a fresh model predicts 0."""
    torch.manual_seed(0)
    model = dit_from_preset("DiT-mini", attention_backend="sdpa").eval()
    x, t, y, mask = _inputs(model)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, y, mask)) == 0


# ------------------------------------------------------------------------------------------------
# Backends and switches
# ------------------------------------------------------------------------------------------------


def _backends() -> list[str]:
    out = ["sdpa"]
    if availability("triton", "cpu") is None:
        out.append("triton")
    return out


@pytest.mark.parametrize("name", ["DiT", "Latte"])
@pytest.mark.parametrize("backend", _backends())
def test_backend_matches_reference(name, backend):
    model = _tiny(name, attention_backend="reference").eval()
    x, t, y, mask = _inputs(model)
    with torch.no_grad():
        ref = model(x, t, y, mask)
        model.attention_backend = backend
        out = model(x, t, y, mask)
    assert ref.abs().max() > 1e-2  # the comparison is not between zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # measured <= 9.5e-7 at output scale 2.3


@pytest.mark.parametrize("name", ["DiT", "Latte"])
def test_fused_ops_and_checkpoint_match(name):
    """fused_ops="reference" and checkpoint=True change how, not what, is computed."""
    model = _tiny(name, attention_backend="sdpa").train()
    model.y_embedder.uncond_prob = 0.0  # no random caption dropout, so runs are comparable
    x, t, y, mask = _inputs(model)

    def run(**switches):
        for k, v in switches.items():
            setattr(model, k, v)
        model.zero_grad(set_to_none=True)
        out = model(x, t, y, mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run(fused_ops=None, checkpoint=False)
    for switches in (dict(fused_ops="reference", checkpoint=False), dict(fused_ops=None, checkpoint=True)):
        out, grads = run(**switches)
        # measured: equal to the bit; allowed: a few float32 ulps of the output (2.3) and gradient scales
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["DiT", "Latte"])
def test_gradients_finite_for_all_params(name):
    model = _tiny(name, attention_backend="sdpa").train()
    x, t, y, mask = _inputs(model)
    model(x, t, y, mask).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname  # every parameter reaches the output


# ------------------------------------------------------------------------------------------------
# Which tokens each block mixes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, mixes_frames", [("spatial", False), ("temporal", True), ("full", True)])
def test_block_frame_mixing(kind, mixes_frames):
    """Changing frame 1's tokens changes frame 0's output iff the block attends across frames."""
    torch.manual_seed(0)
    B, T, S, C, L = 2, 3, 4, 144, 5
    block = PixArtBlock(C, num_heads=2, kind=kind).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(B, T * S, C)
    y, t0, y_lens = torch.randn(B, L, C), torch.randn(B, 6 * C), torch.tensor([L, 2])
    x2 = x.clone()
    x2[:, S : 2 * S] += torch.randn(B, S, C)  # frame 1 only
    with torch.no_grad():
        out, out2 = (block(v, y, t0, y_lens, T, "reference") for v in (x, x2))
    frame0_change = (out2[:, :S] - out[:, :S]).abs().max()
    assert (frame0_change > 1e-4) if mixes_frames else (frame0_change == 0)
    if kind == "temporal":  # and never across spatial positions: token (1, s) only reaches (t, s)
        x3 = x.clone()
        x3[:, S + 1] += 1.0  # frame 1, position 1
        with torch.no_grad():
            out3 = block(x3, y, t0, y_lens, T, "reference")
        others = [s for s in range(S) if s != 1]
        assert torch.equal(out3.view(B, T, S, C)[:, :, others], out.view(B, T, S, C)[:, :, others])


# ------------------------------------------------------------------------------------------------
# XL/2 sizes on the meta device
# ------------------------------------------------------------------------------------------------


def _linear(i: int, o: int) -> int:
    return i * o + o


def _expected_xl2_params() -> tuple[int, int]:
    """(whole model, one block) for an XL/2 PixArt-block model from the layer sizes:
    C 1152, 28 blocks, patch (1,2,2), 4 latent channels in, 8 out, T5 4096-wide captions."""
    C, depth, cap, c_in, c_out, patch = 1152, 28, 4096, 4, 8, 1 * 2 * 2
    patch_embed = c_in * patch * C + C  # Conv3d
    t_embedder = _linear(256, C) + _linear(C, C)
    t_block = _linear(C, 6 * C)
    y_embedder = _linear(cap, C) + _linear(C, C)  # y_embedding is a buffer
    block = (
        6 * C  # scale_shift_table
        + _linear(C, 3 * C) + _linear(C, C)  # self-attention qkv, proj
        + _linear(C, C) + _linear(C, 2 * C) + _linear(C, C)  # cross-attention q, kv, proj
        + _linear(C, 4 * C) + _linear(4 * C, C)  # MLP
    )
    final = 2 * C + _linear(C, patch * c_out)
    return patch_embed + t_embedder + t_block + y_embedder + depth * block + final, block


@pytest.mark.parametrize("name, build", [("DiT-XL/2", dit_from_preset), ("Latte-XL/2", latte_from_preset)])
def test_xl2_parameter_count(name, build):
    with torch.device("meta"):
        model = build(name)
    assert isinstance(model, (DiT, Latte)) and len(model.blocks) == 28
    assert all(b.attn.qkv.weight.shape == (3 * 1152, 1152) for b in model.blocks)  # head dim 72 x 16 heads
    n = count_parameters(model)
    expected, _ = _expected_xl2_params()
    temporal_attn = 28 * (_linear(1152, 3 * 1152) + _linear(1152, 1152))  # STDiT's attn_temp: 148.8M
    print(f"{name}: {n:,} parameters (STDiT-XL/2 {STDIT_XL2_PARAMS:,} - temporal attention {temporal_attn:,})")
    assert n == expected == 610_856_096
    assert n == STDIT_XL2_PARAMS - temporal_attn
    with torch.device("meta"):
        assert count_parameters(stdit_from_preset("STDiT-XL/2")) == STDIT_XL2_PARAMS


@pytest.mark.parametrize("name", ["DiT", "Latte"])
def test_temporal_position_table_is_added(name):
    """Attention is equivariant to token order, so two identical frames would give identical outputs
    without the temporal table; with it, they differ."""
    model = _tiny(name, attention_backend="sdpa").eval()
    x, t, y, mask = _inputs(model)
    x = x[:, :, :1].expand(-1, -1, model.input_size[0], -1, -1).contiguous()  # every frame the same
    with torch.no_grad():
        out = model(x, t, y, mask)
        model.pos_embed_temporal.zero_()
        same = model(x, t, y, mask)
    assert (out[:, :, 1] - out[:, :, 0]).abs().max() > 1e-4
    torch.testing.assert_close(same[:, :, 1], same[:, :, 0], atol=1e-6, rtol=0)  # measured: equal
