"""stdit.models.costs (analytic FLOPs / bytes / parameters) against arithmetic written out here and
against the models themselves (built on the meta device): fast, CPU only."""

import pytest
import torch

from stdit.common.dtypes import dtype_bytes
from stdit.models.costs import (
    Cost,
    attention_cost,
    block_cost,
    check_size,
    gated_residual_cost,
    layernorm_modulate_cost,
    linear_cost,
    model_cost,
    model_tokens,
    opensora_flop_ratios,
    qk_norm_rope_cost,
    stdit3_param_count,
    stdit_param_count,
)
from stdit.models import from_preset
from stdit.models.sizes import SIZES, STDIT3_SIZES, preset_names, split_preset

C, H, D, DEPTH, L, CH, CAP = 1152, 16, 72, 28, 120, 4608, 4096
XL2_PARAMS = 759_620_768


# ------------------------------------------------------------------------------------------------
# Whole models against arithmetic written out here
# ------------------------------------------------------------------------------------------------


def _hand_flops(model: str, T: int, S: int) -> float:
    """Forward FLOPs of XL/2 for one sample, from per-token multiply-adds and 4*Lq*Lk*D terms."""
    N = T * S
    mlp = 2 * C * CH  # fc1 + fc2 MACs per token
    cross_tok = 2 * C * C  # q_linear + proj MACs per token
    kv_text = 2 * C * C * L  # kv_linear over the text tokens
    if model == "stdit":
        per_token = 4 * C * C + 4 * C * C + cross_tok + mlp  # spatial qkv+proj, temporal qkv+proj
        attn = 4 * H * D * (T * S * S + S * T * T + N * L)  # spatial + temporal + cross
    else:
        per_token = 4 * C * C + cross_tok + mlp
        attn = 4 * H * D * (N * N + N * L)
    blocks = DEPTH * (2 * (per_token * N + kv_text) + attn)
    embed = 2 * (N * 4 * 4 * C)  # patch conv: 4 channels x 1x2x2 patch -> C
    embed += 2 * (256 * C + C * C + C * 6 * C)  # timestep MLP + t_block (one row)
    embed += 2 * L * (CAP * C + C * C)  # caption MLP
    final = 2 * N * C * (4 * 8)  # Linear(C, 2*2*8)
    return blocks + embed + final


@pytest.mark.parametrize("model", ["stdit", "dit"])
def test_xl2_forward_flops_16x256(model):
    # FLOP counts are integers below 2**53, exact in float64: the checks below are exact
    got = model_cost(model, frames=16, height=256, width=256, batch=1).flops
    assert got == _hand_flops(model, 16, 256)
    # batch scales linearly
    assert model_cost(model, frames=16, height=256, width=256, batch=3).flops == 3 * got
    # the latent spelling is the same video, and the default size is XL/2 with its 120 text tokens
    assert model_cost(model, latent=(16, 32, 32)).flops == got
    assert model_cost(model, size=SIZES["XL/2"], frames=16, height=256, width=256, text_len=120).flops == got


