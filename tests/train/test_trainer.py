"""Training stages end to end at debug size on generated data: resume after a crash continues the
same trajectory bitwise, SIGKILL never costs a run, stage 2 starts as the stage-1 image model,
corrupt files are skipped and counted, configs are validated, and sampling writes a video."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stdit.train.build import build_model, init_from_previous, load_pixart_into_stdit
from stdit.train.checkpoint import checkpoint_weights, latest_checkpoint
from stdit.train.config import ConfigError, from_dict, load_config
from stdit.train.trainer import train_stage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stdit.train.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root, num_videos=6, num_images=2, frames=10, size=(32, 32), seed=1, corrupt=2)


def _cfg(data, out, **over):
    raw = {
        "stage": {"name": "test"},
        "model": {"preset": "STDiT-mini", "attention_backend": "reference"},
        "data": {"csv": str(data), "num_frames": 4, "frame_interval": 2, "image_size": [32, 32], "batch_size": 2},
        "encoders": {"model_max_length": 16},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "run": {"out_dir": str(out), "steps": 6, "seed": 3, "log_every": 1, "ckpt_every": 2},
    }
    for key, value in over.items():
        table, _, name = key.partition("__")
        raw[table][name] = value
    return from_dict(raw)


def _log(out: Path) -> list[dict]:
    with (Path(out) / "log.csv").open() as f:
        return list(csv.DictReader(f))


def _weights(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_the_same_trajectory_bitwise(data, tmp_path):
    sched = dict(optim__lr_schedule="cosine", optim__warmup_steps=2)  # the schedule resumes too
    full = train_stage(_cfg(data, tmp_path / "full", **sched), progress=False)
    assert full["step"] == 6
    part = train_stage(_cfg(data, tmp_path / "part", **sched), progress=False, max_steps=3)  # "crash" after step 3
    assert part["step"] == 3
    rest = train_stage(_cfg(data, tmp_path / "part", **sched), progress=False)  # resumes from step 2's checkpoint
    assert rest["init"].startswith("resumed from") and rest["step"] == 6
    assert [r["loss"] for r in _log(tmp_path / "part")] == [r["loss"] for r in _log(tmp_path / "full")]
    _assert_same_weights(_weights(tmp_path / "part"), _weights(tmp_path / "full"))
    # the fixed evaluation (steps 0, 2, 4, 6) is deterministic and unaffected by the crash
    assert (tmp_path / "part" / "eval.csv").read_text() == (tmp_path / "full" / "eval.csv").read_text()
    rows = list(csv.DictReader((tmp_path / "full" / "eval.csv").open()))
    assert [r["step"] for r in rows] == ["0", "2", "4", "6"]
    # EMA weights are scored too; at step 0 they are the model itself
    assert rows[0]["ema_loss"] == rows[0]["eval_loss"] and all(float(r["ema_loss"]) > 0 for r in rows)
    assert rows[-1]["ema_loss"] != rows[-1]["eval_loss"] and full["ema_eval_last"] == pytest.approx(float(rows[-1]["ema_loss"]), abs=1e-6)


def test_log_reports_model_flops(data, tmp_path):
    """log.csv's TFLOP/s is the cost model's count of each step over the time taken; MFU needs a
    datasheet peak, which a CPU has not."""
    from stdit.models import from_preset
    from stdit.models.costs import model_cost
    from stdit.train.build import build_encoders, build_model
    from stdit.train.trainer import step_flops

    cfg = _cfg(data, tmp_path / "run", run__steps=2)
    train_stage(cfg, progress=False)
    rows = _log(tmp_path / "run")
    assert len(rows) == 2 and all(float(r["tflops_per_s"]) > 0 and r["mfu_pct"] == "" for r in rows)
    model = build_model(cfg, build_encoders(cfg, torch.device("cpu"))[1].hidden_size, torch.device("cpu"))
    for r in rows:  # both columns come from the same window: FLOPs per sample = TFLOP/s / samples/s
        per_sample = float(r["tflops_per_s"]) * 1e12 / float(r["samples_per_s"])
        assert per_sample == pytest.approx(step_flops(model, (4, 4, 4), 1), rel=2e-3)  # printed to 4 digits
    model = from_preset("Latte-mini", checkpoint=True)
    expected = model_cost("latte", size=model.size, latent=(2, 4, 4), batch=3, mode="train_step", checkpoint=True)
    assert step_flops(model, (2, 4, 4), 3) == expected.flops


def test_lr_schedule():
    """Warm-up then constant (Open-Sora 1.0) or cosine to lr_min at the last step; bad values are refused."""
    from stdit.train.config import OptimCfg
    from stdit.train.trainer import lr_at

    const = OptimCfg(lr=1e-3, warmup_steps=4)
    assert [lr_at(s, const, 10) for s in (0, 1, 3, 4, 9)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    cos = OptimCfg(lr=1e-3, lr_schedule="cosine", warmup_steps=2, lr_min=1e-4)
    got = [lr_at(s, cos, 13) for s in range(13)]
    assert got[:2] == pytest.approx([5e-4, 1e-3]) and got[2] == pytest.approx(1e-3)
    assert got[-1] == pytest.approx(1e-4) and got[7] == pytest.approx(5.5e-4)  # halfway down
    assert all(a >= b for a, b in zip(got[2:], got[3:]))
    assert lr_at(0, OptimCfg(lr=1e-3, lr_schedule="cosine"), 1) == pytest.approx(1e-3)  # a one-step stage
    with pytest.raises(ConfigError, match="leaves no steps to decay over"):
        from_dict({"data": {"csv": "a"}, "run": {"out_dir": "o", "steps": 10},
                   "optim": {"lr_schedule": "cosine", "warmup_steps": 9}})
    for bad, match in ((dict(lr_schedule="linear"), "lr_schedule must be"), (dict(warmup_steps=-1), "warmup_steps"),
                       (dict(lr_min=1.0), "lr_min")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            from_dict({"data": {"csv": "a"}, "run": {"out_dir": "o"}, "optim": {"lr": 1e-3, **bad}})


def test_sigkill_at_random_moments_then_resume(data, tmp_path):
    """Kill the training process with SIGKILL at random moments; every resume picks up the last
    complete checkpoint, and the finished run equals an uninterrupted one bitwise."""
    import tomllib  # noqa: F401  (configs are TOML files for the subprocess)

    ref = train_stage(_cfg(data, tmp_path / "ref", run__steps=8), progress=False)
    out = tmp_path / "killed"
    cfg_file = tmp_path / "stage.toml"
    cfg_file.write_text(
        f"""[model]\npreset = "STDiT-mini"\nattention_backend = "reference"\n
