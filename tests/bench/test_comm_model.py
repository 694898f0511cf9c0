"""stdit.bench.comm_model against arithmetic written out here, independently of the module, and
its report (stdit.bench.comm_report)."""

import math
from pathlib import Path

import pytest

from stdit.bench import comm_model as cm
from stdit.bench import comm_report
from stdit.models.costs import model_tokens, stdit_param_count
from stdit.models.sizes import SIZES
from stdit.train.sequence_parallel import MODES, comm_bytes_per_block

# STDiT-XL/2 at 64x512x512: latent 64 x 64 x 64, patch (1, 2, 2)
T, S, C, DEPTH, B = 64, 1024, 1152, 28, 1
XL2_PARAMS = 759_620_768
SHAPE = "64x512x512"
REL = 1e-15  # byte counts and times agree to float64 rounding (measured: 0); a few ulps


def _ulysses_expected(sp: int, checkpoint: bool = True, attentions: int = 1) -> float:
    """Ulysses: all-to-alls around spatial attention (attentions=1); generic Ulysses: around both (2)."""
    tokens_local = B * T * S / sp  # 65536 / sp
    per_block_fwd = attentions * (3 * C + C) * tokens_local * 2 * (sp - 1) / sp  # qkv + out, bf16
    passes = 3 if checkpoint else 2  # fwd + bwd (+ recomputed fwd)
    return passes * DEPTH * per_block_fwd


def _dsp_expected(sp: int, checkpoint: bool = True) -> float:
    tokens_local = 65536 / sp
    per_block_fwd = 2 * C * tokens_local * 2 * (sp - 1) / sp  # to S-sharding and back, C per token each
    return (3 if checkpoint else 2) * DEPTH * per_block_fwd


@pytest.mark.parametrize("sp", [2, 8])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_sp_bytes_match_hand_arithmetic(sp, checkpoint):
    u = cm.sp_comm("ulysses", SHAPE, sp, batch=B, checkpoint=checkpoint)
    g = cm.sp_comm("ulysses_generic", SHAPE, sp, batch=B, checkpoint=checkpoint)
    d = cm.sp_comm("dsp", SHAPE, sp, batch=B, checkpoint=checkpoint)
    assert u["bytes_per_rank"] == pytest.approx(_ulysses_expected(sp, checkpoint), rel=REL)
    assert g["bytes_per_rank"] == pytest.approx(_ulysses_expected(sp, checkpoint, attentions=2), rel=REL)
    assert d["bytes_per_rank"] == pytest.approx(_dsp_expected(sp, checkpoint), rel=REL)
    assert d["bytes_per_rank"] / u["bytes_per_rank"] == pytest.approx(0.5, abs=1e-15)
    assert d["bytes_per_rank"] / g["bytes_per_rank"] == pytest.approx(0.25, abs=1e-15)
    passes = 3 if checkpoint else 2
    assert u["n_collectives"] == passes * DEPTH * 2
    assert g["n_collectives"] == passes * DEPTH * 4
    assert d["n_collectives"] == passes * DEPTH * 2
    # concrete numbers: sp=8 generic Ulysses = 11,098,128,384 B with checkpointing
    if sp == 8 and checkpoint:
        assert g["bytes_per_rank"] == 11_098_128_384
        assert u["bytes_per_rank"] == 11_098_128_384 / 2
        assert d["bytes_per_rank"] == 11_098_128_384 / 4


@pytest.mark.parametrize("shape", [SHAPE, "16x256x256", "360x512x512"])
@pytest.mark.parametrize("sp", [2, 4, 8, 16])
def test_modelled_bytes_are_what_sequence_parallel_sends(shape, sp):
    """The model's forward bytes per block are comm_bytes_per_block's, whose equality with the bytes the
    all-to-alls really send is tested in tests/train/test_sequence_parallel.py: same names, same definitions."""
    name, frames, height, width = cm.parse_shape(shape)
    Tt, St, _ = model_tokens(frames=frames, height=height, width=width, patch_size=SIZES["XL/2"].patch_size)
    for mode in MODES:
        modelled = cm.sp_comm(mode, shape, sp, checkpoint=False)["bytes_fwd"] / DEPTH
        counted = comm_bytes_per_block(mode, batch=1, frames=Tt, tokens_per_frame=St, hidden=C, sp=sp)
        assert modelled == pytest.approx(counted, rel=REL), (name, sp, mode)


def test_other_sp_schemes():
    for sp in (2, 8):
        g = cm.sp_comm("ulysses_generic", SHAPE, sp)["bytes_per_rank"]
        assert cm.sp_comm("opensora_sp", SHAPE, sp)["bytes_per_rank"] == pytest.approx(g * 10 / 8, rel=REL)
    # batch and fp32 activations scale linearly
    assert cm.sp_comm("dsp", SHAPE, 4, batch=3, act_dtype="fp32")["bytes_per_rank"] == pytest.approx(
        6 * cm.sp_comm("dsp", SHAPE, 4)["bytes_per_rank"], rel=REL
    )
    assert cm.sp_comm("ulysses", SHAPE, 1)["bytes_per_rank"] == 0