def test_opensora_flop_ratios_reproduced():
    rows = opensora_flop_ratios()
    assert [r["setting"] for r in rows] == ["16x256x256", "16x512x512", "64x512x512"]
    assert [r["batch"] for r in rows] == [8, 8, 4]
    # Open-Sora 1.0 publishes 1.14, 2.13, 6.37; this model gives (to 4 places) the values below
    assert [round(r["flop_ratio"], 4) for r in rows] == [1.1408, 2.1302, 6.3669]
    assert [round(r["flop_ratio_blocks"], 4) for r in rows] == [1.1408, 2.1303, 6.3674]
    for r, want in zip(rows, (1.14, 2.13, 6.37)):
        assert abs(r["flop_ratio"] - want) <= 0.01, r
        assert abs(r["flop_ratio_blocks"] - want) <= 0.01, r
        assert r["flop_ratio"] == r["flops_dit"] / r["flops_stdit"]
        assert r["flops_dit"] == _hand_flops("dit", r["frames"], (r["resolution"] // 16) ** 2)
    assert [r["published_ratio"] for r in rows] == [0.97, 1.71, 5.0]
    assert [r["published_dit_samples_per_s"] for r in rows] == [7.20, 0.85, 0.08]
    assert [r["published_stdit_samples_per_s"] for r in rows] == [7.00, 1.45, 0.40]


def test_latte_is_alternating_pixart_blocks():
    kw = dict(hidden_size=C, num_heads=H, batch=2, frames=16, tokens_per_frame=256, text_len=L)
    sp, tp = block_cost("latte_spatial", **kw), block_cost("latte_temporal", **kw)
    dit = block_cost("dit", **kw)
    N = 16 * 256
    # a Latte block is a PixArt block (with cross-attention) whose self-attention is spatial/temporal
    assert dit.flops - sp.flops == 2 * 4 * H * D * (N * N - 16 * 256 * 256)
    assert dit.flops - tp.flops == 2 * 4 * H * D * (N * N - 256 * 16 * 16)
    # STDiT's block = spatial PixArt block + temporal attention (qkv, attn, proj) + a gated residual
    st = block_cost("stdit", **kw)
    assert st.flops - sp.flops == 2 * (2 * N * 4 * C * C) + 2 * 4 * H * D * 256 * 16 * 16
    whole = model_cost("latte", frames=16, height=256, width=256, batch=2, blocks_only=True)
    assert whole.flops == 14 * (sp.flops + tp.flops)
    assert whole.bytes == 14 * (sp.bytes + tp.bytes)


def test_train_step_and_checkpoint():
    v = dict(frames=16, height=256, width=256, batch=2)
    fwd = model_cost("stdit", **v)
    step = model_cost("stdit", mode="train_step", **v)
    ckpt = model_cost("stdit", mode="train_step", checkpoint=True, **v)
    assert 3.0 < step.flops / fwd.flops < 3.5  # linears 3x, attention 3.5x
    assert step.bytes > 2 * fwd.bytes
    blocks_fwd = model_cost("stdit", blocks_only=True, **v)
    assert ckpt.flops - step.flops == blocks_fwd.flops
    assert ckpt.bytes - step.bytes == blocks_fwd.bytes
    # ~96% of STDiT's forward FLOPs at 16x256 are Linears (attention is the rest)
    attn = sum(
        attention_cost(k, batch=2, frames=16, tokens_per_frame=256, num_heads=H, head_dim=D).flops
        for k in ("spatial", "temporal", "cross")
    )
    assert 0.9 < 1 - DEPTH * attn / fwd.flops < 0.98


def test_sizes_come_from_the_model_size():
    """Another ModelSize changes exactly the sizes it names; text_len follows its model_max_length."""
    tiny = SIZES["tiny"]  # depth 2, C 144, 2 heads, caption 32, L 8
    got = model_cost("stdit", size=tiny, frames=4, height=64, width=64, blocks_only=True)
    T, S = 4, 16
    block = block_cost("stdit", hidden_size=144, num_heads=2, batch=1, frames=T, tokens_per_frame=S, text_len=8)
    assert got == 2 * block
    whole = model_cost("stdit", size=tiny, frames=4, height=64, width=64)
    caption = linear_cost(8, 32, 144, needs_input_grad=False)
    assert whole.flops - got.flops == (
        caption.flops + linear_cost(8, 144, 144).flops + linear_cost(T * S, 16, 144).flops
        + linear_cost(1, 256, 144).flops + linear_cost(1, 144, 144).flops + linear_cost(1, 144, 6 * 144).flops
        + linear_cost(T * S, 144, 32).flops
    )  # fmt: skip
    assert model_cost("stdit", size=tiny.replace(model_max_length=120), frames=4, height=64, width=64) == model_cost(
        "stdit", size=tiny, frames=4, height=64, width=64, text_len=120
    )


def test_param_count_against_meta_models():
    from stdit.models import STDIT_PRESETS, STDiT, count_parameters

    assert stdit_param_count() == stdit_param_count(SIZES["XL/2"]) == XL2_PARAMS
    with torch.device("meta"):
        model = STDiT(**dict(STDIT_PRESETS["STDiT-XL/2"], input_size=(16, 32, 32), space_scale=0.5))
    assert count_parameters(model) == XL2_PARAMS
    # other sizes: the analytic count follows the model
    for size in (SIZES["XL/2"].replace(depth=3, hidden_size=144, num_heads=2, caption_channels=64), SIZES["demo"]):
        with torch.device("meta"):
            m = STDiT(**size.kwargs())
        assert stdit_param_count(size) == count_parameters(m)


def test_linear_flops_match_model_parameters():
    """2 * (weights of the Linears a token passes through) * tokens = the cost model's Linear FLOPs."""
    from stdit.models import STDIT_PRESETS, STDiT

    with torch.device("meta"):
        model = STDiT(**dict(STDIT_PRESETS["STDiT-XL/2"], input_size=(16, 32, 32), caption_channels=CAP))
    T, S, B = 16, 256, 2
    N = T * S
    blk = model.blocks[0]
    linears = {n: m for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)}
    per_token = sum(m.weight.numel() for n, m in linears.items() if n != "cross_attn.kv_linear")
    per_text = linears["cross_attn.kv_linear"].weight.numel()
    attn = sum(
        attention_cost(k, batch=B, frames=T, tokens_per_frame=S, num_heads=H, head_dim=D).flops
        for k in ("spatial", "temporal", "cross")
    )
    block = block_cost("stdit", hidden_size=C, num_heads=H, batch=B, frames=T, tokens_per_frame=S, text_len=L)
    assert block.flops - attn == 2 * B * (per_token * N + per_text * L)
    # block parameters ~ the weights the cost model reads (bf16, forward: each weight once); the rest
    # are biases and the scale-shift table, 1.0e-3 of the weights
    w_block = sum(p.numel() for p in blk.parameters())
    assert w_block == pytest.approx(per_token + per_text, rel=0.01)


# ------------------------------------------------------------------------------------------------
# STDiT3 (Open-Sora 1.2)
# ------------------------------------------------------------------------------------------------

XL2_STDIT3_PARAMS = 1_207_643_972  # Open-Sora 1.2's own count (tests/data/opensora_v12/stdit3_xl2_keys.json)


@pytest.mark.parametrize("name", list(STDIT3_SIZES))
def test_stdit3_param_count_against_meta_models(name):
    from stdit.models import count_parameters

    with torch.device("meta"):
        model = from_preset(f"STDiT3-{name}")
    size = STDIT3_SIZES[name]
    assert stdit3_param_count(size) == count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert stdit3_param_count(size, trainable=True) == trainable == count_parameters(model) - size.head_dim // 2


def test_stdit3_param_count_is_open_soras():
    assert stdit3_param_count() == stdit3_param_count(STDIT3_SIZES["XL/2"]) == XL2_STDIT3_PARAMS
    assert stdit3_param_count(STDIT3_SIZES["tiny"]) == 6_256_868  # the golden model (36 of them rope.freqs)


def _stdit3_hand_flops(T: int, S: int, x_mask: bool = False) -> float:
    """Forward FLOPs of STDiT3-XL/2 (300 text tokens) for one sample, written out: 2 * depth PixArt
    blocks (spatial, temporal), the embedders with the fps MLP, and timestep 0's MLPs with x_mask."""
    N, L3 = T * S, 300
    per_token = 4 * C * C + 2 * C * C + 2 * C * CH  # qkv + proj, q_linear + proj, fc1 + fc2 (MACs)
    kv_text = 2 * C * C * L3
    spatial = 2 * (per_token * N + kv_text) + 4 * H * D * (T * S * S + N * L3)
    temporal = 2 * (per_token * N + kv_text) + 4 * H * D * (S * T * T + N * L3)
    t_mlp = 2 * (256 * C + C * C)  # timestep (and fps) MLP, one row
    embed = 2 * (N * 4 * 4 * C) + 2 * t_mlp + 2 * C * 6 * C + 2 * L3 * (CAP * C + C * C)
    if x_mask:
        embed += t_mlp + 2 * C * 6 * C  # timestep 0
    return DEPTH * (spatial + temporal) + embed + 2 * N * C * (4 * 8)


def test_stdit3_forward_flops_by_hand():
    for T, S in ((16, 256), (15, 1024)):
        lat = (T, 2 * int(S**0.5), 2 * int(S**0.5))
        assert model_cost("stdit3", latent=lat).flops == _stdit3_hand_flops(T, S)
        assert model_cost("stdit3", latent=lat, x_mask=True).flops == _stdit3_hand_flops(T, S, x_mask=True)
    # the default size is STDiT3-XL/2 with its 300 text tokens
    assert model_cost("stdit3", latent=(16, 32, 32)) == model_cost("stdit3", size=STDIT3_SIZES["XL/2"], latent=(16, 32, 32), text_len=300)
    # an STDiT3 unit of depth is a Latte spatial + temporal block pair in FLOPs; the q/k norm adds bytes only
    kw = dict(hidden_size=C, num_heads=H, batch=2, frames=16, tokens_per_frame=256, text_len=300, mode="fwd+bwd")
    unit, sp, tp = block_cost("stdit3", **kw), block_cost("latte_spatial", **kw), block_cost("latte_temporal", **kw)
    assert unit.flops == sp.flops + tp.flops
    qk = qk_norm_rope_cost(2 * 16 * 256, C, H, mode="fwd+bwd")
    assert unit.bytes == sp.bytes + tp.bytes + 2 * qk.bytes


def test_stdit3_training_and_options():
    v = dict(latent=(16, 32, 32), batch=2)
    fwd = model_cost("stdit3", **v)
    step = model_cost("stdit3", mode="train_step", **v)
    assert 3.0 < step.flops / fwd.flops < 3.5  # linears 3x, attention 3.5x
    ckpt = model_cost("stdit3", mode="train_step", checkpoint=True, **v)
    assert ckpt.flops - step.flops == model_cost("stdit3", blocks_only=True, **v).flops
    eager = model_cost("stdit3", mode="train_step", attention_backward="eager", **v)
    attn = sum(
        attention_cost(k, batch=2, frames=16, tokens_per_frame=256, num_heads=H, head_dim=D, text_len=300).flops
        for k in ("spatial", "temporal", "cross", "cross")
    )
    assert step.flops - eager.flops == DEPTH * 0.5 * attn
    # x_mask: per-frame modulation rows and the final layer's second norm move bytes, not FLOPs, in the blocks
    kw = dict(hidden_size=C, num_heads=H, batch=2, frames=16, tokens_per_frame=256, text_len=300)
    assert block_cost("stdit3", x_mask=True, **kw).flops == block_cost("stdit3", **kw).flops
    assert block_cost("stdit3", x_mask=True, **kw).bytes > block_cost("stdit3", **kw).bytes
    masked = model_cost("stdit3", mode="train_step", x_mask=True, **v)
    # timestep 0's MLP and t_block, forward and backward (no input gradient into the 256-d sinusoid)
    assert masked.flops - step.flops == 2 * 2 * (2 * 256 * C + 3 * C * C + 3 * C * 6 * C)
    with pytest.raises(ValueError, match="^x_mask: only STDiT3"):
        model_cost("stdit", x_mask=True, **v)
    with pytest.raises(ValueError, match="^x_mask: only STDiT3"):
        block_cost("latte_spatial", x_mask=True, **kw)


def test_qk_norm_rope_cost():
    c = qk_norm_rope_cost(10, 16, 2)  # q and k: 2 x 10 x 16 values, gains 2 x 8
    assert c.flops == 0 and c.bytes == 2 * (2 * 160 + 16 + 2 * 160)
    fb = qk_norm_rope_cost(10, 16, 2, mode="fwd+bwd", elem_bytes=4)
    assert fb.flops == 0 and fb.bytes == 4 * (2 * 320 + 16) + 4 * (2 * 320 + 16 + 320 + 16)
    with pytest.raises(ValueError, match="^channels: 16 is not a multiple of num_heads = 3"):
        qk_norm_rope_cost(10, 16, 3)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def test_attention_small_case_by_hand():
    g = dict(batch=2, frames=3, tokens_per_frame=4, num_heads=2, head_dim=8)  # C = 16, N = 12
    sp = attention_cost("spatial", **g)
    assert sp.flops == 4 * (2 * 3) * 2 * 4 * 4 * 8 == 6144
    assert sp.bytes == 2 * (2 * 12 * 16) * 4 == 3072  # qkv (3C) in + o (C) out per token, bf16
    assert attention_cost("temporal", **g).flops == 4 * (2 * 4) * 2 * 3 * 3 * 8
    assert attention_cost("temporal", **g).bytes == 3072
    assert attention_cost("full", **g).flops == 4 * 2 * 2 * 12 * 12 * 8
    cr = attention_cost("cross", text_len=5, **g)
    assert cr.flops == 4 * 2 * 2 * 12 * 5 * 8
    assert cr.bytes == 2 * (2 * 12 * 16 * 2 + 2 * 5 * 2 * 16)  # q, o per token; kv per text token
    # fwd+bwd: fwd + lse write; bwd reads q,k,v,o,dO,lse, writes dq,dk,dv
    fb = attention_cost("spatial", mode="fwd+bwd", **g)
    lse = 4 * 2 * 12 * 2
    q, kv = 2 * 12 * 16, 2 * 2 * 12 * 16
    assert fb.bytes == 3072 + lse + 2 * (q + kv + 2 * q) + lse + 2 * (q + kv)
    assert attention_cost("spatial", elem_bytes=dtype_bytes("fp32"), **g).bytes == 2 * sp.bytes
    for kind in ("spatial", "temporal", "full", "cross"):
        f = attention_cost(kind, **g)
        # backward: 5 matmuls when S = Q K^T is recomputed, the 4 gradient matmuls when P was stored
        assert attention_cost(kind, mode="fwd+bwd", **g).flops == 3.5 * f.flops
        eager = attention_cost(kind, mode="fwd+bwd", backward="eager", **g)
        assert eager.flops == 3.0 * f.flops
        assert eager.bytes == attention_cost(kind, mode="fwd+bwd", **g).bytes  # bytes: the fused bound either way


def test_cross_attention_counts_the_text_keys_computed():
    g = dict(batch=2, frames=3, tokens_per_frame=4, num_heads=2, head_dim=8, text_len=5)  # C = 16, N = 12
    padded = attention_cost("cross", **g)
    assert attention_cost("cross", kv_lens=[5, 5], **g) == padded
    valid = attention_cost("cross", kv_lens=[5, 2], **g)
    assert valid.flops == 4 * 2 * 8 * 12 * (5 + 2)  # H * D * N queries * keys per sample
    assert valid.bytes == 2 * (2 * 2 * 12 * 16 + 2 * (5 + 2) * 16)  # q, o per token; kv per key computed
    for mode in ("fwd", "fwd+bwd"):
        fb = dict(g, mode=mode)
        assert attention_cost("cross", kv_lens=[5, 2], **fb).flops == attention_cost("cross", **fb).flops * 7 / 10
    # a block passes them on to its cross-attention only (the text projection runs over all L)
    kw = dict(hidden_size=16, num_heads=2, batch=2, frames=3, tokens_per_frame=4, text_len=5, mode="fwd+bwd")
    drop = block_cost("stdit", **kw).flops - block_cost("stdit", kv_lens=[5, 2], **kw).flops
    assert drop == attention_cost("cross", mode="fwd+bwd", **g).flops * 3 / 10


def test_attention_backward_reaches_blocks_and_models():
    v = dict(frames=16, height=256, width=256, batch=2, mode="train_step")
    recompute, eager = model_cost("stdit", **v), model_cost("stdit", attention_backward="eager", **v)
    attn_fwd = sum(
        attention_cost(k, batch=2, frames=16, tokens_per_frame=256, num_heads=H, head_dim=D).flops
        for k in ("spatial", "temporal", "cross")
    )
    assert recompute.flops - eager.flops == DEPTH * 0.5 * attn_fwd
    assert recompute.bytes == eager.bytes
    assert model_cost("stdit", attention_backward="eager", frames=16, height=256, width=256) == model_cost(
        "stdit", frames=16, height=256, width=256
    )  # forward only: no backward to differ


def test_attention_intensities():
    """Forward intensities (FLOP/byte at bf16): temporal T/2 (8 at 16 frames, 32 at 64), cross
    N*L/(N+L) (~119 for 120 text tokens), spatial S/2: against an H100's ridge of ~295 temporal and
    cross attention are memory-bound, spatial attention at S = 1024 compute-bound."""
    xl = dict(num_heads=H, head_dim=D, batch=2)
    assert attention_cost("temporal", frames=16, tokens_per_frame=256, **xl).intensity == 8.0
    assert attention_cost("temporal", frames=64, tokens_per_frame=1024, **xl).intensity == 32.0
    for S in (256, 1024):
        N = 16 * S
        cross = attention_cost("cross", frames=16, tokens_per_frame=S, text_len=120, **xl).intensity
        assert cross == pytest.approx(N * L / (N + L), rel=1e-15)  # measured: 0 (float64 rounding only)
    for S in (256, 1024, 4096):
        assert attention_cost("spatial", frames=16, tokens_per_frame=S, **xl).intensity == S / 2


def test_small_ops():
    lin = linear_cost(10, 3, 5)
    assert lin.flops == 2 * 10 * 3 * 5
    assert lin.bytes == 2 * (10 * 3 + 3 * 5 + 5 + 10 * 5)
    assert linear_cost(10, 3, 5, bias=False).bytes == 2 * (10 * 3 + 3 * 5 + 10 * 5)
    assert linear_cost(10, 3, 5, mode="fwd+bwd").flops == 3 * lin.flops
    assert linear_cost(10, 3, 5, mode="fwd+bwd", needs_input_grad=False).flops == 2 * lin.flops
    ln = layernorm_modulate_cost(7, 4, batch=2)
    assert ln.flops == 0 and ln.bytes == 2 * (2 * 2 * 7 * 4 + 2 * 2 * 4)
    gr = gated_residual_cost(7, 4, batch=2)
    assert gr.bytes == 2 * (3 * 2 * 7 * 4 + 2 * 4)
    assert gated_residual_cost(7, 4, batch=2, gated=False).bytes == 2 * 3 * 2 * 7 * 4
    assert gated_residual_cost(7, 4, batch=2, gated=False, mode="fwd+bwd").bytes == 2 * 3 * 2 * 7 * 4
    assert gated_residual_cost(7, 4, batch=2, mode="fwd+bwd").bytes > gr.bytes


def test_cost_arithmetic_and_dtypes():
    a, b = Cost(4.0, 2.0), Cost(1.0, 1.0)
    assert a + b == Cost(5.0, 3.0)
    assert 2 * a == a * 2 == Cost(8.0, 4.0)
    assert sum([a, b]) == Cost(5.0, 3.0)
    assert a.intensity == 2.0 and Cost(0, 0).intensity == 0.0
    with pytest.raises(Exception):
        a.flops = 1.0  # frozen
    assert [dtype_bytes(x) for x in ("bf16", "fp16", "fp32", "fp64")] == [2, 2, 4, 8]
    assert dtype_bytes(torch.bfloat16) == 2 and dtype_bytes(torch.float32) == 4 and dtype_bytes("torch.float64") == 8
    assert model_tokens(frames=64, height=512, width=512) == (64, 1024, (64, 64, 64))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, arg, valid",
    [
        (lambda: attention_cost("diagonal", batch=1, frames=2, tokens_per_frame=4, num_heads=1, head_dim=8), "kind",
         "temporal"),
        (lambda: attention_cost("spatial", batch=1, frames=2, tokens_per_frame=4, num_heads=1, head_dim=8,
                                mode="bwd"), "mode", "fwd+bwd"),
        (lambda: block_cost("latte", hidden_size=C, num_heads=H, batch=1, frames=2, tokens_per_frame=4), "model",
         "latte_spatial"),
        (lambda: model_cost("opensora", frames=16, height=256, width=256), "model", "stdit"),
        (lambda: model_cost("stdit", frames=16, height=256, width=256, mode="train"), "mode", "train_step"),
        (lambda: model_cost("stdit", size={"depth": 28}, frames=16, height=256, width=256), "size", "ModelSize"),
        (lambda: check_size(SIZES["XL/2"].replace(num_heads=7)), "size", "num_heads"),
        (lambda: linear_cost(4, 4, 4, mode="backward"), "mode", "fwd"),
        (lambda: attention_cost("spatial", batch=1, frames=2, tokens_per_frame=4, num_heads=1, head_dim=8,
                                mode="fwd+bwd", backward="flash"), "backward", "recompute"),
        (lambda: model_cost("stdit", frames=16, height=256, width=256, attention_backward="stored"),
         "attention_backward", "eager"),
        (lambda: dtype_bytes("int3"), "dtype", "bf16"),
    ],
)  # fmt: skip
def test_bad_names_raise(call, arg, valid):
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(f"{arg}:") and valid in msg


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="height"):
        model_cost("stdit", frames=16, height=250, width=256)
    with pytest.raises(ValueError, match="num_heads"):
        attention_cost("spatial", batch=1, frames=2, tokens_per_frame=4, num_heads=0, head_dim=8)
    with pytest.raises(ValueError, match="latent"):
        model_cost("dit", latent=(16, 31, 32))
    g = dict(batch=2, frames=2, tokens_per_frame=4, num_heads=1, head_dim=8, text_len=5)
    for lens in ([5], [5, 6], [0, 5], [5, 2, 1]):  # one length per sample, each in [1, text_len]
        with pytest.raises(ValueError, match=r"^kv_lens: expected 2 lengths in \[1, text_len = 5\]"):
            attention_cost("cross", kv_lens=lens, **g)
    with pytest.raises(ValueError, match="^kv_lens: only cross-attention"):
        attention_cost("spatial", kv_lens=[5, 5], **g)


@pytest.mark.parametrize("name", preset_names())
def test_a_model_reports_the_size_it_was_built_from(name):
    """model.size is what the cost model counts for a built model (the trainer's MFU reads it)."""
    with torch.device("meta"):
        model = from_preset(name)
    assert model.size == split_preset(name)[1]
    assert model.family == name.split("-")[0]