[data]\ncsv = "{data}"\nnum_frames = 4\nframe_interval = 2\nimage_size = [32, 32]\nbatch_size = 2\n
[encoders]\nmodel_max_length = 16\n[optim]\nlr = 1e-3\nema_decay = 0.9\n
[run]\nout_dir = "{out}"\nsteps = 8\nseed = 3\nlog_every = 1\nckpt_every = 1\n"""
    )
    rng = random.Random(7)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "stdit.train", "train", "--config", str(cfg_file), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        time.sleep(rng.uniform(4.0, 9.0))  # start-up takes a few seconds; then steps and checkpoint writes
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        last = latest_checkpoint(out, verify=True)
        assert last is None or (last / "meta.json").is_file()
    done = train_stage(load_config(cfg_file), progress=False)
    assert done["step"] == 8 and kills >= 1
    _assert_same_weights(_weights(out), _weights(tmp_path / "ref"))
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(tmp_path / "ref")]
    assert ref["step"] == 8


def test_stage2_starts_as_the_stage1_image_model(data, tmp_path):
    """Stage 1 (T = 1) -> stage 2 (T = 4) with temporal attention zeroed: on single-frame input the
    stage-2 model reproduces the stage-1 model's output, and on video every frame is the image model."""
    s1 = _cfg(data, tmp_path / "s1", data__num_frames=1, run__steps=3)
    train_stage(s1, progress=False)
    s2 = _cfg(data, tmp_path / "s2", stage__init_from=str(tmp_path / "s1"), stage__zero_temporal=True)
    image_model = build_model(s1, 32, torch.device("cpu"))
    image_model.load_state_dict(checkpoint_weights(latest_checkpoint(tmp_path / "s1")))
    video_model = build_model(s2, 32, torch.device("cpu"))
    note = init_from_previous(video_model, s2.stage.init_from, zero_temporal=True)
    assert "temporal attention output zeroed" in note
    image_model.eval(), video_model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, 4, generator=g)
    t, y = torch.tensor([10, 500]), torch.randn(2, 1, 16, 32, generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    with torch.no_grad():
        torch.testing.assert_close(video_model(x[:, :, :1], t, y, mask), image_model(x[:, :, :1], t, y, mask))
        per_frame = torch.cat([image_model(x[:, :, i : i + 1], t, y, mask) for i in range(4)], dim=2)
        torch.testing.assert_close(video_model(x, t, y, mask), per_frame, rtol=1e-5, atol=1e-5)


def test_pixart_state_dict_loads_into_the_spatial_part():
    cfg = from_dict({"data": {"csv": "x.csv", "num_frames": 2, "image_size": [32, 32]}, "run": {"out_dir": "o"},
                     "model": {"preset": "STDiT-mini"}, "encoders": {"model_max_length": 16}})  # fmt: skip
    torch.manual_seed(0)
    donor = build_model(cfg, 32, torch.device("cpu"))
    pixart = {k: v for k, v in donor.state_dict().items() if ".attn_temp." not in k and not k.startswith("pos_embed_t")}
    pixart["x_embedder.proj.weight"] = pixart["x_embedder.proj.weight"][:, :, 0]  # PixArt's 2D conv
    model = build_model(cfg, 32, torch.device("cpu"))
    load_pixart_into_stdit(model, pixart)
    for k, v in donor.state_dict().items():
        if ".attn_temp." not in k:
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="init_from: not a PixArt-alpha state dict"):
        load_pixart_into_stdit(model, {"foo": torch.zeros(1)})


