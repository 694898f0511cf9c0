"""STDiT against golden data from Open-Sora 1.0's reference code (tests/data/opensora_v1/).

The golden files hold a tiny reference STDiT's state dict, inputs and output, made by running
Open-Sora v1.0.0's own code (how: the project's shared goldens README; the JSON records seeds and
arguments), and the full-size XL/2 key list. Tolerance: max |out - golden| <= 2e-5 in float32 on
CPU, about 10x the measured error (1.7e-6 reference / sdpa, 1.9e-6 triton, at output scale 2.3)
and below the smallest real mistake tried (LayerNorm eps 1e-5: 3.7e-5).
"""

import json
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from stdit.kernels import availability  # noqa: E402
from stdit.models import STDIT_PRESETS, STDiT, count_parameters, stdit_from_preset  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "opensora_v1"
ATOL = 2e-5
XL2_PARAMS = 759_620_768


def _golden_kwargs() -> dict:
    kwargs = dict(json.loads((DATA / "stdit_tiny_a.json").read_text())["constructor_kwargs"])
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((DATA / "stdit_tiny_a.json").read_text())
    state = safetensors_torch.load_file(DATA / "stdit_tiny_a.safetensors")
    io = safetensors_torch.load_file(DATA / "stdit_tiny_a_io.safetensors")
    return meta, state, io


@pytest.fixture(scope="module")
def golden_model(golden):
    _, state, _ = golden
    model = STDiT(**_golden_kwargs())
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_golden_state_dict_loads_strict(golden):
    meta, state, _ = golden
    torch.manual_seed(0)  # the reference's construction seed
    model = STDiT(**_golden_kwargs())
    expected = [(k["key"], tuple(k["shape"])) for k in meta["state_dict"]["keys"]]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected  # names, shapes, order
    assert count_parameters(model) == meta["num_parameters"] == 1_052_240
    # Fixed sin-cos tables equal the reference constructor's bitwise; y_embedding too, because the
    # modules are created (and default-initialised) in the reference's order under the same seed.
    for name in ("pos_embed", "pos_embed_temporal", "y_embedder.y_embedding"):
        assert torch.equal(model.state_dict()[name], state[name]), name
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_golden_forward(golden, golden_model, backend):
    if backend == "triton" and availability("triton", "cpu") is not None:
        pytest.skip(f"triton on CPU: {availability('triton', 'cpu')}")
    _, _, io = golden
    golden_model.attention_backend = backend
    with torch.no_grad():
        out = golden_model(io["x"], io["timestep"], io["y"], io["mask"])
    assert out.shape == io["out"].shape and out.dtype == torch.float32
    err = (out - io["out"]).abs().max().item()
    assert err <= ATOL, f"{backend}: max |out - golden| = {err:.3g} > {ATOL}"


@pytest.mark.parametrize("fused", ["reference", "triton"])
def test_golden_forward_fused_ops(golden, golden_model, fused):
    """LayerNorm+modulate and gated residuals through stdit.kernels' fused ops: same golden output."""
    if fused == "triton" and availability("triton", "cpu") is not None:
        pytest.skip(f"triton on CPU: {availability('triton', 'cpu')}")
    _, _, io = golden
    golden_model.attention_backend = "sdpa"
    golden_model.fused_ops = fused
    try:
        with torch.no_grad():
            out = golden_model(io["x"], io["timestep"], io["y"], io["mask"])
    finally:
        golden_model.fused_ops = None
    err = (out - io["out"]).abs().max().item()
    assert err <= ATOL, f"fused_ops={fused}: max |out - golden| = {err:.3g} > {ATOL}"


def test_golden_mask_semantics(golden, golden_model):
    """mask=None equals all-ones; a non-prefix mask equals the prefix mask after moving the same
    tokens to the front (Open-Sora keeps the valid tokens in order, wherever they are)."""
    _, _, io = golden
    golden_model.attention_backend = "sdpa"
    x, t, y = io["x"], io["timestep"], io["y"]
    with torch.no_grad():
        none = golden_model(x, t, y, None)
        ones = golden_model(x, t, y, torch.ones(2, 8, dtype=torch.int64))
        assert torch.equal(none, ones)
        # sample 0: its 5 valid tokens (in order) go to positions 1, 3, 4, 6, 7, padding elsewhere
        dest = torch.tensor([1, 3, 4, 6, 7, 0, 2, 5])
        y_scattered = y.clone()
        y_scattered[0, :, dest] = y[0]
        mask = torch.ones(2, 8, dtype=torch.int64)
        mask[0] = 0
        mask[0, dest[:5]] = 1
        out = golden_model(x, t, y_scattered, mask)
    err = (out - io["out"]).abs().max().item()
    assert err <= ATOL, f"non-prefix mask: {err:.3g}"
    # the caption mask matters at all (sample 0 has 3 padding tokens)
    assert (none[0] - io["out"][0]).abs().max() > 1e-3