def test_feasibility():
    # 16 heads: Ulysses and Open-Sora SP stop at 16; DSP needs T and S divisible
    assert cm.sp_comm("ulysses", SHAPE, 16)["feasible"]
    assert not cm.sp_comm("ulysses", SHAPE, 32)["feasible"]
    assert "heads" in cm.sp_comm("opensora_sp", SHAPE, 64)["infeasible_reason"]
    assert cm.sp_comm("dsp", SHAPE, 64)["feasible"]
    assert not cm.sp_comm("dsp", "16x512x512", 32)["feasible"]


def test_sizes_follow_the_model_size():
    """The parameter count (checked against the models in tests/models/test_costs.py) and the depth
    and width come from the ModelSize."""
    assert stdit_param_count() == XL2_PARAMS
    assert cm.dp_comm("zero2", 2)["params"] == XL2_PARAMS
    small = SIZES["XL/2"].replace(depth=3, hidden_size=144, num_heads=2, caption_channels=64)
    assert cm.dp_comm("zero2", 2, size=small)["params"] == stdit_param_count(small)
    assert cm.dp_comm("fsdp", 2, size=small)["n_collectives"] == 3 * (3 + 1)
    u = cm.sp_comm("dsp", SHAPE, 8, size=small)["bytes_per_rank"]
    assert u == pytest.approx(_dsp_expected(8) * (3 * 144) / (DEPTH * C), rel=REL)


@pytest.mark.parametrize("dp", [2, 8, 64])
def test_dp_bytes(dp):
    P, f = XL2_PARAMS, (dp - 1) / dp
    fsdp = cm.dp_comm("fsdp", dp, param_dtype="bf16", grad_dtype="fp32")
    assert fsdp["bytes_per_rank"] == pytest.approx((2 * P * 2 + P * 4) * f, rel=REL)
    assert fsdp["params"] == P
    assert cm.dp_comm("zero2", dp)["bytes_per_rank"] == pytest.approx(2 * P * 2 * f, rel=REL)
    assert cm.dp_comm("ddp", dp, grad_dtype="fp32")["bytes_per_rank"] == pytest.approx(2 * P * 4 * f, rel=REL)
    assert cm.dp_comm("fsdp", dp)["n_collectives"] == 3 * (DEPTH + 1)


def test_rows_monotonic_and_node_rule():
    rows = cm.comm_rows(SHAPE, cm.DEGREES, cm.SCHEMES)
    assert len(rows) == len(cm.DEGREES) * len(cm.SCHEMES)
    by = {(r["scheme"], r["degree"]): r for r in rows}
    for sc in cm.SCHEMES:
        b = [by[sc, d]["bytes_per_rank"] for d in cm.DEGREES]
        if sc in cm.SP_SCHEMES:  # local tokens shrink faster than (sp-1)/sp grows
            assert all(x > y for x, y in zip(b, b[1:])), sc
        else:  # (dp-1)/dp grows towards 1
            assert all(x < y for x, y in zip(b, b[1:])), sc
            limit = cm.dp_comm(sc, 10**9)["bytes_per_rank"]  # (dp-1)/dp -> 1
            assert b[-1] < limit < b[-1] * 64 / 63 * (1 + 1e-9)
    # 8 GPUs: degrees above 8 do not fit
    assert by["dsp", 8]["comm_s_8xH100"] is not None and by["dsp", 16]["comm_s_8xH100"] is None
    # within a node both clusters agree and the rate is NVLink's effective bandwidth
    r8 = by["dsp", 8]
    nv = cm.NVLINK4_BW * cm.NVLINK_EFFICIENCY
    assert r8["comm_s_8xH100"] == r8["comm_s_64xH100"]
    expected = r8["bytes_per_rank"] / nv + r8["n_collectives"] * cm.LATENCY_INTRA_S
    assert r8["comm_s_64xH100"] == pytest.approx(expected, rel=REL)
    # above 8 the group crosses nodes: all-to-all bounded by the IB share, rings at IB rate
    ib = cm.IB_NDR_BW * cm.IB_EFFICIENCY
    r16 = by["dsp", 16]
    off = (16 - 8) / 15
    assert r16["link"] == "nvlink+ib" and r8["link"] == "nvlink"
    assert r16["comm_s_64xH100"] == pytest.approx(
        max(r16["bytes_per_rank"] * (1 - off) / nv, r16["bytes_per_rank"] * off / ib)
        + r16["n_collectives"] * cm.LATENCY_INTER_S, rel=REL
    )
    z = by["zero2", 16]
    expected = z["bytes_per_rank"] / ib + z["n_collectives"] * cm.LATENCY_INTER_S
    assert z["comm_s_64xH100"] == pytest.approx(expected, rel=REL)
    # effective bandwidth drops when crossing nodes
    assert r16["bytes_per_rank"] / r16["comm_s_64xH100"] < r8["bytes_per_rank"] / r8["comm_s_64xH100"] / 2
    # compute: SP divides the step, DP does not
    assert by["dsp", 8]["compute_s"] == pytest.approx(by["dsp", 2]["compute_s"] / 4, rel=REL)
    assert by["zero2", 8]["compute_s"] == by["zero2", 64]["compute_s"]
    d8 = by["dsp", 8]
    assert d8["comm_compute_ratio"] == pytest.approx(d8["comm_s_64xH100"] / d8["compute_s"], rel=REL)
    assert by["ulysses", 32]["feasible"] is False and by["dsp", 32]["feasible"] is True


