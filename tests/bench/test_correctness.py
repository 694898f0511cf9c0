"""The correctness check of not-timed cases (stdit.bench.correctness): specs capped from a case's
fields, a check that passes on our kernels and fails on a wrong one, and the worker process that
runs them (shared specs run once; a worker that hangs or dies costs its check, not the others)."""

import dataclasses

import pytest
import torch

from stdit.bench import correctness
from stdit.bench.suites import build_cases
from stdit.kernels import api

CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(
    api.availability("triton", CPU) is not None, reason="our Triton kernels need TRITON_INTERPRET=1 on a CPU"
)


def _cases(suite: str, only: str, size: str = "quick"):
    return build_cases(suite, size, CPU, only=only)


def test_specs_cap_the_case_dims():
    """Quick kernel cases check at B <= 2, T <= 4, S <= 24, H <= 2, L <= 8 with the head dim kept;
    blocks at C = H x D with the variant's switches; cases that are timed are not checked."""
    kernels = _cases("kernels", "temporal_attention-triton-16x256x256-fwd-")
    assert [correctness.check_spec(c)["dims"] for c in kernels] == [dict(B=1, T=4, S=24, N=96, H=2, D=72, L=8)]
    block = correctness.check_spec(_cases("blocks", "ours+compile-8x128x128-fwd+bwd")[0])
    assert block["dims"] == dict(B=2, T=4, S=24, N=96, C=144, H=2, D=72, L=8)
    assert (block["attention"], block["fused"], block["compiled"]) == ("triton", "triton", True)
    assert correctness.check_spec(_cases("fused", "gated_residual-triton-16x256x256-fwd-")[0])["dims"] == dict(B=1, N=96, C=288)
    timed = _cases("kernels", "temporal_attention-sdpa-")
    assert timed and not any(correctness.wants_check(c) for c in timed)
    assert all(correctness.wants_check(c) for c in kernels)


@needs_interpreter
@pytest.mark.parametrize("suite, only", [("kernels", "cross_attention-triton-4x64x64-fwd+bwd"),
                                         ("fused", "layernorm_modulate-triton-4x64x64-fwd+bwd"),
                                         ("blocks", "stdit_block-ours-4x64x64-fwd+bwd"),
                                         ("blocks", "stdit3_block-ours-4x64x64-fwd+bwd")])  # fmt: skip
def test_check_passes_on_our_kernels(suite, only):
    (case,) = _cases(suite, only, "tiny")
    rec = correctness.run_spec(correctness.check_spec(case))
    assert rec["result"] == "pass", rec
    # measured 2.2e-7 (cross), 2.2e-7 (layernorm_modulate), 3.8e-7 (block), 3.6e-7 (STDiT3 block pair)
    # against FP32_TOL = 8e-6
    assert 0 < rec["max_err"] <= rec["tol"] == correctness.FP32_TOL
    assert rec["dims"] == correctness.check_spec(case)["dims"] and rec["oracle"] == "reference, float64"


@needs_interpreter
def test_check_fails_on_a_wrong_kernel(monkeypatch):
    """The named backend is what is checked: a triton backend 0.1% off fails, and one that raises is
    an error record, not an exception."""
    (case,) = _cases("kernels", "temporal_attention-triton-4x64x64-fwd-", "tiny")
    spec = correctness.check_spec(case)
    triton = api._BACKENDS["triton"]
    monkeypatch.setitem(api._BACKENDS, "triton", dataclasses.replace(
        triton, self_attention=lambda *a, **k: triton.self_attention(*a, **k) * 1.001))  # fmt: skip
    rec = correctness.run_spec(spec)
    assert rec["result"] == "fail" and rec["max_err"] > rec["tol"], rec

    def broken(*a, **k):
        raise RuntimeError("launch\nfailed")

    monkeypatch.setitem(api._BACKENDS, "triton", dataclasses.replace(triton, self_attention=broken))
    rec = correctness.run_spec(spec)
    assert rec["result"] == "error: RuntimeError: launch failed" and rec["max_err"] is None


def test_worker_runs_each_spec_once_and_survives_a_hang():
    """Three fwd cases, two of which cap to the same spec, in a worker process with the interpreter
    on; then a time limit no worker can meet marks every check, one by one, without raising."""
    cases = _cases("kernels", "temporal_attention-triton-") + _cases("kernels", "full_attention-sdpa-")
    cases = [c for c in cases if c.mode == "fwd"]
    got = correctness.check_cases(cases)
    checked = [c.id for c in cases if c.backend == "triton"]
    assert sorted(got) == sorted(checked) and len(checked) == 3
    assert all(r["result"] == "pass" for r in got.values()), got
    b2 = [got[i] for i in checked if "-16x256x256-" not in i]
    assert b2[0] == b2[1] and b2[0]["dims"]["B"] == 2  # 8x128x128 and 16x128x128 share a spec at B = 2
    hung = correctness.check_cases(cases, timeout_s=0.001)
    assert sorted(hung) == sorted(checked)
    assert all(r["result"].startswith("error: the check worker passed its time limit") for r in hung.values())
    recs, why = correctness._worker([None], timeout_s=120)  # a worker that dies says how
    assert recs == [] and why.startswith("the check worker exited with code 1: ") and "TypeError" in why


def test_stdit3_specs():
    """STDiT3 blocks check at the block caps with Open-Sora 1.2's switches; STDiT3 models at one block
    pair on a 4x4 patch grid; the model-vs-model rows (STDiT / DiT / Latte) are never checked."""
    block = correctness.check_spec(_cases("blocks", "stdit3_block-ours-16x256x256-fwd+bwd")[0])
    assert block["dims"] == dict(B=1, T=4, S=24, N=96, C=144, H=2, D=72, L=8)
    assert (block["op"], block["attention"], block["fused"], block["compiled"]) == ("stdit3_block", "triton", "triton", False)
    (model,) = _cases("models", "STDiT3-ours-32x128x128")
    spec = correctness.check_spec(model)
    assert spec["dims"] == dict(B=1, T=4, S=16, N=64, C=144, depth=1, H=2, D=72, L=8, caption_channels=16)
    assert correctness.wants_check(model)
    assert not any(correctness.wants_check(c) for c in _cases("models", "-STDiT-") + _cases("models", "STDiT3-opensora"))


@needs_interpreter
def test_stdit3_check_passes_and_sees_the_qk_norm(monkeypatch):
    """Our fused norm + RoPE in an STDiT3 model agrees with Open-Sora 1.2's path; a triton backend that
    drops the q/k norm and RoPE fails the same check."""
    (case,) = _cases("models", "STDiT3-ours-2x64x64", "tiny")
    spec = correctness.check_spec(case)
    rec = correctness.run_spec(spec)
    assert rec["result"] == "pass", rec
    # measured 3.5e-7 (output and every parameter gradient) against FP32_TOL = 8e-6
    assert 0 < rec["max_err"] <= rec["tol"] == correctness.FP32_TOL
    triton = api._BACKENDS["triton"]

    def no_norm(qkv, kind, num_frames, scale, qk_norm=None, rope=None):
        return triton.self_attention(qkv, kind, num_frames, scale)

    monkeypatch.setitem(api._BACKENDS, "triton", dataclasses.replace(triton, self_attention=no_norm))
    spec = dict(spec, mode="fwd")
    rec = correctness.run_spec(spec)
    assert rec["result"] == "fail" and rec["max_err"] > rec["tol"], rec
