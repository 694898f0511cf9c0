"""The one collector of where something ran: versions, device names and the git commit.

Result rows, checkpoints and ``stdit info`` all record their environment from here, so a number
and the weights it came from name the same versions in the same words.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = [
    "REPO_ROOT", "cpu_name", "device_name", "driver_version", "environment", "git_commit", "package_version",
    "triton_version", "utc_now", "versions",
]  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_version() -> str | None:
    """triton's own ``__version__`` (GPU images may install it under another distribution name)."""
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", None)


def versions() -> dict[str, str | None]:
    """Versions of stdit, Python and the libraries whose behaviour a result or checkpoint depends on."""
    return {
        "stdit": package_version("stdit"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "numpy": package_version("numpy"),
        "safetensors": package_version("safetensors"),
    }


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """'AMD EPYC 7B13 (2 cores)' from /proc/cpuinfo, or the platform's processor name."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1).strip() if m else platform.processor()
    except OSError:
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, 'CPU: <model> (<n> cores)' otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


@functools.lru_cache(maxsize=None)
def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, '+dirty' if it has uncommitted changes."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, check=True)
        head = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def utc_now() -> str:
    """The current time as '2026-12-02T11:33:25Z'."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: torch.device) -> dict[str, str | None]:
    """Where a measurement on ``device`` ran: device, driver, versions, git commit and date."""
    v = versions()
    return {
        "device": device_name(device),
        "device_kind": device.type,
        "driver": driver_version() if device.type == "cuda" else None,
        "torch": v["torch"],
        "triton": v["triton"],
        "cuda": v["cuda"],
        "python": v["python"],
        "git_commit": git_commit(),
        "date": utc_now(),
    }


