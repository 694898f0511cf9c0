"""stdit.train.checkpoint (single-process kind) and stdit.train.ema: round trips, pickle-free format,
discovery, pruning, SIGKILL safety, errors."""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from stdit.common import files
from stdit.models import stdit_from_preset
from stdit.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointWarning,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stdit.train.ema import EMA
from stdit.train.state_files import load_tree


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


def train_step(model, opt, ema):
    x = torch.randn(4, 6)
    loss = model(x).pow(2).mean() + 0.01 * float(np.random.rand()) * random.random()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update(model)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def clone_tree(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone()
    if isinstance(a, dict):
        return {k: clone_tree(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(clone_tree(v) for v in a)
    return a


def assert_same_tree(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_round_trip_is_bitwise_and_restores_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        train_step(model, opt, ema)
    torch.randn(3)  # advance RNGs and leave numpy with a cached gaussian
    np.random.standard_normal()
    random.gauss(0, 1)
    pos = {"epoch": 2, "batches_in_epoch": 17}
    extra = {"stage": {"name": "256px", "lr": 1e-4, "frames": [16, 8]}}
    path = save_checkpoint(tmp_path, step=3, model=model, ema=ema, optimizer=opt, data_position=pos, extra=extra)
    assert path == tmp_path / "checkpoints" / "step-000000003"
    saved_model, saved_ema, saved_opt = params(model), clone_tree(ema.state_dict()), clone_tree(opt.state_dict())

    # The uninterrupted run.
    draws = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())
    train_step(model, opt, ema)
    after = params(model)
    ema_after = {k: v.clone() for k, v in ema.shadow.items()}

    # The resumed run, from different initial weights and different RNG states.
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    model2 = tiny_model(seed=5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    ema2 = EMA(model2, decay=0.5)
    meta = load_checkpoint(tmp_path, model=model2, ema=ema2, optimizer=opt2)
    assert meta["step"] == 3 and meta["data_position"] == pos and meta["extra"] == extra
    assert meta["path"] == str(path) and meta["format_version"] == FORMAT_VERSION
    assert meta["versions"]["torch"] == torch.__version__ and "stdit" in meta["versions"]
    assert_same(params(model2), saved_model)
    assert_same_tree(ema2.state_dict(), saved_ema)
    assert ema2.decay == 0.9
    assert_same_tree(opt2.state_dict(), saved_opt)
    draws2 = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())
    assert torch.equal(draws[0], draws2[0])
    assert np.array_equal(draws[1], draws2[1])
    assert draws[2] == draws2[2] and draws[3] == draws2[3]

    # Rewind the RNGs to the checkpoint again (restore_rng) and take the next step: bitwise equal.
    load_checkpoint(path, model=model2, ema=ema2, optimizer=opt2)
    torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal()
    train_step(model2, opt2, ema2)
    assert_same(params(model2), after)
    assert_same(ema2.shadow, ema_after)


def test_restore_rng_false_leaves_rng_alone(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, step=1, model=model)
    fresh = tiny_model(1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_checkpoint(tmp_path, model=fresh, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        base = torch.arange(24.0).reshape(4, 6)
        self.register_buffer("transposed", base.t())  # non-contiguous
        self.register_buffer("rows_a", base[:2])  # two views of one storage
        self.register_buffer("rows_b", base[2:])
        self.register_buffer("count", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("empty", torch.zeros(0, 3))


def test_stdit_mini_and_tied_noncontiguous_shared_tensors(tmp_path):
    model = stdit_from_preset("STDiT-mini")
    save_checkpoint(tmp_path / "a", step=0, model=model)
    torch.manual_seed(3)
    fresh = stdit_from_preset("STDiT-mini")
    for p in fresh.parameters():
        nn.init.normal_(p)
    load_checkpoint(tmp_path / "a", model=fresh)
    assert_same(params(fresh), params(model))

    t = Tied()
    path = save_checkpoint(tmp_path / "b", step=0, model=t, ema=EMA(t))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        aliases = json.loads(f.metadata()["stdit.aliases"])
    assert aliases == {"head.weight": "emb.weight"} and "head.weight" not in keys
    t2 = Tied()
    with torch.no_grad():
        t2.emb.weight.zero_()
        t2.transposed.zero_()
    load_checkpoint(tmp_path / "b", model=t2, ema=EMA(t2))
    assert t2.head.weight is t2.emb.weight
    assert_same(params(t2), params(t))


def test_files_are_pickle_free(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    ema = EMA(model)
    train_step(model, opt, ema)
    path = save_checkpoint(tmp_path, step=5, model=model, ema=ema, optimizer=opt, data_position={"i": 1})
    meta = json.loads((path / "meta.json").read_text())
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([*meta["files"], "meta.json"])
    assert set(meta["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                  "rng.safetensors", "rng.json"}
    for name in names:
        data = (path / name).read_bytes()
        assert meta["files"].get(name, {"size": len(data)})["size"] == len(data)
        if name.endswith(".json"):
            json.loads(data)
        else:
            assert name.endswith(".safetensors")
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            assert 8 + n + max(ends) == len(data)  # header + raw tensor bytes, nothing else
    # the optimizer's structure and scalars (tuples, int keys, None) come back exactly
    assert_same_tree(load_tree(path / "optimizer.safetensors"), opt.state_dict())


def test_optimizer_state_that_needs_pickle_is_refused(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    opt.param_groups[0]["scheduler"] = object()
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    assert not (tmp_path / "checkpoints").exists()  # validated before anything is written


def test_latest_skips_partial_and_corrupt(tmp_path):
    model = tiny_model()
    for s in range(1, 7):
        save_checkpoint(tmp_path, step=s, model=model, ema=EMA(model), keep_last=None)
    root = tmp_path / "checkpoints"
    (root / "step-000000003" / "rng.json").unlink()  # missing file
    f = root / "step-000000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    (root / "step-000000005" / "meta.json").write_text("{garbage")  # garbage meta
    g = root / "step-000000006" / "ema.safetensors"  # same size, flipped byte: only a hash check sees it
    data = bytearray(g.read_bytes())
    data[-1] ^= 0xFF
    g.write_bytes(bytes(data))
    tmp_dir = root / ".step-000000009.tmp-1-abcd-elsewhere"  # a writer on another host: ignored
    shutil.copytree(root / "step-000000002", tmp_dir)
    (root / "step-000000010").mkdir()  # empty final-named directory

    with pytest.warns(CheckpointWarning, match="step-000000010: no meta.json"):
        assert latest_checkpoint(tmp_path) == root / "step-000000006"  # sizes only: the flipped byte passes
    with pytest.warns(CheckpointWarning) as rec:
        assert latest_checkpoint(tmp_path, verify=True) == root / "step-000000002"
    text = "\n".join(str(w.message) for w in rec)
    for s in (3, 4, 5, 6, 10):
        assert f"step-{s:09d}" in text
    assert "step-000000009" not in text and tmp_dir.exists()
    with pytest.raises(ValueError, match="path_or_run_dir.*SHA-256"):
        load_checkpoint(root / "step-000000006", model=tiny_model(), verify=True)
    with pytest.raises(ValueError, match="path_or_run_dir.*missing"):
        load_checkpoint(root / "step-000000003", model=tiny_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert load_checkpoint(tmp_path, model=tiny_model())["step"] == 2
        assert load_checkpoint(root, model=tiny_model())["step"] == 2  # the checkpoints/ folder works too
    assert not is_complete(root / "step-000000005") and is_complete(root / "step-000000001", verify=True)


def test_keep_last_and_resave(tmp_path, monkeypatch):
    model = tiny_model()
    root = tmp_path / "checkpoints"
    for s in range(1, 6):
        save_checkpoint(tmp_path, step=s, model=model, keep_last=2, data_position={"s": s})
    assert sorted(p.name for p in root.iterdir()) == ["step-000000004", "step-000000005"]

    save_checkpoint(tmp_path, step=5, model=model, keep_last=2, data_position={"again": 1})  # renameat2 swap
    assert load_checkpoint(tmp_path, model=tiny_model())["data_position"] == {"again": 1}
    monkeypatch.setattr(files, "_rename_exchange", lambda a, b: False)  # portable two-rename path
    save_checkpoint(tmp_path, step=5, model=model, keep_last=2, data_position={"again": 2})
    assert load_checkpoint(tmp_path, model=tiny_model())["data_position"] == {"again": 2}
    save_checkpoint(tmp_path, step=1, model=model, keep_last=2)  # the one just written is never pruned
    assert sorted(p.name for p in root.iterdir()) == ["step-000000001", "step-000000004", "step-000000005"]
    save_checkpoint(tmp_path, step=6, model=model, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000000006"]
    assert latest_checkpoint(tmp_path, verify=True) == root / "step-000000006"


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, step=1, model=model, data_position={"v": 1})
    root = tmp_path / "checkpoints"
    host, pid = files._host(), dead_pid()
    # A writer died between renaming step 1 away and renaming its replacement in: step 1 comes back.
    os.rename(root / "step-000000001", root / f".step-000000001.replaced-{pid}-ab12-{host}")
    (root / f".step-000000001.tmp-{pid}-cd34-{host}").mkdir()
    (root / f".step-000000002.tmp-{pid}-ef56-{host}").mkdir()
    (root / f".step-000000000.trash-{pid}-0a0b-{host}").mkdir()
    live = root / f".step-000000003.tmp-{os.getpid()}-1234-{host}"  # alive: left alone
    live.mkdir()
    with pytest.warns(CheckpointWarning, match="restored"):
        assert latest_checkpoint(tmp_path) == root / "step-000000001"
    assert load_checkpoint(tmp_path, model=tiny_model())["data_position"] == {"v": 1}
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step-000000001"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from stdit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from stdit.train.ema import EMA

    run = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))  # 1M params, 4 MB
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, decay=0.9)
    step = 0
    if latest_checkpoint(run) is not None:
        step = load_checkpoint(run, model=model, ema=ema, optimizer=opt)["step"]
    print("start", step, flush=True)
    while True:
        step += 1
        loss = model(torch.randn(8, 512)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        kw = dict(model=model, ema=ema, optimizer=opt, keep_last=2)
        save_checkpoint(run, step=step, data_position={"batches": step}, **kw)
        if step % 3 == 0:  # re-save the same step: replacing may be interrupted too
            save_checkpoint(run, step=step, data_position={"batches": step, "resaved": True}, **kw)
        print("saved", step, flush=True)
    """
)


def _fresh_objects():
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, EMA(model, decay=0.9)


def test_sigkill_never_corrupts_latest(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    run = tmp_path / "run"
    root = run / "checkpoints"
    rng = random.Random(20240611)
    last_step = 0
    for trial in range(4):
        with open(tmp_path / f"stderr-{trial}.txt", "w") as err:
            proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, stderr=err,
                                    text=True, cwd=tmp_path)
            try:
                start = proc.stdout.readline()
                first = proc.stdout.readline()
                assert first.startswith("saved"), (start, first, (tmp_path / f"stderr-{trial}.txt").read_text())
                assert int(start.split()[1]) == last_step  # resumed from the previous trial's latest
                time.sleep(rng.uniform(0.0, 0.4))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)  # nothing partial may ever be visible
            latest = latest_checkpoint(run, verify=True)
            finals = [p for p in root.iterdir() if p.name.startswith("step-")]
            assert latest is not None and finals
            for p in finals:
                assert is_complete(p, verify=True), p
            model, opt, ema = _fresh_objects()
            meta = load_checkpoint(run, model=model, ema=ema, optimizer=opt, verify=True)
        step = meta["step"]
        assert latest.name == f"step-{step:09d}" and meta["data_position"]["batches"] == step
        assert step > last_step and len(opt.state_dict()["state"]) == 4 and ema.num_updates == step
        last_step = step

    # The next save of this (live) process removes the dead writers' leftovers.
    model, opt, ema = _fresh_objects()
    load_checkpoint(run, model=model, ema=ema, optimizer=opt)
    save_checkpoint(run, step=last_step + 1, model=model, ema=ema, optimizer=opt, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [f"step-{last_step:09d}", f"step-{last_step + 1:09d}"]


def test_bad_inputs_name_the_argument(tmp_path):
    model = tiny_model()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="run_dir"):
        save_checkpoint(a_file, step=1, model=model)
    with pytest.raises(ValueError, match="run_dir"):
        latest_checkpoint(a_file)
    with pytest.raises(ValueError, match="path_or_run_dir"):
        load_checkpoint(a_file, model=model)
    with pytest.raises(FileNotFoundError, match="path_or_run_dir"):
        load_checkpoint(tmp_path / "nope", model=model)
    with pytest.raises(FileNotFoundError, match="path_or_run_dir"):
        load_checkpoint(tmp_path, model=model)  # a run directory with no checkpoint yet
    assert latest_checkpoint(tmp_path / "nope") is None
    for kw, name in [({"step": -1}, "step"), ({"step": 1.5}, "step"), ({"step": 1, "keep_last": 0}, "keep_last"),
                     ({"step": 1, "data_position": {"x": object()}}, "data_position"),
                     ({"step": 1, "extra": {"lr": float("nan")}}, "extra")]:
        with pytest.raises(ValueError, match=name):
            save_checkpoint(tmp_path, model=model, **kw)
    with pytest.raises(TypeError, match="model"):
        save_checkpoint(tmp_path, step=1, model=42)

    path = save_checkpoint(tmp_path, step=1, model=model)
    other = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3, bias=False),
                          nn.Linear(3, 3, bias=False))
    with pytest.raises(ValueError, match=r"model: keys don't match.*missing 1 \[4\.weight\]; unexpected 1 \[3\.bias\]"):
        load_checkpoint(path, model=other)
    wide = nn.Sequential(nn.Linear(6, 17), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"model: shapes don't match.*'0.weight' \(17, 6\) vs \(16, 6\), '0.bias'"):
        load_checkpoint(path, model=wide)
    with pytest.raises(ValueError, match="ema"):
        load_checkpoint(path, model=model, ema=EMA(model))
    path2 = save_checkpoint(tmp_path / "e", step=1, model=model, ema=EMA(model))
    before = params(model)
    with pytest.raises(ValueError, match=r"ema: keys don't match"):  # checked before the model is touched
        load_checkpoint(path2, model=model, ema=EMA(nn.Linear(2, 2)), strict=False)
    assert_same(params(model), before)
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = params(other)
    load_checkpoint(path, model=other, strict=False)  # non-strict: the common keys load
    assert not torch.equal(params(other)["0.weight"], before["0.weight"])

    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="path_or_run_dir.*newer"):
        load_checkpoint(tmp_path, model=model)


def test_ema_helper():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    model.bias.requires_grad_(False)
    ema = EMA(model, decay=0.75)
    assert set(ema.shadow) == {"weight"} and ema.shadow["weight"].dtype == torch.float32
    w0 = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = w0 + 0.25 * (model.weight.float() - w0)
    assert torch.allclose(ema.shadow["weight"], expected) and ema.num_updates == 1
    other = nn.Linear(3, 2).to(torch.bfloat16)
    ema.copy_to(other)
    assert torch.equal(other.weight, ema.shadow["weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="state_dict"):
        EMA(nn.Linear(3, 3)).load_state_dict(ema.state_dict())