def test_corrupt_files_are_skipped_and_counted(data, tmp_path):
    """The synthetic set has 2 broken entries; training finishes and the log counts skips."""
    summary = train_stage(_cfg(data, tmp_path / "c", run__steps=12, data__batch_size=3), progress=False)
    assert summary["step"] == 12
    assert sum(int(r["skipped"]) for r in _log(tmp_path / "c")) >= 1


def test_config_errors_name_table_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[optim\] unknown key 'learning_rate'; expected some of \['ema_decay'"):
        from_dict({"optim": {"learning_rate": 1}, "data": {"csv": "a"}, "run": {"out_dir": "o"}})
    with pytest.raises(ConfigError, match=r"unknown table\(s\) \['trainer'\]"):
        from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match=r"\[data\] needs exactly one of csv"):
        from_dict({"run": {"out_dir": "o"}})
    with pytest.raises(ConfigError, match=r"\[run\] steps: expected a int, got 'ten'"):
        from_dict({"data": {"csv": "a"}, "run": {"out_dir": "o", "steps": "ten"}})
    with pytest.raises(ConfigError, match=r"image_size must be \[H, W\], positive multiples of 16"):
        from_dict({"data": {"csv": "a", "image_size": [30, 30]}, "run": {"out_dir": "o"}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nout_dir = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config: no such file"):
        load_config(tmp_path / "missing.toml")


def test_demo_chain_and_sample_command(data, tmp_path):
    """The CPU demo's shape, shortened: three chained stages from the command line, then a video."""
    cfgs = []
    for i, (frames, size, init) in enumerate([(1, 32, ""), (4, 32, "previous"), (4, 48, "previous")]):
        path = tmp_path / f"s{i}.toml"
        path.write_text(
            f"""[stage]\nname = "s{i}"\ninit_from = "{init}"\nzero_temporal = {str(i == 1).lower()}\n
[model]\npreset = "STDiT-mini"\n[data]\ncsv = "{data}"\nnum_frames = {frames}\nimage_size = [{size}, {size}]\nbatch_size = 2\n
[encoders]\ntext = "tiny-words"\nmodel_max_length = 16\n[run]\nout_dir = "{tmp_path / f"run{i}"}"\nsteps = 2\nckpt_every = 2\n"""
        )
        cfgs += ["--config", str(path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "stdit", "train", *cfgs, "--quiet"], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"step": 2') == 3
    video = tmp_path / "v.mp4"
    proc = subprocess.run([sys.executable, "-m", "stdit", "sample", "--checkpoint", str(tmp_path / "run2"), "--prompt",
                           "a red circle moving left", "--out", str(video), "--steps", "3", "--quiet",
                           "--sheet", str(tmp_path / "sheet.png")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import av

    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (48, 48, 3)
    from PIL import Image

    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))  # the 4 frames side by side (mp4 is lossy)
    assert sheet.shape == (48, 4 * 48, 3)
    assert np.abs(sheet[:, 48:96].astype(int) - frames[1].astype(int)).mean() < 12


def test_stage_cache_encodes_once_then_trains_from_it(data, tmp_path):
    """[data] cache: the first run encodes the CSV into the folder, later runs (and other stages with the same
    data settings) reuse it; a stage whose frames or size differ is refused instead of reading stale latents."""
    from stdit.train.prepare import INDEX_NAME, CachedLatentDataset

    cache = tmp_path / "cache"
    first = train_stage(_cfg(data, tmp_path / "a", data__cache=str(cache), run__steps=2), progress=False)
    assert first["step"] == 2 and (cache / INDEX_NAME).is_file()
    assert len(CachedLatentDataset(cache)) == 8  # 6 videos + 2 images; the 2 broken entries were skipped
    stamp = (cache / INDEX_NAME).stat().st_mtime_ns
    again = train_stage(_cfg(data, tmp_path / "b", data__cache=str(cache), run__steps=2), progress=False)
    assert (cache / INDEX_NAME).stat().st_mtime_ns == stamp  # not encoded again
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]
    assert again["step"] == 2
    with pytest.raises(ConfigError, match=r"\[data\] cache: .*latents of shape"):
        train_stage(_cfg(data, tmp_path / "c", data__cache=str(cache), data__num_frames=2), progress=False)
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))  # the CSV changed since: the cache is stale
    with pytest.raises(ConfigError, match=r"prepared from other data or encoders: csv_mtime_ns"):
        train_stage(_cfg(data, tmp_path / "e", data__cache=str(cache)), progress=False)
    with pytest.raises(ConfigError, match=r"cache .* needs \[data\] csv"):
        _cfg(data, tmp_path / "d", data__csv="", data__cached=str(cache), data__cache=str(cache))


