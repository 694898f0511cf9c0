"""`stdit info`: versions, devices, and which attention backends can run here (and why not).

Every "available" comes from the attention API's own resolver (stdit.kernels.availability), never
from a list kept here, so the report cannot drift from what the API will actually do.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

from stdit.common.env import versions
from stdit.kernels import BACKENDS, auto_backend, availability
from stdit.kernels.api import limitations

SDPA_SUBS = ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math")


def _availability(name: str, device: str) -> str | None:
    """None if available, else the reason; a backend whose check itself fails is reported, not fatal."""
    try:
        return availability(name, device)
    except Exception as e:  # a broken optional install must not hide the rest of the report
        return f"availability check failed: {type(e).__name__}: {e}"


def collect() -> dict[str, Any]:
    """Everything `stdit info` reports, as one JSON-serializable dict."""
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    v = versions()
    info: dict[str, Any] = {
        "stdit": v["stdit"],
        "python": v["python"],
        "platform": platform.platform(),
        "torch": v["torch"],
        "triton": v["triton"],
        "cuda": {
            "available": cuda,
            "version": v["cuda"],  # the CUDA torch was built with; None for CPU builds
            "devices": [
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(i)),
                }
                for i in range(torch.cuda.device_count())
            ]
            if cuda
            else [],
        },
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "backends": {},
    }
    for device in devices:
        names = list(BACKENDS) + list(SDPA_SUBS)
        info["backends"][device] = {name: _availability(name, device) for name in names}
    # caveats of available backends (e.g. flex on CPU is forward only)
    info["notes"] = {
        device: {
            name: note
            for name in BACKENDS
            if info["backends"][device][name] is None and (note := limitations(name, device)) is not None
        }
        for device in devices
    }
    info["auto"] = {device: auto_backend(torch.device(device)) for device in devices}
    return info


def _print_table(info: dict[str, Any]) -> None:
    cuda = info["cuda"]
    rows = [
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("torch", info["torch"]),
        ("triton", info["triton"] or "not installed"),
        ("CUDA available", "yes" if cuda["available"] else "no"),
        ("CUDA version", cuda["version"] or "none (CPU build of torch)"),
    ]
    rows += [(f"cuda:{d['index']}", f"{d['name']} ({d['capability']})") for d in cuda["devices"]]
    rows.append(("TRITON_INTERPRET", info["TRITON_INTERPRET"] if info["TRITON_INTERPRET"] is not None else "unset"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for device, table in info["backends"].items():
        print(f"\nattention backends on {device} (auto -> {info['auto'][device]}):")
        width = max(len(name) for name in table)
        for name, reason in table.items():
            note = info["notes"][device].get(name)
            status = "available" if reason is None else "unavailable: " + reason
            print(f"  {name:<{width}}  {status}{f' ({note})' if note else ''}")


def run_info(json_output: bool) -> int:
    """Print the report (a table, or one JSON object with --json); returns the exit status."""
    info = collect()
    if json_output:
        print(json.dumps(info, indent=2))
    else:
        _print_table(info)
    return 0
