"""Command-line overrides of stage configs (`--set table.key=value`) and the resolved config a run saves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stdit.train.config import ConfigError, StageConfig, apply_overrides, from_dict, load_config

BASE = '[data]\ncsv = "d.csv"\nbatch_size = 8\n[optim]\nlr = 2e-5\n[run]\nout_dir = "o"\n'


@pytest.fixture
def stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(BASE)
    return path


def test_overrides_are_typed_by_the_field(stage, tmp_path):
    cfg = load_config(stage, ["optim.lr=1e-4", "data.batch_size=4", "run.steps=7", "run.dtype=bf16",
                              "data.image_size=[64, 48]", "model.checkpoint=true", "model.preset=STDiT3-demo",
                              "run.out_dir=123", "optim.weight_decay=0", "model.space_scale=0.5"])  # fmt: skip
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.data.batch_size == 4 and type(cfg.data.batch_size) is int and cfg.run.steps == 7
    assert cfg.run.dtype == "bf16" and cfg.model.preset == "STDiT3-demo" and cfg.model.checkpoint is True
    assert cfg.data.image_size == [64, 48]
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float  # an int literal for a float field
    assert cfg.model.space_scale == 0.5
    assert cfg.run.out_dir == str(tmp_path / "123")  # a text field keeps the text; relative paths resolve as in files
    # the file's other values stay; later overrides win over earlier ones
    assert cfg.optim.grad_clip == 1.0 and load_config(stage, ["run.steps=3", "run.steps=5"]).run.steps == 5
    # quoted strings and 'none' for fields that may be unset
    assert load_config(stage, ['model.fused_ops="triton"']).model.fused_ops == "triton"
    assert load_config(stage, ["model.fused_ops=triton", "model.fused_ops=none"]).model.fused_ops is None


def test_dict_fields_take_inline_tables_and_deeper_keys(stage):
    cfg = load_config(stage, ["model.preset=STDiT3-demo", "diffusion.kind=rflow",
                              "diffusion.mask_ratios={random = 0.25, image_head = 0.5}",
                              "diffusion.mask_ratios.quarter_tail=0.125"])  # fmt: skip
    assert cfg.diffusion.mask_ratios == {"random": 0.25, "image_head": 0.5, "quarter_tail": 0.125}
    with pytest.raises(ConfigError, match=r"--set optim.lr.x: \[optim\] lr is a float, not a table"):
        load_config(stage, ["optim.lr.x=1"])


def test_bad_overrides_are_clear_errors(stage):
    with pytest.raises(ConfigError, match=r"--set optim.learning_rate: \[optim\] unknown key 'learning_rate'; "
                       r"expected some of \['ema_decay'"):  # fmt: skip
        load_config(stage, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"--set trainer.lr: unknown table 'trainer'; expected one of \['stage'"):
        load_config(stage, ["trainer.lr=1"])
    with pytest.raises(ConfigError, match=r"--set run.steps: expected a int, got 'ten'"):
        load_config(stage, ["run.steps=ten"])
    with pytest.raises(ConfigError, match=r"--set data.image_size: expected a list\[int\], got \[64.5, 64\]"):
        load_config(stage, ["data.image_size=[64.5, 64]"])
    for bad in ("optim.lr", "lr=1", ".lr=1", "optim.=1"):
        with pytest.raises(ConfigError, match="expected table.key=value"):
            load_config(stage, [bad])
    # the override is validated with the rest: a value the file could not hold either is refused
    with pytest.raises(ConfigError, match=r"\[run\] dtype must be 'fp32' or 'bf16', got 'fp16'"):
        load_config(stage, ["run.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"\[diffusion\] kind must be one of \('iddpm', 'rflow'\)"):
        load_config(stage, ["diffusion.kind=ddim"])
    with pytest.raises(ConfigError, match=r"\[diffusion\] sample_method belong to kind = 'rflow'"):
        load_config(stage, ["diffusion.sample_method=logit-normal"])
    with pytest.raises(ConfigError, match=r"\[diffusion\] mask_ratios: unknown kind 'head'"):
        load_config(stage, ["model.preset=STDiT3-demo", "diffusion.kind=rflow", "diffusion.mask_ratios.head=0.1"])
    with pytest.raises(ConfigError, match=r"mask_ratios need a model with conditioning frames \(STDiT3-...\), not STDiT"):
        load_config(stage, ["diffusion.kind=rflow", "diffusion.mask_ratios.random=0.1"])
    with pytest.raises(ConfigError, match=r"\[data\] buckets: unknown resolution '77p'"):
        load_config(stage, ["data.buckets.77p.1=[1.0, 2]"])
    with pytest.raises(ConfigError, match=r"use_timestep_transform maps every t of a 8-frame clip to 0"):
        load_config(stage, ["diffusion.kind=rflow", "diffusion.use_timestep_transform=true", "data.num_frames=8"])
    assert load_config(stage, ["diffusion.kind=rflow", "diffusion.use_timestep_transform=true",
                               "data.num_frames=17"]).diffusion.use_timestep_transform  # fmt: skip


def test_apply_overrides_leaves_the_document_alone():
    raw = {"data": {"csv": "a", "image_size": [32, 32]}, "run": {"out_dir": "o"}}
    out = apply_overrides(raw, ["data.image_size=[16, 16]", "optim.lr=0.5"])
    assert raw == {"data": {"csv": "a", "image_size": [32, 32]}, "run": {"out_dir": "o"}}
    assert out["data"]["image_size"] == [16, 16] and out["optim"] == {"lr": 0.5}


def test_resolved_config_round_trips(stage, tmp_path):
    """The resolved config (what to_dict gives, as config.resolved.json holds it) loads back to the same config."""
    cfg = load_config(stage, ["optim.lr=3e-4", "model.preset=STDiT3-demo", "diffusion.kind=rflow",
                              "diffusion.mask_ratios.random=0.5", "data.buckets.64px.8=[[1.0, 0.5], 4]",
                              "data.buckets.64px.1=[1.0, 8]", "data.aspect_ratios=[0.5, 1]"])
    path = tmp_path / "config.resolved.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = load_config(path)
    assert isinstance(again, StageConfig) and again.to_dict() == cfg.to_dict()
    assert from_dict(json.loads(path.read_text())).to_dict() == cfg.to_dict()
    assert load_config(path, ["optim.lr=1e-3"]).optim.lr == 1e-3  # a saved run's config is a starting point too


def test_train_command_applies_overrides_and_saves_the_resolved_config(tmp_path):
    """`stdit train --set ...` trains with the overridden values and saves them, resolved, in the run folder;
    `python -m stdit.train train` (torchrun's entry point) takes the same flags."""
    from stdit.train.synthetic import make_synthetic_dataset

    csv = make_synthetic_dataset(tmp_path / "data", num_videos=2, num_images=2, frames=4, size=(16, 16), seed=1)
    stage = tmp_path / "s.toml"
    stage.write_text(f'[model]\npreset = "STDiT-mini"\n[data]\ncsv = "{csv}"\nnum_frames = 1\nimage_size = [16, 16]\n'
                     f'batch_size = 2\n[encoders]\nmodel_max_length = 8\n[run]\nout_dir = "{tmp_path / "run"}"\n'
                     'steps = 100\neval_batches = 0\n')
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for i, entry in enumerate((["-m", "stdit", "train"], ["-m", "stdit.train", "train"])):
        out = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, *entry, "--config", str(stage), "--quiet", "--set", "run.steps=1",
                               "--set", "optim.lr=1e-4", "--set", f"run.out_dir={out}", "--set", "data.batch_size=1"],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 1
        saved = json.loads((out / "config.resolved.json").read_text())
        assert saved["optim"]["lr"] == 1e-4 and saved["run"]["steps"] == 1 and saved["data"]["batch_size"] == 1
        assert saved["optim"]["grad_clip"] == 1.0 and saved["diffusion"]["kind"] == "iddpm"  # defaults, resolved
        assert not list(Path(out).glob(".config.resolved.json.*"))  # written atomically: no temporary left
    proc = subprocess.run([sys.executable, "-m", "stdit", "train", "--config", str(stage), "--set", "optim.lrr=1"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "unknown key 'lrr'; expected some of" in proc.stderr