def test_prepare_then_train_from_the_cache(data, tmp_path):
    """`stdit prepare` encodes the stage's CSV once; a stage with [data] cached trains from it and
    sees the same number of good samples (corrupt files were skipped and counted at prepare time)."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        f"""[model]\npreset = "STDiT-mini"\n[data]\ncsv = "{data}"\nnum_frames = 4\nimage_size = [32, 32]\nbatch_size = 2\n
[encoders]\nmodel_max_length = 16\n[run]\nout_dir = "{tmp_path / "unused"}"\n"""
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "stdit", "prepare", "--config", str(cfg), "--out", str(tmp_path / "cache"),
                           "--shard-size", "3", "--quiet"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from stdit.train.prepare import CachedLatentDataset

    cache = CachedLatentDataset(tmp_path / "cache")
    assert len(cache) == 8 and cache.num_skipped == 2  # 6 videos + 2 images; 2 broken entries
    assert sorted({cache.group_key(i) for i in range(len(cache))}) == [1, 4]
    cached = _cfg(data, tmp_path / "run", data__csv="", data__cached=str(tmp_path / "cache"), run__steps=3)
    summary = train_stage(cached, progress=False)
    assert summary["step"] == 3 and all(int(r["skipped"]) == 0 for r in _log(tmp_path / "run"))


def test_demo_configs_are_valid_and_chained():
    """configs/demo (scripts/demo.sh): valid stage files whose stages start from the previous one's run."""
    from stdit.models import MODEL_PRESETS

    root = Path(__file__).resolve().parents[2]
    cfgs = [load_config(root / "configs" / "demo" / f"stage{i}.toml") for i in (1, 2, 3)]
    assert all(c.model.preset in MODEL_PRESETS for c in cfgs)
    assert cfgs[0].data.num_frames == 1 and cfgs[1].stage.zero_temporal and cfgs[1].data.num_frames > 1
    assert cfgs[1].stage.init_from == cfgs[0].run.out_dir and cfgs[2].stage.init_from == cfgs[1].run.out_dir
    assert cfgs[2].data.image_size[0] > cfgs[1].data.image_size[0]  # stage 3: higher resolution
    assert len({c.data.cache for c in cfgs}) == 3  # each stage encodes its own frames / size


