"""Sequence parallelism (DSP, Ulysses, generic Ulysses) for STDiT and STDiT3 is exactly one device.

Sequence parallelism only hooks the model's attention modules and sets its token layout; these
tests check that the hooked model equals an untouched one, forward, backward and over AdamW steps.

One torchrun launch (2 gloo CPU processes) runs tests/train/sp_worker.py, which writes max abs
diffs and the counted all-to-all bytes and calls to JSON; the tests below assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from stdit.train.sequence_parallel import MODES, comm_bytes_per_block, split_sizes

WORKER = Path(__file__).with_name("sp_worker.py")
SHAPES = ("even", "odd_frames", "uneven_S")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "sp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_grads_match_single_device(results, mode, shape):
    # float64, reference attention. Measured: outputs equal, gradients within 6e-14 at scales 54-94
    # (largest relative 1.1e-15: dsp/even, 5.7e-14 at 54).
    r = results[f"{mode}/{shape}"]
    assert r["out_diff"] <= 3e-7 * max(1.0, r["out_scale"])  # the output is float32: 2 ulp
    assert r["grad_diff"] <= 1e-14 * max(1.0, r["grad_scale"])
    assert r["shard_diff"] <= 3e-7 * max(1.0, r["out_scale"])  # gather_output=False: this rank's tokens


@pytest.mark.parametrize("mode", MODES)
def test_float32_sdpa_uneven(results, mode):
    r = results[f"{mode}/uneven_S/fp32_sdpa"]  # measured: outputs equal, gradients 1.9e-5 at scale 58
    assert r["out_diff"] <= 3e-7 * max(1.0, r["out_scale"])
    assert r["grad_diff"] <= 4e-6 * max(1.0, r["grad_scale"])


@pytest.mark.parametrize("mode", MODES)
def test_adamw_steps_match(results, mode):
    r = results[f"{mode}/steps/odd_frames"]  # 3 AdamW steps, activation checkpointing on
    assert r["param_moved"] > 1e-4
    assert r["param_diff"] <= 3e-10  # measured 3.1e-11 (dsp), 1.6e-11 (ulysses), 2.1e-11 (generic)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_recompute_uses_its_own_split(results, mode):
    r = results[f"{mode}/interleaved"]  # two shapes forward, then one backward
    assert r["grad_diff"] <= 1e-14 * max(1.0, r["grad_scale"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_counted_bytes_equal_formula(results, mode, shape):
    r = results[f"{mode}/{shape}"]
    assert r["bytes_per_block_rank"] == 0  # every rank: counted == comm_bytes_per_block(rank=r)
    assert r["bytes_per_block_counted_avg"] == r["bytes_per_block_formula_avg"]


def test_all_to_alls_per_block(results):
    # ulysses exchanges around spatial attention only: temporal attention is local to its positions
    expected = {"dsp": 2, "ulysses": 2, "ulysses_generic": 4}
    for mode in MODES:
        for shape in SHAPES:
            assert results[f"{mode}/{shape}"]["calls_per_block"] == expected[mode], (mode, shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_dsp_sends_half_of_ulysses_and_a_quarter_of_generic_ulysses(results, shape):
    counted = {mode: results[f"{mode}/{shape}"]["bytes_per_block_counted_avg"] for mode in MODES}
    assert counted["dsp"] / counted["ulysses"] == 0.5  # exact at these shapes, uneven ones included
    assert counted["dsp"] / counted["ulysses_generic"] == 0.25


def test_refusals(results):
    msg = results["ulysses_heads_error"]
    assert msg is not None and "num_heads = 3" in msg and "sp = 2" in msg
    msg = results["dsp_empty_shard_error"]
    assert msg is not None and "1 frames" in msg and "sp = 2" in msg
    assert results["dsp_single_frame_fallback_diff"] == 0.0  # gathered: replicated compute, exact
    assert results["dsp_single_frame_fallback_grad_diff"] < 1e-12  # each rank's gradient / sp, summed


# ------------------------------------------------------------------------------------------------
# STDiT3 (x_mask, fps, pixel sizes, q/k gains, RoPE; an input padded up to the patch)
# ------------------------------------------------------------------------------------------------

STDIT3_CASES = ("odd_frames/checkpoint", "uneven_S_padded")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", STDIT3_CASES)
def test_stdit3_forward_and_grads_match_single_device(results, mode, case):
    # float64, reference attention, x_mask with conditioning frames on both ranks. Measured: outputs
    # equal, gradients within 1.7e-13 at scales 156-230 (relative 1.1e-15), q/k gains' 3.9e-15 at 2.3.
    r = results[f"stdit3/{mode}/{case}"]
    assert r["out_diff"] <= 3e-7 * max(1.0, r["out_scale"])  # the output is float32: 2 ulp
    assert r["grad_diff"] <= 1e-14 * max(1.0, r["grad_scale"])
    assert r["qk_grad_scale"] > 0.1  # the q/k RMSNorm gains do get gradients ...
    assert r["qk_grad_diff"] <= 1e-14 * max(1.0, r["qk_grad_scale"])  # ... the single-device ones
    assert r["shard_diff"] <= 1e-13 * max(1.0, r["shard_scale"])  # float64 tokens, gather_output=False


def test_stdit3_without_x_mask(results):
    r = results["stdit3/dsp/odd_frames/no_x_mask"]
    assert r["out_diff"] <= 3e-7 * max(1.0, r["out_scale"])
    assert r["grad_diff"] <= 1e-14 * max(1.0, r["grad_scale"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", STDIT3_CASES)
def test_stdit3_exchanges_per_block_pair(results, mode, case):
    # one unit of depth = spatial_blocks[i] + temporal_blocks[i]: the same exchanges as an STDiT block
    r = results[f"stdit3/{mode}/{case}"]
    assert r["calls_per_block"] == {"dsp": 2, "ulysses": 2, "ulysses_generic": 4}[mode]
    assert r["bytes_per_block_rank"] == 0  # every rank: counted == comm_bytes_per_block(rank=r), padded grid
    assert r["bytes_per_block_counted_avg"] == r["bytes_per_block_formula_avg"]


def test_stdit3_single_frame_replicates(results):
    assert results["stdit3/dsp/single_frame_diff"] == 0.0
    assert results["stdit3/dsp/single_frame_grad_diff"] < 1e-12


def test_formula_closed_form():
    B, T, S, C = 1, 64, 1024, 1152  # STDiT-XL/2 at 64x512x512
    for sp in (2, 8):
        d = comm_bytes_per_block("dsp", batch=B, frames=T, tokens_per_frame=S, hidden=C, sp=sp)
        u = comm_bytes_per_block("ulysses", batch=B, frames=T, tokens_per_frame=S, hidden=C, sp=sp)
        g = comm_bytes_per_block("ulysses_generic", batch=B, frames=T, tokens_per_frame=S, hidden=C, sp=sp)
        assert d == 2 * B * T * S * C * (sp - 1) / sp**2 * 2
        assert u == 2 * d and g == 4 * d
    assert split_sizes(5, 2) == [3, 2] and split_sizes(15, 4) == [4, 4, 4, 3]
    with pytest.raises(ValueError, match="mode"):
        comm_bytes_per_block("ring", batch=1, frames=1, tokens_per_frame=1, hidden=1, sp=1)
