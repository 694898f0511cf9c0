"""stdit.common.peaks and stdit.bench.devices: the peak table, the CPU probe, rooflines, device choice:
fast, CPU only."""

import math
import time

import pytest
import torch

from stdit.bench.devices import achieved, check_device, device_peaks, device_slug, probe_peaks, roofline
from stdit.common.peaks import PEAKS, dtype_key, match_device, peak_flops
from stdit.models.costs import Cost, attention_cost


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


def test_peak_flops_only_for_known_gpus():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_dtype_key_names_the_table_column():
    assert [dtype_key(d) for d in (torch.bfloat16, torch.float16)] == ["bf16", "fp16"]
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dtype_key(torch.float32) == "fp32"
        matmul.allow_tf32 = True
        assert dtype_key(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = tf32
    assert dtype_key(torch.float8_e4m3fn) == "fp8"
    with pytest.raises(ValueError, match="dtype: no peak for torch.float64"):
        dtype_key(torch.float64)


def test_h100_ridge_splits_the_attentions():
    """On an H100 (ridge ~295 FLOP/byte) temporal and cross attention are memory-bound and spatial
    attention at S = 1024 compute-bound."""
    h100 = PEAKS["H100-SXM"]
    ridge = h100["bf16"] / h100["bytes_per_s"]
    assert 290 < ridge < 300
    xl = dict(num_heads=16, head_dim=72, batch=2, frames=16)
    for kind, S, bound in (("temporal", 256, "memory"), ("cross", 1024, "memory"), ("spatial", 1024, "compute")):
        cost = attention_cost(kind, tokens_per_frame=S, **xl)
        assert roofline(cost, h100["bf16"], h100["bytes_per_s"])["bound"] == bound, kind


def test_roofline_and_achieved():
    c = Cost(2e12, 1e9)
    r = roofline(c, 1e15, 1e12)
    assert r["min_time_s"] == pytest.approx(2e-3, rel=1e-15) and r["bound"] == "compute"  # measured error: 0
    assert r["intensity"] == 2000 and r["ridge"] == 1000
    assert roofline(Cost(1e9, 1e9), 1e15, 1e12)["bound"] == "memory"
    a = achieved(c, 4e-3, 1e15, 1e12)
    assert a["tflops"] == pytest.approx(500, rel=1e-15) and a["gbs"] == pytest.approx(250, rel=1e-15)
    assert a["pct_roofline"] == pytest.approx(50, rel=1e-15) and a["bound"] == "compute"
    with pytest.raises(ValueError, match="seconds"):
        achieved(c, 0, 1e15, 1e12)
    with pytest.raises(ValueError, match="peak_flops"):
        roofline(c, 0, 1e12)


def test_device_peaks_cpu_is_quick():
    t0 = time.perf_counter()
    p = device_peaks("cpu", torch.bfloat16)
    assert time.perf_counter() - t0 < 4
    assert p["table"] is None and p["source"] == "probed" and p["name"].startswith("CPU: ")
    assert p["flops"] > 0 and p["bytes_per_s"] > 0 and math.isfinite(p["flops"])
    assert "float32" in p["probed"]["method"]
    q = device_peaks("cpu", probe=False)
    assert q["probed"] is None and q["flops"] is None
    with pytest.raises(ValueError, match="seconds"):
        probe_peaks("cpu", seconds=0)


def test_device_choice_and_folder_name():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            check_device("cuda")
    slug = device_slug(torch.device("cpu"))
    assert slug.startswith("cpu-") and slug.endswith("-cores") and slug == slug.lower()