def test_relative_paths_resolve_against_the_launch_directory(tmp_path, monkeypatch):
    """Data, output and encoder folders are stored absolute (a checkpoint's config must name the same VAE
    whatever directory `stdit sample` runs from); the built-in encoder names stay names."""
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[data]\ncsv = "d/c.csv"\n[encoders]\nvae = "w/vae"\ntext = "tiny-words"\n[run]\nout_dir = "o"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file)
    assert cfg.encoders.vae == str(tmp_path / "w" / "vae") and cfg.encoders.text == "tiny-words"
    assert cfg.data.csv == str(tmp_path / "d" / "c.csv") and cfg.run.out_dir == str(tmp_path / "o")
    assert from_dict(cfg.to_dict()).encoders.vae == cfg.encoders.vae  # as stored in a checkpoint's meta.json
    with pytest.raises(ConfigError, match=r"\[encoders\] text: expected 'tiny' or 'tiny-words' or a local"):
        from_dict({"data": {"csv": "a"}, "run": {"out_dir": "o"}, "encoders": {"text": ""}})


def test_out_dir_of_another_configuration_is_refused(data, tmp_path):
    """Resuming needs the same model and data shape: a run folder of another configuration is an error
    that says so, not a shape mismatch deep inside load_state_dict."""
    train_stage(_cfg(data, tmp_path / "run", run__steps=2), progress=False)
    with pytest.raises(ConfigError, match=r"holds a run of another configuration \(\[data\] image_size \[32, 32\] there"):
        train_stage(_cfg(data, tmp_path / "run", run__steps=4, data__image_size=[48, 48]), progress=False)


def test_engines_resume_from_the_newest_checkpoint_they_read(tmp_path):
    """One process resumes fully from either its own or a distributed checkpoint; the distributed
    engines take a newer single-process checkpoint's weights only; a tie goes to the first kind."""
    from stdit.train.checkpoint import SINGLE, save_checkpoint
    from stdit.train.distributed_checkpoint import DCP, save_distributed
    from stdit.train.engines import ColossalEngine, Engine, TorchDistributedEngine

    out, cpu, model = tmp_path / "run", torch.device("cpu"), torch.nn.Linear(2, 2)
    cfg = _cfg("unused.csv", out)
    cfg.parallel.dp = 2
    one, torch_dist, cai = Engine(cfg, cpu), TorchDistributedEngine(cfg, cpu, 0, 2, None), ColossalEngine(cfg, cpu, 0, 2, None)
    assert one._newest(out) is None
    save_checkpoint(out, step=3, model=model)
    save_distributed(out / DCP.subdir, 3, model)
    found = {e: e._newest(out) for e in (one, torch_dist, cai)}
    assert [(f.kind, f.path.name, f.fully) for f in found.values()] == [
        (SINGLE, "step-000000003", True), (SINGLE, "step-000000003", False), (SINGLE, "step-000000003", False)]
    save_distributed(out / DCP.subdir, 4, model)
    assert one._newest(out).kind is DCP and torch_dist._newest(out)[:3] == (DCP, out / "dcp" / "step-000000004", True)
    assert cai._newest(out).kind is SINGLE  # ColossalAI reads no distributed checkpoint


# ----------------------------------------------------------------------------------------------------
# Open-Sora 1.2: STDiT3 + rectified flow + buckets + conditioning masks
# ----------------------------------------------------------------------------------------------------

V12_BUCKETS = {"32px": {"1": [1.0, 2], "4": [[1.0, 0.5], 2], "2": [1.0, 3]}}


def _cfg12(data, out, **over):
    raw = {
        "stage": {"name": "v12"},
        "model": {"preset": "STDiT3-mini", "attention_backend": "reference"},
        "data": {"csv": str(data), "frame_interval": 2, "buckets": V12_BUCKETS, "aspect_ratios": [0.5, 1.0]},
        "encoders": {"model_max_length": 16},
        "diffusion": {"kind": "rflow", "sample_method": "logit-normal",
                      "mask_ratios": {"random": 0.3, "image_head": 0.3, "quarter_tail": 0.2}},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "run": {"out_dir": str(out), "steps": 6, "seed": 3, "log_every": 1, "ckpt_every": 2},
    }  # fmt: skip
    for key, value in over.items():
        table, _, name = key.partition("__")
        raw[table][name] = value
    return from_dict(raw)