def test_xl2_meta_device_matches_reference_keys():
    kwargs = dict(STDIT_PRESETS["STDiT-XL/2"], input_size=(16, 32, 32), caption_channels=4096,
                  model_max_length=120, space_scale=0.5, time_scale=1.0)
    with torch.device("meta"):
        model = STDiT(**kwargs)
    assert count_parameters(model) == XL2_PARAMS
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 26_568_576
    state = model.state_dict()
    assert len(state) == 550
    facts = json.loads((DATA / "stdit_xl2_keys.json").read_text())
    assert facts["num_parameters"] == XL2_PARAMS
    expected = [(k["key"], tuple(k["shape"])) for k in facts["state_dict"]]
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected


def _tiny_inputs(model: STDiT, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T, H, W = model.input_size
    L, Ccap = model.y_embedder.y_embedding.shape
    x = torch.randn(B, model.in_channels, T, H, W, generator=g)
    t = torch.tensor([7.0, 500.0][:B])
    y = torch.randn(B, 1, L, Ccap, generator=g)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[0, L // 2 + 1 :] = 0
    return x, t, y, mask


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Overwrite every parameter (zero-initialised ones included) so every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_gradients_flow(checkpoint):
    torch.manual_seed(0)
    model = stdit_from_preset("STDiT-tiny", class_dropout_prob=0.0, attention_backend="sdpa", checkpoint=checkpoint)
    _randomize(model)
    model.train()
    x, t, y, mask = _tiny_inputs(model)
    out = model(x, t, y, mask)
    assert out.shape == (2, 8, 4, 8, 8)
    (out.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name
    if checkpoint:  # same gradients as without checkpointing
        ref = stdit_from_preset("STDiT-tiny", class_dropout_prob=0.0, attention_backend="sdpa")
        ref.load_state_dict(model.state_dict())
        ref.train()
        ref(x, t, y, mask).square().mean().backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_triton_gradients_match_sdpa():
    """The whole model's backward through our Triton kernels (interpreted on CPU) equals SDPA's."""
    if availability("triton", "cpu") is not None:
        pytest.skip(f"triton on CPU: {availability('triton', 'cpu')}")
    model = stdit_from_preset("STDiT-tiny", class_dropout_prob=0.0)
    _randomize(model)
    x, t, y, mask = _tiny_inputs(model)
    grads = {}
    for backend in ("sdpa", "triton"):
        model.zero_grad()
        model.attention_backend = backend
        model(x, t, y, mask).square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, ref in grads["sdpa"].items():
        torch.testing.assert_close(grads["triton"][name], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item(), msg=name)


def test_fused_ops_gradients_match_unfused():
    """The whole model's backward with the fused Triton adaLN ops equals the plain torch ops'."""
    if availability("triton", "cpu") is not None:
        pytest.skip(f"triton on CPU: {availability('triton', 'cpu')}")
    model = stdit_from_preset("STDiT-tiny", class_dropout_prob=0.0, attention_backend="sdpa")
    _randomize(model)
    x, t, y, mask = _tiny_inputs(model)
    grads = {}
    for fused in (None, "triton"):
        model.zero_grad()
        model.fused_ops = fused
        model(x, t, y, mask).square().mean().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, ref in grads[None].items():
        torch.testing.assert_close(grads["triton"][name], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item(), msg=name)


def test_init_zero_layers_and_freeze():
    model = stdit_from_preset("STDiT-mini")
    for block in model.blocks:
        assert not block.attn_temp.proj.weight.any() and not block.cross_attn.proj.weight.any()
    assert not model.final_layer.linear.weight.any()
    frozen = stdit_from_preset("STDiT-mini", freeze="not_temporal")
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {
        n for n, _ in frozen.named_parameters() if "attn_temp" in n
    }
    with pytest.raises(ValueError, match="freeze"):
        stdit_from_preset("STDiT-mini", freeze="everything")


def test_caption_dropout():
    """force_drop_ids swaps in the null caption (CFG's unconditional branch); eval is deterministic."""
    model = stdit_from_preset("STDiT-mini", attention_backend="sdpa")
    _randomize(model)
    model.eval()
    x, t, y, _ = _tiny_inputs(model)
    null = model.y_embedder.y_embedding[None, None].expand_as(y)
    with torch.no_grad():
        a = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
        b = model(x, t, torch.stack([null[0], y[1]]))
        assert torch.equal(a, b)
        assert torch.equal(model(x, t, y), model(x, t, y))
