"""`stdit inspect`: ahead-of-time sm_90 / sm_80 compilation reports, on tiny example kernels and on every
shipped build. Needs no GPU: Triton compiles for an explicit target and ships ptxas and cuobjdump.

The example builds are compiled once per session (one process pool, results cached in
``stdit.bench.inspect``); Triton's on-disk cache makes later sessions cheaper still.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from stdit.bench import inspect as harness  # noqa: E402
from stdit.kernels.triton_common import KernelBuild  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@triton.jit
def example_dot_kernel(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[BM, BN] = A[BM, K] @ B[K, BN] for one tile: the attention kernels' hot-loop shape."""
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(B + (k0 + k)[:, None] * BN + n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + m[:, None] * BN + n[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def example_hog_kernel(X, Y, N, BLOCK: tl.constexpr):
    """A BLOCK-wide fp32 accumulator carried across a loop: with one warp and BLOCK=8192 each thread
    needs 256 live registers, more than the 255 the ISA allows, so ptxas must spill."""
    o = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, N):
        acc = acc * tl.load(X + i * BLOCK + o) + 1.0
    tl.store(Y + o, acc)


_DOT_SIG = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "K": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
_TILE = {"BM": 64, "BN": 64, "BK": 64}

DOT = KernelBuild("example_dot[bf16,64x64x64]", example_dot_kernel, _DOT_SIG, _TILE, num_warps=4, num_stages=3,
                  tags={"divisible_by_16": ["K"]})
# 16 pipeline stages of 2 x 8 KB operand tiles: ~256 KB of shared memory, over both targets' limits.
SHARED_HOG = KernelBuild("example_dot_shared_hog[16 stages]", example_dot_kernel, _DOT_SIG, _TILE, num_warps=4,
                         num_stages=16, tags={"divisible_by_16": ["K"]})
SPILL = KernelBuild("example_spill[BLOCK=8192,1 warp]", example_hog_kernel,
                    {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"}, {"BLOCK": 8192},
                    num_warps=1, num_stages=1, uses_mma=False)
EXAMPLES = [DOT, SHARED_HOG, SPILL]


def shipped_builds() -> list[KernelBuild]:
    """Lets this module stand in for a kernel module (STDIT_INSPECT_MODULES) in the CLI test."""
    return [DOT]


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], dict]:
    """Every example build on both targets, compiled in one pool; keyed by (kernel, target)."""
    return {(r["kernel"], r["target"]): r for r in harness.inspect_all(EXAMPLES)}


def test_tools_present() -> None:
    # Triton's wheel bundles them; if this fails every other report would be "unknown".
    assert harness.find_tool("ptxas"), "ptxas not found next to triton"
    assert harness.find_tool("cuobjdump"), "cuobjdump not found next to triton"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_dot_kernel_report_is_sane(rows: dict, target: str) -> None:
    r = rows[(DOT.name, target)]
    assert r["ok"], r["problems"]
    assert 0 < r["registers"] <= 255
    assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["local_bytes"] == 0
    assert r["spill_instructions"] == 0
    # Two bf16 64x64 operand tiles at least; well below the per-block limit.
    assert 2 * 64 * 64 * 2 <= r["shared_bytes"] <= r["shared_limit"]
    assert r["shared_limit"] == {"sm_90": 232448, "sm_80": 166912}[target]
    assert 1 <= r["blocks_per_sm"] <= 16 and r["warps_per_sm"] == 4 * r["blocks_per_sm"]
    assert 0 < r["occupancy_pct"] <= 100
    assert r["uses_wgmma"] is (target == "sm_90")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_spilling_build_is_flagged(rows: dict, target: str) -> None:
    r = rows[(SPILL.name, target)]
    assert not r["ok"]
    assert r["spill_bytes"] > 0 and r["spill_instructions"] > 0
    assert any("spill" in p for p in r["problems"])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_shared_memory_overflow_is_flagged(rows: dict, target: str) -> None:
    r = rows[(SHARED_HOG.name, target)]
    assert not r["ok"]
    assert r["shared_bytes"] > r["shared_limit"]
    assert r["blocks_per_sm"] == 0 and r["occupancy_limiter"] == "shared"
    assert any("shared memory" in p for p in r["problems"])


def test_occupancy_math() -> None:
    sm90, sm80 = harness.TARGETS["sm_90"], harness.TARGETS["sm_80"]
    # 128 regs x 32 threads = 4096 per warp -> 16 warps by registers -> 4 blocks of 4 warps.
    occ = harness.occupancy(128, 0, 4, sm90)
    assert occ == {"blocks_per_sm": 4, "warps_per_sm": 16, "occupancy_pct": 25.0, "occupancy_limiter": "registers"}
    # 33 regs round up to 40 per thread (256 per warp): 65536 / 1280 = 51 warps -> 12 blocks of 4.
    assert harness.occupancy(33, 0, 4, sm80)["blocks_per_sm"] == 12
    # 100 KB + 1 KB reserved: one block fits in sm_80's 164 KB, two in sm_90's 228 KB.
    assert harness.occupancy(32, 100 * 1024, 4, sm80)["blocks_per_sm"] == 1
    assert harness.occupancy(32, 100 * 1024, 4, sm90)["blocks_per_sm"] == 2
    # Tiny kernels: 32 blocks per SM, or 64 warps per SM, whichever binds first.
    assert harness.occupancy(16, 0, 1, sm90)["occupancy_limiter"] == "blocks"
    assert harness.occupancy(16, 0, 4, sm90)["warps_per_sm"] == 64
    assert harness.occupancy(32, 200 * 1024, 4, sm80)["blocks_per_sm"] == 0


def test_parse_resource_usage() -> None:
    text = (" Resource usage:\n Common:\n  GLOBAL:0\n Function mm:\n"
            "  REG:58 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert harness.parse_resource_usage(text) == {"REG": 58, "STACK": 16, "SHARED": 1024, "LOCAL": 8}


def test_missing_module_is_an_error_row() -> None:
    builds, errors = harness.load_shipped_builds(["stdit.kernels.no_such_kernel_module"])
    assert builds == [] and len(errors) == 1
    assert not errors[0]["ok"] and "no_such_kernel_module" in errors[0]["problems"][0]


@pytest.mark.slow
def test_cli_json(rows: dict) -> None:
    # This file stands in for the kernel modules so the CLI's output is known; `rows` warmed
    # Triton's on-disk cache, so the subprocess mostly re-reads compiled kernels.
    env = dict(os.environ, STDIT_INSPECT_MODULES="test_inspect",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "stdit", "inspect", "--json", "--kernel", "example_dot["],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [(r["kernel"], r["target"]) for r in out] == [(DOT.name, "sm_90"), (DOT.name, "sm_80")]
    assert out[0]["uses_wgmma"] is True and out[1]["uses_wgmma"] is False
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in out)


@pytest.mark.slow
def test_shipped_builds_do_not_spill() -> None:
    builds = [b for name in harness.KERNEL_MODULES for b in importlib.import_module(name).shipped_builds()]
    assert builds, "no shipped builds"
    bad = [r for r in harness.inspect_all(builds) if not r["ok"]]
    # The message lists every failing (kernel, target) with why, like `stdit inspect` does.
    assert not bad, "\n" + "\n".join(f"{r['kernel']} {r['target']}: {'; '.join(r['problems'])}" for r in bad)
