"""Datasheet peaks of the GPUs stdit reports on: FLOP/s per matmul dtype and HBM bytes/s.

NVIDIA's dense peaks (without 2:4 sparsity), checked against the H100 and A100 datasheets as
reproduced in public spec tables (H100 SXM: 989.4 TFLOP/s bf16/fp16, 494.7 tf32, 66.9 fp32,
3.35 TB/s; H100 PCIe: 756 bf16, 378 tf32, 51 fp32, 2.0 TB/s; A100 SXM4 80GB: 312 bf16, 156 tf32,
19.5 fp32, 2.039 TB/s; A100 40GB: 1.555 TB/s). H200 = H100 SXM compute with 4.8 TB/s HBM3e. H800
(SXM) = H100 SXM tensor compute and bandwidth (the export variant cuts NVLink and fp64, not bf16
tensor throughput). The benchmarks judge rooflines against them, the trainer its MFU.
"""

from __future__ import annotations

import torch

from .dtypes import short_name

__all__ = ["PEAKS", "dtype_key", "match_device", "peak_flops"]


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


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet matmul FLOP/s of ``device`` in ``dtype``, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    entry = match_device(torch.cuda.get_device_name(device))
    return entry.get(dtype_key(dtype)) if entry is not None else None
