"""`stdit info` in a subprocess: every backend listed, --json parses, and triton-on-CPU follows
TRITON_INTERPRET (unavailable without it, available with it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stdit.kernels import BACKENDS

SDPA_SUBS = ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math")


def _info(*args: str, interpret: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    done = subprocess.run(
        [sys.executable, "-m", "stdit", "info", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def json_plain() -> dict:
    return json.loads(_info("--json", interpret=None))


def test_table_lists_every_backend() -> None:
    out = _info(interpret=None)
    for key in ("torch", "triton", "CUDA available", "TRITON_INTERPRET"):
        assert key in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name in BACKENDS + SDPA_SUBS:
        assert name in lines, f"{name} missing from `stdit info`"
        assert "available" in lines[name]
    assert "unavailable" in lines["triton"] and "TRITON_INTERPRET=1" in lines["triton"]
    assert lines["reference"].split()[1] == "available"


def test_json_lists_every_backend(json_plain: dict) -> None:
    info = json_plain
    for key in ("python", "platform", "torch", "triton", "cuda", "TRITON_INTERPRET", "backends", "auto"):
        assert key in info
    assert set(info["backends"]) >= {"cpu"}
    for device, table in info["backends"].items():
        assert set(table) == set(BACKENDS + SDPA_SUBS), device
        for name, reason in table.items():
            assert reason is None or (isinstance(reason, str) and reason), (device, name)
    assert info["backends"]["cpu"]["reference"] is None and info["backends"]["cpu"]["sdpa"] is None


def test_triton_on_cpu_follows_triton_interpret(json_plain: dict) -> None:
    assert json_plain["TRITON_INTERPRET"] is None
    assert json_plain["backends"]["cpu"]["triton"] is not None  # no CPU backend without the interpreter
    interpreted = json.loads(_info("--json", interpret="1"))
    assert interpreted["TRITON_INTERPRET"] == "1"
    if interpreted["triton"] is None:
        pytest.skip("triton is not installed")
    assert interpreted["backends"]["cpu"]["triton"] is None
