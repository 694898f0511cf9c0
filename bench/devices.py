"""The devices benchmarks run on: choosing one, naming its report folder, its peaks and rooflines.

``PEAKS``: NVIDIA datasheet peaks (dense, i.e. without 2:4 sparsity) in FLOP/s per dtype and HBM
bytes/s. Checked against NVIDIA's H100 and A100 datasheets as reproduced in public spec tables
(H100 SXM: 989.4 TFLOP/s bf16/fp16, 494.7 tf32, 66.9 fp32, 3.35 TB/s; H100 PCIe: 756 bf16,
378 tf32, 51 fp32, 2.0 TB/s; A100 SXM4 80GB: 312 bf16, 156 tf32, 19.5 fp32, 2.039 TB/s; A100
40GB: 1.555 TB/s). H200 = H100 SXM compute with 4.8 TB/s HBM3e. H800 (SXM) = H100 SXM tensor
compute and bandwidth (the export variant cuts NVLink and fp64, not bf16 tensor throughput).

``probe_peaks``: what this machine does now: a big square matmul (FLOP/s) and a big
device-to-device copy (bytes/s, read + write counted), best of a few timed repetitions.
``device_peaks``: the pair to use for a roofline, with where it came from. ``roofline`` and
``achieved``: what a cost (stdit.models.costs) and a measured time mean against those peaks.
"""

from __future__ import annotations

import os
import re
import time

import torch

from stdit.common.dtypes import short_name
from stdit.common.env import device_name
from stdit.models.costs import Cost

__all__ = [
    "PEAKS", "achieved", "best_device", "check_device", "device_peaks", "device_slug", "dtype_key", "match_device",
    "probe_peaks", "roofline",
]  # fmt: skip


def best_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists here, else ValueError naming the argument."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device here")
    return dev


