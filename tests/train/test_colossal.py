"""The optional ColossalAI engine (stdit.train.colossal) on 2 CPU processes (torchrun, gloo).

Skipped as a whole when colossalai is not importable (CI does not install it; see
stdit.train.colossal.INSTALL for the command that installs it beside torch). When it is: the
"ddp" (TorchDDPPlugin) and "hybrid" (HybridParallelPlugin, tp = pp = 1) plugins train a float64
STDiT-tiny for 3 clipped AdamW steps on a batch of 4 split over 2 ranks and match one process on
the full batch; the booster's sharded checkpoints round-trip (model, optimizer, EMA dict, meta);
"zero2" (LowLevelZeroPlugin) on CPU raises the clear "needs CUDA" error.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("colossalai") is None:
    pytest.skip("colossalai is not installed (optional engine; CI does not install it)", allow_module_level=True)

from stdit.train import colossal  # noqa: E402

_reason = colossal.colossalai_available()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

WORKER = Path(__file__).with_name("colossal_worker.py")
PLUGINS = ("ddp", "hybrid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("colossal")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out),
           *PLUGINS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return out


def _results(runs, plugin):
    return [json.loads((runs / f"result-{plugin}-{rank}.json").read_text()) for rank in (0, 1)]


# hybrid: ColossalAI's HybridParallelNaiveOptimizer carries the gradient norm as a float32 tensor,
# so its clip coefficient is float32-rounded (relative 1e-8) -> ~4e-10 parameter differences.
PARAM_TOL = {"ddp": 1e-12, "hybrid": 1e-8}


@pytest.mark.parametrize("plugin", PLUGINS)
def test_two_ranks_match_one_process(runs, plugin):
    for res in _results(runs, plugin):
        assert res["world"] == 2
        assert res["loss_diff"] < 1e-6  # the model returns float32 output
        assert res["grad_norm"] == pytest.approx(res["ref_grad_norm"], rel=1e-7)
        assert res["ref_grad_norm"] > 1.0  # so clipping was active in the comparison
        assert res["param_max_diff_after_3_steps"] < PARAM_TOL[plugin]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_checkpoint_round_trip(runs, plugin):
    for res in _results(runs, plugin):
        assert res["load_step"] == 3 and res["load_extra"] == {"who": plugin}
        assert res["load_param_max_diff"] == res["param_max_diff_after_3_steps"]  # exactly the saved weights
        assert res["load_ema_max_diff"] == 0.0
        assert res["param_max_diff_after_load_and_step"] < PARAM_TOL[plugin]  # optimizer state came back
        assert res["leftover_tmp"] == []
    ckpt = colossal.latest(runs / f"ckpt-{plugin}")
    assert ckpt is not None and ckpt.name == "step-000000003" and (ckpt / "ema.safetensors").is_file()
    assert any((ckpt / "model").glob("*.index.json")) and any((ckpt / "optimizer").glob("*.index.json"))


def test_zero2_on_cpu_raises_clear_error(runs):
    for res in _results(runs, "ddp"):
        msg = res["zero2_cpu_error"]
        assert "needs CUDA" in msg and "'hybrid'" in msg and "'ddp'" in msg


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete stdit-colossalai checkpoint: no meta.json"):
        colossal.load(None, None, None, tmp_path / "half")


def test_unknown_plugin():
    with pytest.raises(ValueError, match="plugin: expected one of"):
        colossal.boost(None, None, plugin="zero3", device="cpu")


def test_missing_colossalai_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "colossalai", None)  # import colossalai -> ImportError
    reason = colossal.colossalai_available()
    assert reason is not None and "pip install --no-deps colossalai==0.5.0" in reason
    with pytest.raises(ImportError, match="pip install --no-deps colossalai"):
        colossal.boost(object(), object(), plugin="ddp", device="cpu")
