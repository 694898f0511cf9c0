"""Model-level contract shared by STDiT, DiT and Latte: bad input raises a clear error naming the
argument, image input (T = 1) works, presets and switches are validated, and one STDiT block with
our triton kernels compiles as a single graph through forward and backward."""

import pytest
import torch

from stdit.kernels import availability
from stdit.models import MODEL_PRESETS, from_preset
from stdit.models.stdit import STDiTBlock

MODELS = ("STDiT-tiny", "DiT-tiny", "Latte-tiny")


def _inputs(model, batch=2, frames=None):
    g = torch.Generator().manual_seed(3)
    T, H, W = model.input_size
    L, C_cap = model.y_embedder.y_embedding.shape
    x = torch.randn(batch, model.in_channels, frames or T, H, W, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randn(batch, 1, L, C_cap, generator=g)
    return x, t, y, torch.ones(batch, L, dtype=torch.int64)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return from_preset(request.param, attention_backend="reference").eval()


def _bad_cases(model):
    x, t, y, mask = _inputs(model)
    B, L, C_cap = x.shape[0], y.shape[2], y.shape[3]
    zeros = mask.clone()
    zeros[1] = 0
    return {
        "x channels": ((x[:, :3], t, y, mask), ValueError, r"x: expected 4 channels"),
        "x 4-D": ((x[:, :, 0], t, y, mask), ValueError, r"x: expected a floating \(B, C=4, T, H, W\)"),
        "x integer": ((x.long(), t, y, mask), ValueError, r"x: expected a floating"),
        "x odd width": ((x[..., :-1], t, y, mask), ValueError, r"x: W = \d+ is not a positive multiple of the patch size 2"),
        "timestep batch": ((x, t[:1], y, mask), ValueError, rf"timestep: expected shape \({B},\)"),
        "y 3-D": ((x, t, y[:, 0], mask), ValueError, rf"y: expected text features of shape \(B, 1, L, caption_channels={C_cap}\)"),
        "y channels": ((x, t, y[..., :-1], mask), ValueError, r"y: expected text features"),
        "y batch": ((x, t, y[:1], mask), ValueError, rf"y: batch 1 does not match x's batch {B}"),
        "y too long": (
            (x, t, torch.cat([y, y[:, :, :1]], 2), torch.ones(B, L + 1)),
            ValueError,
            rf"y: {L + 1} text tokens; expected 1 to model_max_length = {L}",
        ),
        "mask values": ((x, t, y, mask * 2), ValueError, r"mask: expected 0/1"),
        "mask 1-D": ((x, t, y, mask[0]), TypeError, r"mask: expected a 0/1 or bool tensor of shape \(B, L\)"),
        "mask length": ((x, t, y, mask[:, :-1]), ValueError, r"mask: expected shape"),
        "mask empty sample": ((x, t, y, zeros), ValueError, r"mask: every sample needs at least one real text token"),
    }


@pytest.mark.parametrize(
    "case",
    ["x channels", "x 4-D", "x integer", "x odd width", "timestep batch", "y 3-D", "y channels", "y batch",
     "y too long", "mask values", "mask 1-D", "mask length", "mask empty sample"],
)  # fmt: skip
def test_bad_input_names_the_argument(model, case):
    args, error, message = _bad_cases(model)[case]
    with pytest.raises(error, match=message):
        model(*args)


def test_accepted_input_variants(model):
    """0-d timestep broadcast, bool mask, (B, 1, 1, L) mask, fewer text tokens than the maximum."""
    x, t, y, mask = _inputs(model)
    base = model(x, t, y, mask)
    torch.testing.assert_close(model(x, t, y, mask.bool()), base)
    torch.testing.assert_close(model(x, t, y, mask[:, None, None]), base)
    short = model(x, t, y[:, :, :2], mask[:, :2])
    assert short.shape == base.shape and torch.isfinite(short).all()
    same_step = model(x, torch.tensor(7), y, mask)
    torch.testing.assert_close(same_step, model(x, torch.tensor([7, 7]), y, mask))


@pytest.mark.parametrize("name", MODELS)
def test_image_input_single_frame(name):
    """PixArt-alpha-style stage-1 input: T = 1 runs forward and backward (no temporal mixing)."""
    torch.manual_seed(0)
    model = from_preset(name, attention_backend="reference").train()
    x, t, y, mask = _inputs(model, frames=1)
    out = model(x, t, y, mask)
    assert out.shape == (2, model.out_channels, 1, *x.shape[3:])
    out.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"name: unknown model preset 'STDiT-XXL'.*'STDiT-XL/2'"):
        from_preset("STDiT-XXL")
    with pytest.raises(ValueError, match=r"attention_backend: unknown backend 'cuda'.*'triton'"):
        from_preset("STDiT-mini", attention_backend="cuda")
    with pytest.raises(ValueError, match=r"fused_ops: expected None or one of .*'triton'"):
        from_preset("DiT-mini", fused_ops="apex")
    assert {"STDiT-XL/2", "DiT-XL/2", "Latte-XL/2"} <= set(MODEL_PRESETS)


def test_compiled_block_with_triton_kernels_matches_eager():
    """torch.compile(fullgraph) of an STDiT block on the triton attention and fused ops: the custom
    ops trace, and output and gradients equal the eager block's."""
    if (why := availability("triton", "cpu")) is not None:
        pytest.skip(f"triton on CPU: {why}")
    torch.manual_seed(0)
    C, heads, T, S, L, B = 144, 2, 3, 4, 5, 2
    block = STDiTBlock(C, heads)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(B, T * S, C, requires_grad=True)
    y, t0 = torch.randn(B, L, C), torch.randn(B, 6 * C)
    y_lens, tpe = torch.tensor([L, 2]), torch.randn(1, T, C)
    args = (y, t0, y_lens, T, tpe, "triton", "triton")

    eager = block(x, *args)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, *args)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    # measured: equal to the bit (aot_eager runs the same kernels); allowed: a few float32 ulps
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-6, atol=1e-6)
