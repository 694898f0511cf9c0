"""The devices benchmarks run on: choosing one, naming its report folder, its peaks and rooflines.

Datasheet peaks come from stdit.common.peaks (the trainer's MFU reads them too).
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

from stdit.common.env import device_name
from stdit.common.peaks import dtype_key, match_device
from stdit.models.costs import Cost

__all__ = [
    "achieved", "best_device", "check_device", "device_peaks", "device_slug", "probe_peaks", "roofline",
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
# Peaks (the datasheet table is stdit.common.peaks, shared with the trainer's MFU)
# ------------------------------------------------------------------------------------------------


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
