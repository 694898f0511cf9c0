"""stdit.bench.costs (analytic FLOPs / bytes) and stdit.bench.devices (peaks): fast, CPU only."""

import math
import time

import pytest
import torch

from stdit.bench.costs import (
    Cost,
    achieved,
    attention_cost,
    block_cost,
    dtype_bytes,
    gated_residual_cost,
    layernorm_modulate_cost,
    linear_cost,
    model_cost,
    model_tokens,
    opensora_flop_ratios,
    roofline,
)
from stdit.bench.devices import PEAKS, device_peaks, match_device, probe_peaks

C, H, D, DEPTH, L, CH, CAP = 1152, 16, 72, 28, 120, 4608, 4096


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
    got = model_cost(model, frames=16, height=256, width=256, batch=1).flops
    assert got == pytest.approx(_hand_flops(model, 16, 256), rel=1e-12)
    # batch scales linearly
    assert model_cost(model, frames=16, height=256, width=256, batch=3).flops == pytest.approx(3 * got, rel=1e-12)
    # the latent spelling is the same video
    assert model_cost(model, latent=(16, 32, 32)).flops == got


def test_opensora_flop_ratios_match_facts():
    rows = opensora_flop_ratios()
    assert [r["setting"] for r in rows] == ["16x256x256", "16x512x512", "64x512x512"]
    assert [r["batch"] for r in rows] == [8, 8, 4]
    for r, want in zip(rows, (1.14, 2.13, 6.37)):
        assert abs(r["flop_ratio"] - want) <= 0.01, r
        assert abs(r["flop_ratio_blocks"] - want) <= 0.01, r
        assert r["flop_ratio"] == pytest.approx(r["flops_dit"] / r["flops_stdit"])
        assert r["flops_dit"] == pytest.approx(_hand_flops("dit", r["frames"], (r["resolution"] // 16) ** 2))
    assert [r["published_ratio"] for r in rows] == [0.97, 1.71, 5.0]
    assert [r["published_dit_samples_per_s"] for r in rows] == [7.20, 0.85, 0.08]
    assert [r["published_stdit_samples_per_s"] for r in rows] == [7.00, 1.45, 0.40]


def test_latte_is_alternating_pixart_blocks():
    kw = dict(hidden=C, heads=H, batch=2, frames=16, tokens_per_frame=256, text_len=L)
    sp, tp = block_cost("latte_spatial", **kw), block_cost("latte_temporal", **kw)
    dit = block_cost("dit", **kw)
    N = 16 * 256
    # a Latte block is a PixArt block (with cross-attention) whose self-attention is spatial/temporal
    assert dit.flops - sp.flops == pytest.approx(2 * 4 * H * D * (N * N - 16 * 256 * 256))
    assert dit.flops - tp.flops == pytest.approx(2 * 4 * H * D * (N * N - 256 * 16 * 16))
    # STDiT's block = spatial PixArt block + temporal attention (qkv, attn, proj) + a gated residual
    st = block_cost("stdit", **kw)
    assert st.flops - sp.flops == pytest.approx(2 * (2 * N * 4 * C * C) + 2 * 4 * H * D * 256 * 16 * 16)
    whole = model_cost("latte", frames=16, height=256, width=256, batch=2, blocks_only=True)
    assert whole.flops == pytest.approx(14 * (sp.flops + tp.flops))
    assert whole.bytes == pytest.approx(14 * (sp.bytes + tp.bytes))


def test_train_step_and_checkpoint():
    v = dict(frames=16, height=256, width=256, batch=2)
    fwd = model_cost("stdit", **v)
    step = model_cost("stdit", mode="train_step", **v)
    ckpt = model_cost("stdit", mode="train_step", checkpoint=True, **v)
    assert 3.0 < step.flops / fwd.flops < 3.5  # linears 3x, attention 3.5x
    assert step.bytes > 2 * fwd.bytes
    blocks_fwd = model_cost("stdit", blocks_only=True, **v)
    assert ckpt.flops - step.flops == pytest.approx(blocks_fwd.flops)
    assert ckpt.bytes - step.bytes == pytest.approx(blocks_fwd.bytes)
    # ~96% of STDiT's forward FLOPs at 16x256 are Linears (attention is the rest)
    attn = sum(
        attention_cost(k, batch=2, frames=16, tokens_per_frame=256, heads=H, head_dim=D).flops
        for k in ("spatial", "temporal", "cross")
    )
    assert 0.9 < 1 - DEPTH * attn / fwd.flops < 0.98


def test_linear_flops_match_model_parameters():
    """2 * (weights of the Linears a token passes through) * tokens = the cost model's Linear FLOPs."""
    from stdit.models import STDIT_PRESETS, STDiT, count_parameters

    with torch.device("meta"):
        model = STDiT(**dict(STDIT_PRESETS["STDiT-XL/2"], input_size=(16, 32, 32), caption_channels=CAP))
    assert count_parameters(model) == 759_620_768
    T, S, B = 16, 256, 2
    N = T * S
    blk = model.blocks[0]
    linears = {n: m for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)}
    per_token = sum(m.weight.numel() for n, m in linears.items() if n != "cross_attn.kv_linear")
    per_text = linears["cross_attn.kv_linear"].weight.numel()
    attn = sum(
        attention_cost(k, batch=B, frames=T, tokens_per_frame=S, heads=H, head_dim=D).flops
        for k in ("spatial", "temporal", "cross")
    )
    block = block_cost("stdit", hidden=C, heads=H, batch=B, frames=T, tokens_per_frame=S, text_len=L)
    assert block.flops - attn == pytest.approx(2 * B * (per_token * N + per_text * L), rel=1e-12)
    # block parameters ~ the weights the cost model reads (bf16, forward: each weight once)
    w_block = sum(p.numel() for p in blk.parameters())
    assert w_block == pytest.approx(per_token + per_text, rel=0.01)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def test_attention_small_case_by_hand():
    g = dict(batch=2, frames=3, tokens_per_frame=4, heads=2, head_dim=8)  # C = 16, N = 12
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
    assert attention_cost("spatial", elem_bytes=4, **g).bytes == 2 * sp.bytes
    for kind in ("spatial", "temporal", "full", "cross"):
        f = attention_cost(kind, **g)
        assert attention_cost(kind, mode="fwd+bwd", **g).flops == pytest.approx(3.5 * f.flops)


def test_attention_intensities_match_facts():
    xl = dict(heads=H, head_dim=D, batch=2)
    t16 = attention_cost("temporal", frames=16, tokens_per_frame=256, **xl).intensity
    t64 = attention_cost("temporal", frames=64, tokens_per_frame=1024, **xl).intensity
    assert 8 <= t16 <= 32 and 8 <= t64 <= 32
    assert t16 == pytest.approx(8.0) and t64 == pytest.approx(32.0)
    cross = attention_cost("cross", frames=16, tokens_per_frame=1024, text_len=120, **xl).intensity
    assert cross == pytest.approx(119, abs=1)
    cross_small = attention_cost("cross", frames=16, tokens_per_frame=256, text_len=120, **xl).intensity
    assert cross_small == pytest.approx(119, abs=3)
    for S in (256, 1024, 4096):
        assert attention_cost("spatial", frames=16, tokens_per_frame=S, **xl).intensity == pytest.approx(S / 2)
    # H100 ridge ~295 FLOP/B: temporal and cross are memory-bound, spatial at S=1024 compute-bound
    h100 = PEAKS["H100-SXM"]
    ridge = h100["bf16"] / h100["bytes_per_s"]
    assert 290 < ridge < 300
    assert t16 < ridge and cross < ridge
    assert attention_cost("spatial", frames=16, tokens_per_frame=1024, **xl).intensity > ridge


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


def test_roofline_and_achieved():
    c = Cost(2e12, 1e9)
    r = roofline(c, 1e15, 1e12)
    assert r["min_time_s"] == pytest.approx(2e-3) and r["bound"] == "compute"
    assert r["intensity"] == 2000 and r["ridge"] == 1000
    assert roofline(Cost(1e9, 1e9), 1e15, 1e12)["bound"] == "memory"
    a = achieved(c, 4e-3, 1e15, 1e12)
    assert a["tflops"] == pytest.approx(500) and a["gbs"] == pytest.approx(250)
    assert a["pct_roofline"] == pytest.approx(50)


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------


def test_match_device():
    assert match_device("NVIDIA H100 80GB HBM3")["bytes_per_s"] == 3.35e12
    assert match_device("NVIDIA H100 80GB HBM3")["bf16"] == 989e12
    assert match_device("NVIDIA H200")["bytes_per_s"] == 4.8e12
    assert match_device("NVIDIA A100-SXM4-80GB")["bf16"] == 312e12
    assert match_device("NVIDIA A100-SXM4-80GB")["bytes_per_s"] == 2.039e12
    assert match_device("NVIDIA H800")["bf16"] == 989e12
    assert match_device("NVIDIA H100 PCIe")["bf16"] == 756e12
    assert match_device("NVIDIA H100 PCIe")["bytes_per_s"] == 2.0e12
    assert match_device("Tesla T4") is None and match_device("cpu") is None


def test_device_peaks_cpu_is_quick():
    t0 = time.perf_counter()
    p = device_peaks("cpu", torch.bfloat16)
    assert time.perf_counter() - t0 < 4
    assert p["table"] is None and p["source"] == "probed"
    assert p["flops"] > 0 and p["bytes_per_s"] > 0 and math.isfinite(p["flops"])
    assert "float32" in p["probed"]["method"]
    q = device_peaks("cpu", probe=False)
    assert q["probed"] is None and q["flops"] is None


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, arg, valid",
    [
        (lambda: attention_cost("diagonal", batch=1, frames=2, tokens_per_frame=4, heads=1, head_dim=8), "kind",
         "temporal"),
        (lambda: attention_cost("spatial", batch=1, frames=2, tokens_per_frame=4, heads=1, head_dim=8, mode="bwd"),
         "mode", "fwd+bwd"),
        (lambda: block_cost("latte", hidden=C, heads=H, batch=1, frames=2, tokens_per_frame=4), "model",
         "latte_spatial"),
        (lambda: model_cost("opensora", frames=16, height=256, width=256), "model", "stdit"),
        (lambda: model_cost("stdit", frames=16, height=256, width=256, mode="train"), "mode", "train_step"),
        (lambda: linear_cost(4, 4, 4, mode="backward"), "mode", "fwd"),
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
    with pytest.raises(ValueError, match="heads"):
        attention_cost("spatial", batch=1, frames=2, tokens_per_frame=4, heads=0, head_dim=8)
    with pytest.raises(ValueError, match="latent"):
        model_cost("dit", latent=(16, 31, 32))
    with pytest.raises(ValueError, match="seconds"):
        probe_peaks("cpu", seconds=0)
