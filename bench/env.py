"""The environment every result row records: device, driver, versions, git commit, date."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


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


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else platform.processor()
    except OSError:
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def device_slug(device: torch.device) -> str:
    """A folder name for the device's report: 'nvidia-h100-80gb-hbm3', 'cpu-2-cores'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}-cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _driver() -> str | None:
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
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def environment(device: torch.device) -> dict:
    """The ENV columns of stdit.bench.results for a run on ``device``."""
    return {
        "device": device_name(device),
        "device_kind": device.type,
        "driver": _driver() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def triton_interpreted(device: torch.device) -> bool:
    """Whether triton kernels on ``device`` would run under the interpreter (never timed)."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["best_device", "check_device", "device_name", "device_slug", "environment", "git_commit"]
