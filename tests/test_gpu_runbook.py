"""The GPU runbook (scripts/gpu.sh) rehearsed on the CPU, and its smoke stage (stdit.bench.smoke):
every shipped configuration has a probe, a probe fails on wrong numbers or on a launch that is not the
configuration, and a crashing, hanging or raising probe costs only its own configurations."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import stdit.kernels as K
from stdit.bench import smoke
from stdit.bench.inspect import load_shipped_builds

ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITES = ("kernels", "fused", "blocks", "models", "sample")
# Imported first by every Python process below: without the editable install's finder, `import stdit`
# works only through what gpu.sh itself puts on PYTHONPATH (it installs nothing).
NO_EDITABLE_INSTALL = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
"""


def _run(cmd: list[str], tmp_path: Path, sitecustomize: str, timeout: float) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(sitecustomize)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the runbook


def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "out"
    done = _run(["bash", "scripts/gpu.sh", "--dry-run", str(out)], tmp_path, NO_EDITABLE_INSTALL, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (device,) = [d for d in out.iterdir() if d.name != "parallel-model"]
    run = device / "runbook"

    names = ["info", "smoke", "tests", *(f"bench-{s}" for s in SUITES), "report"]
    summary = (run / "SUMMARY.md").read_text()
    for name in names:
        assert (run / f"{name}.status").read_text().split()[0] == "0", name
        assert f"| {name} | ok |" in summary, summary
        assert (run / f"{name}.log").stat().st_size > 0
    assert f"{len(names)} of {len(names)} stages passed" in summary

    info = json.loads((run / "info.json").read_text())
    assert info["stdit"] == "0.1.0" and info["cuda"]["available"] is False  # the package ran from PYTHONPATH
    header, *rows = _jsonl(run / "smoke.jsonl")
    assert header["schema"] == smoke.SCHEMA and header["device_kind"] == "cpu"
    wanted = {b.name for b in load_shipped_builds()[0] if "D=72,bf16" in b.name or "C=144,fp32" in b.name}
    assert sorted(r["config"] for r in rows) == sorted(wanted)
    assert all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"]
    suite = ET.parse(run / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == "0" and suite.get("errors") == "0"
    results = [r for r in _jsonl(device / "results.jsonl") if "suite" in r]
    assert {r["suite"] for r in results} == set(SUITES)
    assert (device / "README.md").exists() and list(device.glob("*.png"))
    assert (out / "parallel-model" / "README.md").exists()  # stdit report's model lands inside OUT_DIR too

    # and without gpu.sh's PYTHONPATH there is no stdit to import: the run above used no installation
    plain = _run([sys.executable, "-c", "import stdit.kernels"], tmp_path, NO_EDITABLE_INSTALL, timeout=60)
    assert plain.returncode != 0 and "No module named 'stdit.kernels'" in plain.stderr


def test_runbook_refuses_bad_arguments(tmp_path):
    done = _run(["bash", "scripts/gpu.sh", "--stages", "info,bogus", str(tmp_path)], tmp_path, "", timeout=60)
    assert done.returncode == 2 and "unknown stage bogus" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_runbook_without_dry_run_needs_a_gpu(tmp_path):
    done = _run(["bash", "scripts/gpu.sh", str(tmp_path / "out")], tmp_path, "", timeout=120)
    assert done.returncode == 2 and "sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the smoke stage


def test_every_shipped_configuration_has_exactly_one_probe():
    builds, errors = load_shipped_builds()
    probes, unknown = smoke.probes_for(builds)
    assert not errors and not unknown
    names = [b.name for p in probes for b, _ in p.builds]
    assert sorted(names) == sorted(b.name for b in builds)  # each exactly once
    assert len({p.key for p in probes}) == len(probes)
    for p in probes:
        assert p.group.split("/")[0] == p.key.split("/")[0] and p.key.endswith(p.group.split("/", 1)[1])


def _temporal_probe(**change) -> smoke.Probe:
    builds = [b for b in load_shipped_builds()[0] if "D=72,bf16" in b.name and "self_attn_" in b.name]
    builds = [dataclasses.replace(b, **change) if "fwd_packed" in b.name else b for b in builds]
    (probe,) = [p for p in smoke.probes_for(builds)[0] if p.op == "temporal"]
    return probe


def test_probe_passes_and_checks_what_each_configuration_computes():
    rows = {r["config"].split("[")[0]: r for r in smoke.probe_rows(_temporal_probe(), DEVICE)}
    assert set(rows) == {"self_attn_fwd_packed", "self_attn_bwd_packed"}
    assert all(r["status"] == "pass" for r in rows.values()), rows
    assert set(rows["self_attn_fwd_packed"]["errors"]) == {"out"}
    assert set(rows["self_attn_bwd_packed"]["errors"]) == {"dq", "dk", "dv"}


def test_probe_fails_a_configuration_that_was_not_launched_as_built():
    probe = _temporal_probe(num_warps=16)
    rows = {r["config"].split("[")[0]: r for r in smoke.probe_rows(probe, DEVICE)}
    assert rows["self_attn_fwd_packed"]["status"] == "fail"
    assert "num_warps launched 8 (built 16)" in rows["self_attn_fwd_packed"]["detail"]
    assert rows["self_attn_bwd_packed"]["status"] == "pass"


def test_probe_fails_wrong_numbers(monkeypatch):
    real = K.temporal_attention

    def off_by_a_little(qkv, T, backend="auto"):  # only our forward output is wrong
        out = real(qkv, T, backend=backend)
        return out + 0.1 * out.detach().abs().max() if backend == "triton" else out

    monkeypatch.setattr(K, "temporal_attention", off_by_a_little)
    rows = {r["config"].split("[")[0]: r for r in smoke.probe_rows(_temporal_probe(), DEVICE)}
    assert rows["self_attn_fwd_packed"]["status"] == "fail" and rows["self_attn_fwd_packed"]["detail"].startswith("out: error")
    assert rows["self_attn_bwd_packed"]["status"] == "pass"


FAULTS = """
import os, signal, time
import stdit.bench.smoke as smoke

probe_rows, check_probe = smoke.probe_rows, smoke.check_probe

def faulty_probe_rows(p, device):
    if p.key == "modulate/layernorm_modulate/C=144/fp32":
        os.kill(os.getpid(), signal.SIGSEGV)
    if p.key == "modulate/layernorm_modulate/C=1152/fp32":
        time.sleep(600)
    return probe_rows(p, device)

def faulty_check_probe(p, device):
    if p.key == "modulate/gated_residual/C=1152/fp32":
        raise RuntimeError("planted failure")
    return check_probe(p, device)

smoke.probe_rows, smoke.check_probe = faulty_probe_rows, faulty_check_probe
"""


def test_crash_hang_and_error_cost_only_their_own_configurations(tmp_path):
    out = tmp_path / "smoke.jsonl"
    cmd = [sys.executable, "-m", "stdit", "smoke", "--device", "cpu", "--kernel", "C=144,fp32", "--kernel",
           "C=1152,fp32", "--jobs", "2", "--probe-timeout", "20", "--out", str(out)]  # fmt: skip
    done = _run(cmd, tmp_path, FAULTS, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    rows = {}
    for r in _jsonl(out)[1:]:
        rows.setdefault(r["probe"], []).append(r)
    assert {k: len(v) for k, v in rows.items()} == {
        "modulate/layernorm_modulate/C=144/fp32": 2, "modulate/gated_residual/C=144/fp32": 2,
        "modulate/layernorm_modulate/C=1152/fp32": 2, "modulate/gated_residual/C=1152/fp32": 2,
    }  # fmt: skip
    for r in rows["modulate/layernorm_modulate/C=144/fp32"]:
        assert r["status"] == "crash" and "exit -11" in r["detail"]
    for r in rows["modulate/gated_residual/C=144/fp32"]:  # ran in a second worker after the crash
        assert r["errors"] and all(e <= b for e, b in zip(r["errors"].values(), r["bounds"].values()))
    for r in rows["modulate/layernorm_modulate/C=1152/fp32"]:
        assert r["status"] == "timeout"
    for r in rows["modulate/gated_residual/C=1152/fp32"]:  # after the hung worker was killed
        assert r["status"] == "error" and r["detail"] == "RuntimeError: planted failure"