def device_slug(device: torch.device) -> str:
    """A folder name for the device's report: 'nvidia-h100-80gb-hbm3', 'cpu-2-cores'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}-cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------------------------------
# Peaks
# ------------------------------------------------------------------------------------------------

PEAKS: dict[str, dict] = {
    "H100-SXM": dict(
        name="NVIDIA H100 SXM5 80GB", bf16=989e12, fp16=989e12, tf32=494e12, fp32=67e12, fp8=1979e12,
        bytes_per_s=3.35e12, memory_gib=80,
    ),
    "H100-PCIe": dict(
        name="NVIDIA H100 PCIe 80GB", bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12, fp8=1513e12,
        bytes_per_s=2.0e12, memory_gib=80,
    ),
    "H800": dict(
        name="NVIDIA H800 SXM5 80GB", bf16=989e12, fp16=989e12, tf32=494e12, fp32=67e12, fp8=1979e12,
        bytes_per_s=3.35e12, memory_gib=80,
    ),
    "H200": dict(
        name="NVIDIA H200 SXM 141GB", bf16=989e12, fp16=989e12, tf32=494e12, fp32=67e12, fp8=1979e12,
        bytes_per_s=4.8e12, memory_gib=141,
    ),
    "A100-SXM-80GB": dict(
        name="NVIDIA A100 SXM4 80GB", bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12, fp8=None,
        bytes_per_s=2.039e12, memory_gib=80,
    ),
    "A100-SXM-40GB": dict(
        name="NVIDIA A100 SXM4 40GB", bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12, fp8=None,
        bytes_per_s=1.555e12, memory_gib=40,
    ),
}  # fmt: skip
for _key, _entry in PEAKS.items():
    _entry["key"] = _key


def match_device(name: str) -> dict | None:
    """A torch.cuda.get_device_name() string -> its PEAKS entry, or None if unknown.

    "NVIDIA H100 80GB HBM3" (the SXM part) -> H100-SXM; "NVIDIA H100 PCIe" -> H100-PCIe;
    "NVIDIA H200" -> H200; "NVIDIA H800" -> H800; "NVIDIA A100-SXM4-80GB" / "-40GB" -> A100.
    Variants not in the table (H100 NVL, H200 NVL, H800 PCIe, A100 PCIe, ...) give None rather
    than a wrong number.
    """
    if not isinstance(name, str):
        raise ValueError(f"name: expected a device name string, got {name!r}")
    n = name.upper().replace("_", " ").replace("-", " ")
    words = n.split()
    pcie = "PCIE" in words or "PCIE" in n
    if "NVL" in n:
        return None
    if "H200" in n:
        return None if pcie else PEAKS["H200"]
    if "H800" in n:
        return None if pcie else PEAKS["H800"]
    if "H100" in n:
        return PEAKS["H100-PCIe"] if pcie else PEAKS["H100-SXM"]
    if "A100" in n:
        if pcie or "SXM" not in n:
            return None  # A100 PCIe has other bandwidths; an unmarked name is ambiguous
        return PEAKS["A100-SXM-40GB"] if "40GB" in n.replace(" ", "") else PEAKS["A100-SXM-80GB"]
    return None


def dtype_key(dtype: torch.dtype) -> str:
    """Table column for a matmul dtype: bf16, fp16, fp8, or tf32/fp32 for float32 (tf32 when
    torch allows TF32 matmuls, as it would then run on tensor cores)."""
    if "float8" in str(dtype):
        return "fp8"
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = short_name(dtype)
        return "tf32" if name == "fp32" and torch.backends.cuda.matmul.allow_tf32 else name
    raise ValueError(f"dtype: no peak for {dtype}; expected bfloat16, float16, float32 or a float8 dtype")


def _best_time(fn, seconds: float, sync, timer, min_reps: int = 2, max_reps: int = 50) -> float:
    """Best-of time of fn() after one warm-up, within about ``seconds`` of total time."""
    fn()
    sync()
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or (reps < max_reps and time.perf_counter() - start < seconds):
        best = min(best, timer(fn))
        reps += 1
    return best


def probe_peaks(device="cuda", dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0) -> dict:
    """Measure a square matmul's FLOP/s and a device-to-device copy's bytes/s (read + write) now.

    CUDA: n = 8192 matmul in ``dtype`` and a 1 GiB copy, timed with CUDA events. CPU: n = 1024
    matmul in float32 (bf16 matmul on CPU is not representative) and a 256 MiB copy, timed with
    time.perf_counter. Best of a few repetitions after a warm-up; ``seconds`` is split between the
    two measurements.
    """
    device = torch.device(device)
    _positive("seconds", seconds)
    if device.type == "cuda":
        n, copy_bytes, mm_dtype = 8192, 1 << 30, dtype

        def sync():
            torch.cuda.synchronize(device)

        def timer(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3

        method = f"cuda events; matmul {n}^3 {mm_dtype}; copy {copy_bytes >> 20} MiB (read+write)"
    else:
        n, copy_bytes, mm_dtype = 1024, 256 << 20, torch.float32

        def sync():
            pass

        def timer(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        method = (
            f"{device.type}: time.perf_counter; matmul {n}^3 float32 (bf16 CPU matmul is not "
            f"representative, requested {dtype}); copy {copy_bytes >> 20} MiB (read+write)"
        )
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(mm_dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(mm_dtype)
    c = torch.empty(n, n, device=device, dtype=mm_dtype)
    t_mm = _best_time(lambda: torch.mm(a, b, out=c), seconds / 2, sync, timer)
    del a, b, c
    src = torch.ones(copy_bytes, device=device, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    t_cp = _best_time(lambda: dst.copy_(src), seconds / 2, sync, timer)
    del src, dst
    return dict(flops=2.0 * n**3 / t_mm, bytes_per_s=2.0 * copy_bytes / t_cp, method=method)


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError(f"{name}: expected a positive number, got {v!r}")


def device_peaks(device="cuda", dtype: torch.dtype = torch.bfloat16, probe: bool = True) -> dict:
    """Peaks to judge a kernel by on ``device``: name, table (PEAKS entry or None), probed
    (probe_peaks result or None), and the chosen flops / bytes_per_s with their ``source``.

    GPU: the table's peak for ``dtype`` (and its bandwidth) when the device is known, else the
    probe. CPU: the probe (None for both when probe=False).
    """
    device = torch.device(device)
    name = device_name(device)
    table = match_device(name) if device.type == "cuda" else None
    probed = probe_peaks(device, dtype) if probe else None
    flops = bw = None
    source = "none"
    if table is not None:
        key = dtype_key(dtype)
        flops, bw = table.get(key), table["bytes_per_s"]
        source = f"table:{table['key']}:{key}"
        if flops is None and probed is not None:
            flops = probed["flops"]
            source += " (flops probed)"
    elif probed is not None:
        flops, bw = probed["flops"], probed["bytes_per_s"]
        source = "probed"
    return dict(name=name, table=table, probed=probed, flops=flops, bytes_per_s=bw, source=source)


# ------------------------------------------------------------------------------------------------
# Rooflines
# ------------------------------------------------------------------------------------------------


def roofline(cost: Cost, peak_flops: float, peak_bytes_per_s: float) -> dict:
    """Roofline lower bound on the time of ``cost``: max(flops/peak_flops, bytes/peak_bw)."""
    for name, v in (("peak_flops", peak_flops), ("peak_bytes_per_s", peak_bytes_per_s)):
        _positive(name, v)
    t_compute = cost.flops / peak_flops
    t_memory = cost.bytes / peak_bytes_per_s
    return dict(
        min_time_s=max(t_compute, t_memory),
        bound="compute" if t_compute >= t_memory else "memory",
        intensity=cost.intensity,
        ridge=peak_flops / peak_bytes_per_s,
        compute_time_s=t_compute,
        memory_time_s=t_memory,
    )


def achieved(cost: Cost, seconds: float, peak_flops: float, peak_bw: float) -> dict:
    """What a measured time means: TFLOP/s, GB/s and % of the roofline bound (100 = at the roof)."""
    _positive("seconds", seconds)
    roof = roofline(cost, peak_flops, peak_bw)
    return dict(
        tflops=cost.flops / seconds / 1e12,
        gbs=cost.bytes / seconds / 1e9,
        pct_roofline=100.0 * roof["min_time_s"] / seconds,
        pct_peak_flops=100.0 * cost.flops / seconds / peak_flops,
        pct_peak_bw=100.0 * cost.bytes / seconds / peak_bw,
        bound=roof["bound"],
    )
