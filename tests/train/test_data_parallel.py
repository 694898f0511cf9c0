"""Data parallel on 2 CPU processes (torchrun, gloo): DDP and FSDP2 give the single-process
forward, gradients and optimizer steps; distributed checkpoints save on 2 ranks and load on 1, and
the reverse; a pickle payload planted in any file of one is refused on both ranks and never runs;
the parallel layout is validated with errors naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stdit.train.distributed_checkpoint import load_distributed, save_distributed
from stdit.train.parallel import ParallelConfig

WORKER = Path(__file__).with_name("dp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import dp_worker  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    # a single-process checkpoint for the 2-rank side to load (the "reverse" direction)
    model = dp_worker.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_distributed(out / "dcp-single", 0, model, extra={"who": "single"})
    torch.save({n: p.detach() for n, p in model.named_parameters()}, out / "single-params.pt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for mode in ("ddp", "fsdp2"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out), mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


# About 10x the differences measured on a 2-core x86 CPU (float64 model; its output is float32):
LOSS_TOL = 3e-7  # measured 3.0e-8 (one float32 rounding of the mean of the two halves)
GRAD_TOL = 1e-15  # measured 8.3e-17
PARAM_TOL = 1.5e-13  # measured 1.4e-14 after 3 AdamW steps (and after a checkpoint round trip plus one more)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(runs, mode):
    for rank in (0, 1):
        res = json.loads((runs / f"result-{mode}-{rank}.json").read_text())
        assert res["loss_diff"] < LOSS_TOL
        assert res["grad_max_diff"] < GRAD_TOL
        assert res["param_max_diff_after_3_steps"] < PARAM_TOL
        assert res["load_from_single_max_diff"] == 0.0 and res["load_from_single_extra"] == {"who": "single"}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_checkpoint_from_two_ranks_loads_in_one_process(runs, mode):
    """The 2-rank run's checkpoint (after 3 steps) loads into a plain single-process model and
    optimizer and equals 3 single-process steps."""
    x, t, y, mask = dp_worker.make_batch()
    ref = dp_worker.make_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        dp_worker.loss_of(ref, x, t, y, mask).backward()
        opt.step()
    fresh = dp_worker.make_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    meta = load_distributed(runs / f"dcp-{mode}" / "step-000000003", fresh, fresh_opt, verify=True)
    assert meta["step"] == 3 and meta["extra"] == {"who": mode}
    for (n, p), q in zip(ref.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=PARAM_TOL, msg=n)
    # the optimizer state came along: one more step stays together
    for o, m in ((opt, ref), (fresh_opt, fresh)):
        o.zero_grad()
        dp_worker.loss_of(m, x, t, y, mask).backward()
        o.step()
    for (n, p), q in zip(ref.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=PARAM_TOL, msg=n)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_planted_pickles_are_refused_on_two_ranks(runs, mode):
    """Every file of the 2-rank checkpoint, and DCP's own pickled metadata file, replaced in turn by
    a payload that would create a file when unpickled: both ranks refuse to load, nothing ran."""
    for rank in (0, 1):
        planted = json.loads((runs / f"result-{mode}-{rank}.json").read_text())["planted"]
        names = {k.rsplit(" (", 1)[0] for k in planted}
        assert {"meta.json", "state.json", ".metadata"} <= names and any(n.endswith(".safetensors") for n in names)
        assert all(outcome.startswith("refused: ") for outcome in planted.values()), planted
    assert not (runs / f"marker-{mode}").exists()


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete stdit-dcp checkpoint: no meta.json"):
        load_distributed(tmp_path / "half", torch.nn.Linear(2, 2))


def test_layout_validation_names_the_field():
    with pytest.raises(ValueError, match=r"dp x sp = 2 x 2 = 4 must equal the number of processes \(2\)"):
        ParallelConfig(dp=2, sp=2).validate(world_size=2)
    with pytest.raises(ValueError, match=r"parallel.sp_mode: expected one of \('dsp', 'ulysses', 'ulysses_generic'\)"):
        ParallelConfig(sp_mode="ring").validate()
    with pytest.raises(ValueError, match=r"num_heads = 6 must be a multiple of sp = 4"):
        ParallelConfig(sp=4, sp_mode="ulysses").validate(num_heads=6)
    with pytest.raises(ValueError, match=r"parallel.dp: expected an int >= 1"):
        ParallelConfig(dp=0).validate()
    ParallelConfig(dp=1, sp=4, sp_mode="dsp").validate(world_size=4, num_heads=6)  # DSP has no head constraint