def test_dsp_vs_ulysses_summary():
    s = cm.dsp_vs_ulysses(shapes=(SHAPE, "16x256x256"), degrees=(2, 8, 64))
    for r in s["rows"]:
        assert r["dsp_over_ulysses"] == pytest.approx(0.5, rel=REL)
        assert r["dsp_over_ulysses_generic"] == pytest.approx(0.25, rel=REL)
    assert s["claims"]["inference_s"] == dict(dsp=22.0, ulysses=45.0, single_gpu=106.0)
    proj = s["inference_projection"]
    assert proj["dsp"]["bytes_per_forward"] * 2 == pytest.approx(proj["ulysses"]["bytes_per_forward"], rel=REL)
    assert proj["dsp"]["bytes_per_forward"] * 4 == pytest.approx(proj["ulysses_generic"]["bytes_per_forward"], rel=REL)


def test_markdown_and_plot(tmp_path):
    rows = cm.comm_rows([SHAPE, "16x512x512"], (2, 8, 16, 64))
    md = comm_report.markdown_section(rows)
    assert md.startswith("## ") and "### 64x512x512" in md and "### DSP vs Ulysses" in md
    assert "| scheme |" in md and "| ulysses_generic |" in md and "DSP / generic" in md and "22 s" in md
    assert "DSP / Ulysses = 0.5 and DSP / generic = 0.25 in every row above" in md
    out = comm_report.plot(rows, tmp_path / "comm.png", shape=SHAPE)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comm.png"]  # no temporary file left
    with pytest.raises(ValueError, match="shape"):
        comm_report.plot(rows, tmp_path / "x.png", shape="16x256x256")  # not in the rows


def test_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        cm.comm_rows(SHAPE, (2,), ("megatron",))
    with pytest.raises(ValueError, match="scheme"):
        cm.sp_comm("fsdp", SHAPE, 2)
    with pytest.raises(ValueError, match="degree"):
        cm.comm_rows(SHAPE, (0,))
    with pytest.raises(ValueError, match="degree"):
        cm.dp_comm("ddp", -1)
    with pytest.raises(ValueError, match="shape"):
        cm.comm_rows("huge", (2,))
    with pytest.raises(ValueError, match="shape"):
        cm.sp_comm("dsp", "16x500x512", 2)  # not a multiple of the VAE downsampling
    with pytest.raises(ValueError, match="batch"):
        cm.sp_comm("dsp", SHAPE, 2, batch=0)
    with pytest.raises(ValueError, match="size: expected a stdit.models.sizes.ModelSize"):
        cm.comm_rows(SHAPE, (2,), size=dict(width=3))
    with pytest.raises(ValueError, match="rows"):
        comm_report.markdown_section([])
    with pytest.raises(ValueError, match="rows"):
        comm_report.plot([], "unused.png")
    assert math.isfinite(cm.collective_time(1e9, 1, 4, "ring", cm.H100_1NODE))
    with pytest.raises(ValueError, match="kind"):
        cm.collective_time(1e9, 1, 4, "tree", cm.H100_1NODE)


def test_hybrid_step_sums_sp_and_world_dp():
    h = cm.hybrid_step(SHAPE, "dsp", 8, "zero2", 8)
    assert h["gpus"] == 64 and h["feasible"]
    assert h["sp_bytes_per_rank"] == pytest.approx(_dsp_expected(8), rel=REL)
    assert h["dp_bytes_per_rank"] == pytest.approx(2 * XL2_PARAMS * 2 * 63 / 64, rel=REL)  # grads reduced over all 64 ranks
    assert h["bytes_per_rank"] == pytest.approx(h["sp_bytes_per_rank"] + h["dp_bytes_per_rank"], rel=REL)
    with pytest.raises(ValueError, match="sp"):
        cm.hybrid_step(SHAPE, "dsp", 0, "zero2", 8)


def test_report_regenerates_the_committed_one(tmp_path):
    """reports/parallel-model/README.md is this report's output: regenerating it changes nothing."""
    readme = comm_report.write_report(tmp_path)
    committed = Path(__file__).resolve().parents[2] / "reports" / "parallel-model" / "README.md"
    assert readme.read_text() == committed.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "comm_bytes_64x512x512.png"]