def test_stdit3_rflow_buckets_masks_train_and_resume_bitwise(data, tmp_path, monkeypatch):
    """A tiny STDiT3 + rectified-flow stage over bucketed data with conditioning masks trains, changes the
    weights, crosses an epoch, and a run killed after step 3 resumes to the same losses and weights. The
    model sees Open-Sora 1.2's keywords: x_mask = the loss's frame mask, fps, pixel height / width."""
    from stdit.models.stdit3 import STDiT3
    from stdit.train.rflow import RFlow

    seen = []
    forward, losses = STDiT3.forward, RFlow.training_losses

    def spy_forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, **kw):
        if self.training:
            seen.append(dict(shape=tuple(x.shape), x_mask=None if x_mask is None else x_mask.clone(), fps=fps.clone(),
                             height=height.clone(), width=width.clone(), ar=kw["ar"].clone(),
                             num_frames=kw["num_frames"].clone()))  # fmt: skip
        return forward(self, x, timestep, y, mask, x_mask, fps, height, width, **kw)

    def spy_losses(self, model, x_start, model_kwargs=None, noise=None, mask=None, weights=None, t=None):
        if model.training:
            seen.append(dict(loss_mask=None if mask is None else mask.clone()))
        return losses(self, model, x_start, model_kwargs, noise, mask, weights, t)

    monkeypatch.setattr(STDiT3, "forward", spy_forward)
    monkeypatch.setattr(RFlow, "training_losses", spy_losses)
    full = train_stage(_cfg12(data, tmp_path / "full"), progress=False)
    calls = [(seen[i], seen[i + 1]) for i in range(0, len(seen), 2)]
    assert len(calls) == 6
    shapes = {c["shape"][2:] for _, c in calls}
    assert len(shapes) >= 2  # several buckets: images (T = 1) and clips of 2 or 4 frames
    masked = 0
    for loss_call, model_call in calls:
        B, T = model_call["shape"][0], model_call["shape"][2]
        assert B == {1: 2, 4: 2, 2: 3}[T]  # each bucket's own batch size
        assert model_call["x_mask"].shape == (B, T) and torch.equal(model_call["x_mask"], loss_call["loss_mask"])
        masked += int((~model_call["x_mask"]).any())
        H, W = model_call["shape"][3] * 8, model_call["shape"][4] * 8  # latents are 1/8 of the pixels
        assert torch.equal(model_call["height"], torch.full((B,), float(H)))
        assert torch.equal(model_call["width"], torch.full((B,), float(W)))
        assert torch.equal(model_call["ar"], torch.full((B,), H / W))
        assert torch.equal(model_call["num_frames"], torch.full((B,), float(T)))
        # synthetic videos are 8 fps, taken every 2nd frame -> 4; images carry Open-Sora 1.2's 120
        assert torch.equal(model_call["fps"], torch.full((B,), 120.0 if T == 1 else 4.0))
    assert masked >= 1  # some batch conditioned on given frames
    rows = _log(tmp_path / "full")
    assert [r["mse"] for r in rows] == [""] * 6 and {r["epoch"] for r in rows} >= {"0", "1"}
    assert full["eval_last"] < full["eval_first"]  # it learns (fixed-batch loss)

    part = train_stage(_cfg12(data, tmp_path / "part"), progress=False, max_steps=3)
    assert part["step"] == 3
    rest = train_stage(_cfg12(data, tmp_path / "part"), progress=False)
    assert rest["init"].startswith("resumed from") and rest["step"] == 6
    assert [r["loss"] for r in _log(tmp_path / "part")] == [r["loss"] for r in rows]
    assert (tmp_path / "part" / "eval.csv").read_text() == (tmp_path / "full" / "eval.csv").read_text()
    _assert_same_weights(_weights(tmp_path / "part"), _weights(tmp_path / "full"))
    saved = load_config(tmp_path / "full" / "config.resolved.json")
    assert saved.diffusion.kind == "rflow" and saved.data.buckets == V12_BUCKETS


