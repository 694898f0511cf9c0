"""Multi-process sampling (stdit.train.parallel_sample) equals one process.

One torchrun launch (4 gloo CPU processes) runs tests/train/sample_worker.py: CFG parallel (2 ranks),
DSP (2 ranks) and both (4 ranks) sample STDiT (IDDPM) and STDiT3 (rectified flow) with float64
models, plain, with attention broadcast and with a step cache, against the same sampling in one
process. Measured: every latent equal (max abs diff 0; the models run in float64 and hand float32 to
the samplers) and every fast-sampling counter equal. Then `stdit sample` end to end under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

av = pytest.importorskip("av")

from test_sample import _checkpoint  # noqa: E402

from stdit.train.cli import main as train_cli  # noqa: E402
from stdit.train.parallel_sample import init_parallel_sampling  # noqa: E402

WORKER = Path(__file__).with_name("sample_worker.py")
CASES = [f"{family}/{layout}/{setting}" for family in ("STDiT", "STDiT3") for layout in ("cfg", "dsp", "cfg+dsp")
         for setting in ("plain", "broadcast", "step_cache")]  # fmt: skip

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("par") / "sample.json"
    _torchrun(4, str(WORKER), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_parallel_sampling_equals_one_process(results, case):
    r = results[case]
    assert r["max_abs_diff"] <= 1e-6 * r["scale"], r  # measured 0.0 in every case
    assert r["stats_equal"], "the fast-sampling decisions differ from one process's"
    if not case.endswith("plain"):
        assert r["reused"] > 0, "the setting reused nothing: the comparison would prove nothing"


def test_the_comparison_catches_swapped_branches(results):
    assert results["mistake/swapped_branches"]["max_abs_diff"] > 1e-3


def test_sample_command_under_torchrun(tmp_path):
    """`torchrun -m stdit.train sample --cfg-parallel --sp-size 1`: rank 0 writes the video, and its
    frames are the one-process command's."""
    run = tmp_path / "run"
    _checkpoint(run, "STDiT3-mini")
    common = ["--checkpoint", str(run), "--prompt", "waves", "--steps", "3", "--frames", "3", "--height", "32",
              "--width", "32", "--quiet", "--broadcast", "spatial=2,range=0:1000", "--device", "cpu"]  # fmt: skip
    assert train_cli(["sample", *common, "--out", str(tmp_path / "one.mp4")]) == 0
    proc = _torchrun(2, "-m", "stdit.train", "sample", *common, "--out", str(tmp_path / "two.mp4"), "--cfg-parallel")
    assert proc.stdout.split() == [str(tmp_path / "two.mp4")]  # printed once, by rank 0
    assert "cfg-parallel x2" in proc.stderr and "spatial 1/3 reused" in proc.stderr

    def frames(path):
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    assert np.array_equal(frames(tmp_path / "one.mp4"), frames(tmp_path / "two.mp4"))


def test_refusals(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match=r"needs 4 processes: run it as `torchrun --nproc-per-node 4"):
        init_parallel_sampling(cfg_parallel=True, sp_size=2)
    with pytest.raises(ValueError, match="sp_size: expected an integer >= 1"):
        init_parallel_sampling(sp_size=0)
    with pytest.raises(ValueError, match="sp_mode: expected one of"):
        init_parallel_sampling(sp_mode="ring")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"torchrun started 3 processes, but --cfg-parallel \(2\) x --sp-size \(1\) "
                                         r"needs 2; use --nproc-per-node 2"):  # fmt: skip
        init_parallel_sampling(cfg_parallel=True)
    assert not dist.is_initialized()