def test_stdit3_stage_from_a_bucketed_cache(data, tmp_path):
    """[data] cache with buckets: encoded once per bucket shape, then trained from; the cache's buckets decide
    the shapes and batch sizes."""
    from stdit.train.prepare import CachedLatentDataset

    cfg = _cfg12(data, tmp_path / "run", data__cache=str(tmp_path / "cache"), run__steps=3)
    summary = train_stage(cfg, progress=False)
    assert summary["step"] == 3
    cache = CachedLatentDataset(tmp_path / "cache")
    assert len({cache.bucket(i) for i in range(len(cache))}) >= 2
    again = train_stage(_cfg12(data, tmp_path / "run2", data__cache=str(tmp_path / "cache"), run__steps=3),
                        progress=False)  # fmt: skip
    assert again["step"] == 3 and [r["loss"] for r in _log(tmp_path / "run")] == [r["loss"] for r in _log(tmp_path / "run2")]


class _Skip(torch.nn.Module):
    """A block that returns its input tokens (called as the model calls a block: tokens first)."""

    def forward(self, x, *args):
        return x


def test_family_specific_options_are_refused_or_mapped_for_stdit3(data, tmp_path):
    """zero_temporal makes STDiT3's temporal blocks the identity (the model equals its spatial blocks run
    alone); PixArt initialisation and STDiT-only options are refused with the reason."""
    from stdit.models import from_preset
    from stdit.train.build import zero_temporal_output
    from stdit.train.config import ConfigError

    torch.manual_seed(0)
    model = from_preset("STDiT3-mini", caption_channels=16, model_max_length=4).eval()
    for name, p in model.named_parameters():  # no zero-initialised layer left: temporal blocks change the output
        if name != "rope.freqs":
            torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 4, 3, 4, 4), torch.tensor([10.0, 500.0]), torch.randn(2, 1, 4, 16)
    kw = dict(fps=torch.full((2,), 8.0), height=torch.full((2,), 32.0), width=torch.full((2,), 32.0))
    with torch.no_grad():
        before = model(x, t, y, **kw)
        assert "temporal blocks" in zero_temporal_output(model)
        after = model(x, t, y, **kw)
        model.temporal_blocks = torch.nn.ModuleList(_Skip() for _ in model.temporal_blocks)
        spatial_only = model(x, t, y, **kw)
    assert (before - after).abs().max() > 1e-3 and torch.allclose(after, spatial_only, atol=1e-6)

    with pytest.raises(ConfigError, match=r"pixart:...' maps PixArt-alpha into STDiT \(Open-Sora 1.0\); STDiT3"):
        init_from_previous(from_preset("STDiT3-mini"), "pixart:x.pth", False)
    with pytest.raises(ConfigError, match=r"\[model\] space_scale: STDiT's fixed position tables"):
        build_model(_cfg12(data, tmp_path / "a", model__space_scale=0.5), 16, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"\[model\] freeze: STDiT3 takes one of \['not_temporal', 'y_embedder'\]"):
        build_model(_cfg12(data, tmp_path / "a", model__freeze="text"), 16, torch.device("cpu"))
    m = build_model(_cfg12(data, tmp_path / "a", model__freeze="not_temporal"), 16, torch.device("cpu"))
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"temporal_blocks"}


def test_demo_v12_configs_are_valid_and_chained():
    """configs/demo_v12: STDiT3 + rectified flow, images then videos in buckets of several shapes with
    conditioning masks, stage 2 starting from stage 1's run."""
    from stdit.train.buckets import BucketConfig

    root = Path(__file__).resolve().parents[2]
    cfgs = [load_config(root / "configs" / "demo_v12" / f"stage{i}.toml") for i in (1, 2)]
    assert all(c.model.preset == "STDiT3-demo" and c.diffusion.kind == "rflow" for c in cfgs)
    assert cfgs[1].stage.init_from == cfgs[0].run.out_dir and cfgs[1].stage.zero_temporal
    assert cfgs[1].diffusion.mask_ratios and not cfgs[0].diffusion.mask_ratios
    for c, frames in zip(cfgs, ({1}, {4, 8})):
        shapes = {b.shape for b in BucketConfig(c.data.buckets, c.data.aspect_ratios).buckets() if b.aspect_ratio == 1.0}
        assert len(shapes) >= 2 and {t for t, _, _ in shapes} == frames
    assert len({c.data.cache for c in cfgs}) == 2
