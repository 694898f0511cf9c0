"""stdit sample: the writers (the frames come back from the mp4 / GIF / PNG sheet, each written atomically:
no temporary file left, an existing file replaced whole); STDiT3 sampling with rectified flow against a
written-out sampler, the command end to end, image-to-video from a conditioning picture, and bad
arguments. STDiT / IDDPM sampling end to end: test_trainer's demo chain."""

import re

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from stdit.models.accel import Broadcast  # noqa: E402
from stdit.train.build import build_encoders, build_model  # noqa: E402
from stdit.train.checkpoint import save_checkpoint  # noqa: E402
from stdit.train.cli import main as train_cli  # noqa: E402
from stdit.train.config import from_dict  # noqa: E402
from stdit.train.rflow import timestep_transform  # noqa: E402
from stdit.train.sample import (  # noqa: E402
    load_cond_image, load_for_sampling, sample_stdit3_latents, sample_video, write_sheet, write_video,
)  # fmt: skip


def _frames(T=4, H=16, W=24):
    levels = np.linspace(0, 240, T).astype(np.uint8)
    return np.stack([np.full((H, W, 3), v, np.uint8) for v in levels])


def test_write_video_mp4_and_gif(tmp_path):
    frames = _frames()
    mp4 = tmp_path / "out" / "v.mp4"
    assert write_video(frames, mp4, fps=8) == mp4
    with av.open(str(mp4)) as c:
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert got.shape == frames.shape
    assert np.abs(got.astype(int) - frames.astype(int)).max() <= 4  # lossy coding: measured max 1 grey level
    gif = write_video(frames[::-1], tmp_path / "out" / "v.gif", fps=8)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (24, 16)
    write_video(frames[:2], mp4, fps=8)  # replaced whole
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.gif", "v.mp4"]


def test_write_sheet(tmp_path):
    frames = _frames()
    sheet = write_sheet(frames, tmp_path / "s.png")
    assert np.array_equal(np.asarray(Image.open(sheet)), np.concatenate(list(frames), axis=1))
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]
    with pytest.raises(ValueError, match="sheet"):
        write_sheet(frames, tmp_path / "s.jpg")


# ------------------------------------------------------------------------------------------------
# Sampling STDiT3 with rectified flow (checkpoints written here with the checkpoint API)
# ------------------------------------------------------------------------------------------------

def _checkpoint(run, preset: str, sample: dict | None = None):
    """A `stdit train`-style checkpoint (meta.json carries the stage config) of a random tiny model;
    ``sample``: the stage's [sample] table."""
    raw = {
        "model": {"preset": preset, "attention_backend": "sdpa"},
        "data": {"csv": str(run / "unused.csv"), "num_frames": 3, "image_size": [32, 32]},
        "encoders": {"model_max_length": 8},
        "diffusion": {"kind": "rflow" if preset.startswith("STDiT3") else "iddpm"},
        "run": {"out_dir": str(run)},
    }  # fmt: skip
    if sample is not None:
        raw["sample"] = sample
    cfg = from_dict(raw)
    _, text = build_encoders(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, text.hidden_size, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every layer random: no zero-initialised path hides
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return save_checkpoint(run, step=1, model=model, extra={"config": cfg.to_dict()})


@pytest.fixture(scope="module")
def stdit3_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("stdit3_run")
    _checkpoint(run, "STDiT3-mini")
    return run


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 50x70 RGB PNG with structure in both directions (another size and aspect than the output)."""
    rows, cols = np.meshgrid(np.linspace(0, 255, 50), np.linspace(0, 255, 70), indexing="ij")
    rgb = np.stack([rows, cols, 255 - cols], axis=-1).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "cond.png"
    Image.fromarray(rgb).save(path)
    return path


def _oracle_latents(model, y, mask, *, T, H, W, fps, steps, cfg_scale, seed):
    """Open-Sora 1.2's RFLOW sampler written out: Euler steps over the transformed schedule, guidance on the
    first C output channels, the model called with the doubled batch and Open-Sora 1.2's keywords."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, T, H // 8, W // 8, generator=g)
    sizes = {"height": torch.tensor([float(H)]), "width": torch.tensor([float(W)]), "num_frames": torch.tensor([float(T)])}
    ts = [timestep_transform(torch.tensor([(1 - i / steps) * 1000]), sizes, nan_quirk=False).clamp(max=1000)
          for i in range(steps)]  # fmt: skip
    ts.append(torch.zeros(1))
    null = model.y_embedder.y_embedding[None, None]  # (1, 1, L, Ct)

    def two(v: float) -> torch.Tensor:
        return torch.full((2,), float(v))

    for i in range(steps):
        out = model(torch.cat([z, z]), torch.cat([ts[i], ts[i]]), y=torch.cat([y, null]), mask=mask.repeat(2, 1),
                    height=two(H), width=two(W), fps=two(fps), num_frames=two(T), ar=two(H / W))  # fmt: skip
        c, u = out[:1, :4], out[1:, :4]
        z = z + (u + cfg_scale * (c - u)) * (ts[i] - ts[i + 1]) / 1000
    return z


def test_stdit3_rflow_latents_match_written_out_sampler(stdit3_run):
    _, model, vae, text, _ = load_for_sampling(stdit3_run, torch.device("cpu"))
    y, mask = text.encode(["a red circle moving left"])
    with torch.no_grad():
        got = sample_stdit3_latents(model, vae, y, mask, num_frames=17, height=24, width=40, fps=12, steps=3,
                                    cfg_scale=5.0, generator=torch.Generator().manual_seed(7))  # fmt: skip
        want = _oracle_latents(model, y, mask, T=17, H=24, W=40, fps=12, steps=3, cfg_scale=5.0, seed=7)
    assert got.shape == (1, 4, 17, 3, 5)  # latent 3x5: odd, padded up to the patch inside the model
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())  # measured 0 (same float32 ops)
    with torch.no_grad():  # the oracle is sensitive: a 30 vs 12 fps input moves the result
        other = _oracle_latents(model, y, mask, T=17, H=24, W=40, fps=30, steps=3, cfg_scale=5.0, seed=7)
    assert (other - want).abs().max() > 1e-3


def test_stdit3_sample_command_end_to_end(stdit3_run, tmp_path, capsys):
    out, sheet = tmp_path / "v.mp4", tmp_path / "sheet.png"
    argv = ["sample", "--checkpoint", str(stdit3_run), "--prompt", "waves", "--out", str(out), "--steps", "2",
            "--frames", "3", "--height", "40", "--width", "24", "--quiet", "--sheet", str(sheet)]  # fmt: skip
    assert train_cli(argv) == 0
    assert capsys.readouterr().out.split() == [str(out), str(sheet)]
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 24  # Open-Sora 1.2's inference fps, the STDiT3 default
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 3 and got[0].shape == (40, 24, 3)
    assert np.asarray(Image.open(sheet)).shape == (40, 3 * 24, 3)


def test_stdit3_cond_image_keeps_the_first_frame(stdit3_run, picture, tmp_path):
    sheet = tmp_path / "sheet.png"
    sample_video(stdit3_run, "a gradient", tmp_path / "v.gif", steps=2, num_frames=3, height=32, width=24,
                 cond_image=picture, progress=False, sheet=sheet, seed=3)  # fmt: skip
    frames = np.asarray(Image.open(sheet)).reshape(32, 3, 24, 3).transpose(1, 0, 2, 3)  # (T, H, W, 3)
    _, _, vae, _, _ = load_for_sampling(stdit3_run, torch.device("cpu"))
    with torch.no_grad():
        recon = vae.decode(vae.encode(load_cond_image(picture, (32, 24)), sample=False))  # (1, 3, 1, H, W)
    recon = ((recon[0, :, 0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy()
    assert np.abs(frames[0].astype(int) - recon).max() <= 1  # frame 0 is the image's VAE reconstruction
    assert np.abs(frames[1].astype(int) - recon).mean() > 5  # the others are generated


def test_stdit3_cond_image_is_a_conditioning_frame(stdit3_run, picture, monkeypatch):
    """The model sees frame 0 as conditioning (x_mask False) at every step, and frame 0's latent stays
    exactly the posterior mean of the picture."""
    _, model, vae, text, _ = load_for_sampling(stdit3_run, torch.device("cpu"))
    seen = []
    forward = type(model).forward

    def spy(self, x, timestep, y, mask=None, x_mask=None, **kw):
        seen.append(x_mask.clone())
        return forward(self, x, timestep, y, mask, x_mask, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    y, mask = text.encode(["a gradient"])
    with torch.no_grad():
        z = sample_stdit3_latents(model, vae, y, mask, num_frames=4, height=24, width=32, fps=24, steps=2,
                                  cond_image=picture, generator=torch.Generator().manual_seed(0))  # fmt: skip
        ref = vae.encode(load_cond_image(picture, (24, 32)), sample=False)
    assert len(seen) == 2 and all(m.tolist() == [[False, True, True, True]] * 2 for m in seen)
    assert torch.equal(z[:, :, :1], ref)


def test_load_cond_image_scales_to_cover_and_centre_crops(tmp_path):
    rgb = np.zeros((20, 60, 3), np.uint8)
    rgb[:, :30, 0] = 255  # left half red, right half blue
    rgb[:, 30:, 2] = 255
    path = tmp_path / "wide.jpg"
    Image.fromarray(rgb).save(path, quality=100)
    x = load_cond_image(path, (16, 16))  # covers with a 20x20 crop of columns 20..40, scaled to 16
    assert x.shape == (1, 3, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    left, right = x[0, :, 0, :, :6], x[0, :, 0, :, -6:]
    assert left[0].mean() > 0.9 and left[2].mean() < -0.9 and right[2].mean() > 0.9 and right[0].mean() < -0.9


def test_bad_sample_arguments(stdit3_run, picture, tmp_path, capsys):
    ck = stdit3_run
    with pytest.raises(ValueError, match="height: expected a multiple of 8"):
        sample_video(ck, "x", tmp_path / "v.gif", height=30)
    with pytest.raises(ValueError, match="width: expected a positive integer"):
        sample_video(ck, "x", tmp_path / "v.gif", width=0)
    with pytest.raises(FileNotFoundError, match="cond_image: no image file at"):
        sample_video(ck, "x", tmp_path / "v.gif", cond_image=tmp_path / "missing.png")
    not_image = tmp_path / "text.png"
    not_image.write_text("not a picture")
    with pytest.raises(ValueError, match="cond_image: .* not an image"):
        sample_video(ck, "x", tmp_path / "v.gif", cond_image=not_image, steps=1, progress=False)
    with pytest.raises(ValueError, match="cond_image: the image becomes frame 0, so at least 2 frames"):
        sample_video(ck, "x", tmp_path / "v.gif", cond_image=picture, num_frames=1, progress=False)
    with pytest.raises(ValueError, match="guide_channels: IDDPM"):
        sample_video(ck, "x", tmp_path / "v.gif", guide_channels=3, progress=False)
    with pytest.raises(ValueError, match="steps: expected 1..1000"):
        sample_video(ck, "x", tmp_path / "v.gif", steps=0)
    with pytest.raises(SystemExit):  # the command line: one clear line, exit status 2
        train_cli(["sample", "--checkpoint", str(ck), "--prompt", "x", "--height", "36"])
    assert "stdit sample: error: height: expected a multiple of 8 pixels" in capsys.readouterr().err
    assert not list(tmp_path.glob("v.*"))  # nothing written


def test_stdit_checkpoint_refuses_stdit3_options(tmp_path, picture):
    run = tmp_path / "stdit_run"
    _checkpoint(run, "STDiT-mini")
    with pytest.raises(ValueError, match=r"height, cond_image: STDiT3 sampling options; STDiT-mini samples with IDDPM"):
        sample_video(run, "x", tmp_path / "v.gif", height=32, cond_image=picture, progress=False)


# ------------------------------------------------------------------------------------------------
# Fast sampling from the command line and the stage's [sample] table
# ------------------------------------------------------------------------------------------------


def _decoded(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_fast_sampling_flags(stdit3_run, tmp_path, capsys):
    """Everything off is the plain sample; a broadcast over the whole trajectory changes it and says
    what it reused; bad specs are refused naming the argument."""
    common = ["sample", "--checkpoint", str(stdit3_run), "--prompt", "waves", "--steps", "4", "--frames", "3",
              "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    assert train_cli([*common, "--out", str(tmp_path / "plain.mp4")]) == 0
    assert train_cli([*common, "--out", str(tmp_path / "off.mp4"), "--broadcast", "off", "--step-cache", "0"]) == 0
    assert train_cli([*common, "--out", str(tmp_path / "pab.mp4"), "--broadcast", "spatial=2,cross=2,range=0:1000"]) == 0
    err = capsys.readouterr().err
    assert "fast sampling: spatial 2/4 reused, cross 4/8 reused" in err  # 2 spatial + 2 temporal blocks' cross
    assert np.array_equal(_decoded(tmp_path / "plain.mp4"), _decoded(tmp_path / "off.mp4"))
    assert not np.array_equal(_decoded(tmp_path / "plain.mp4"), _decoded(tmp_path / "pab.mp4"))
    with pytest.raises(ValueError, match="broadcast: unknown kind 'spacial'"):
        sample_video(stdit3_run, "x", tmp_path / "v.gif", broadcast="spacial=2")
    with pytest.raises(ValueError, match="threshold: expected a number >= 0"):
        sample_video(stdit3_run, "x", tmp_path / "v.gif", step_cache=-1.0)
    assert not list(tmp_path.glob("v.*"))


def test_fitted_broadcast(stdit3_run, tmp_path, capsys):
    """--broadcast fit measures on a first video of seed + 1, prints the range as a spec, and samples with
    it: passing the printed spec again gives the same video; multi-process fitting is refused."""
    common = ["sample", "--checkpoint", str(stdit3_run), "--prompt", "waves", "--steps", "6", "--frames", "3",
              "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    assert train_cli([*common, "--out", str(tmp_path / "fit.mp4"), "--broadcast", "fit"]) == 0
    err = capsys.readouterr().err
    assert "fitting the broadcast range: one plain video of seed 1" in err
    m = re.search(r"fitted broadcast range \[[\d.]+, [\d.]+\] = steps (\d)-(\d) of 6; to reuse it: --broadcast (\S+)", err)
    assert m and int(m[2]) - int(m[1]) == 2  # 0.48 of 6 steps: a window of 3
    # a window of 3 steps in one block of each kind: spatial reuses its 2nd step, temporal its 2nd and 3rd, and
    # the cross attention of both the spatial and the temporal block its 2nd and 3rd
    assert "fast sampling: spatial 1/6 reused, temporal 2/6 reused, cross 4/12 reused" in err
    assert train_cli([*common, "--out", str(tmp_path / "again.mp4"), "--broadcast", m[3]]) == 0
    assert np.array_equal(_decoded(tmp_path / "fit.mp4"), _decoded(tmp_path / "again.mp4"))
    with pytest.raises(ValueError, match="'fit' needs a calibration video"):
        Broadcast.parse("fit")
    with pytest.raises(ValueError, match="compile: plain one-process sampling only; drop --broadcast"):
        sample_video(stdit3_run, "x", tmp_path / "v.gif", broadcast="fit", compile="default")


def test_sample_table_gives_the_defaults(tmp_path, capsys):
    """[sample] broadcast / step_cache of the checkpoint's stage are used when no flag is given; a flag wins."""
    run = tmp_path / "run"
    _checkpoint(run, "STDiT-mini", sample={"broadcast": "paper", "step_cache": 0.05})
    argv = ["sample", "--checkpoint", str(run), "--prompt", "x", "--steps", "20", "--quiet", "--out", str(tmp_path / "a.gif")]
    assert train_cli(argv) == 0
    err = capsys.readouterr().err
    assert "broadcast spatial 2 in [450, 930]; temporal 4 in [450, 930]; cross 6 in [450, 930], step cache 0.05" in err
    assert train_cli([*argv, "--broadcast", "off", "--step-cache", "0"]) == 0
    assert "fast sampling" not in capsys.readouterr().err
    from stdit.train.config import ConfigError

    for table, match in [({"broadcast": "fast"}, r"\[sample\] broadcast: cannot read"),
                         ({"step_cache": -1}, r"\[sample\] threshold"), ({"speed": 2}, "speed")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            _checkpoint(tmp_path / "bad", "STDiT-mini", sample=table)
    _checkpoint(tmp_path / "fit", "STDiT-mini", sample={"broadcast": "fit"})  # fitted before sampling (IDDPM)
    assert train_cli(["sample", "--checkpoint", str(tmp_path / "fit"), "--prompt", "x", "--steps", "10", "--quiet",
                      "--out", str(tmp_path / "b.gif")]) == 0  # fmt: skip
    assert "fitted broadcast range [" in capsys.readouterr().err and (tmp_path / "b.gif").is_file()


def test_compiled_sampling(stdit3_run, tmp_path, capsys):
    """--compile default samples the same video as eager up to compiled float rounding (decoded uint8
    frames within 2 levels); compiling with fast sampling or an unknown mode is refused by name."""
    common = ["sample", "--checkpoint", str(stdit3_run), "--prompt", "waves", "--steps", "3", "--frames", "3",
              "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    assert train_cli([*common, "--out", str(tmp_path / "eager.mp4")]) == 0
    assert train_cli([*common, "--out", str(tmp_path / "compiled.mp4"), "--compile", "default"]) == 0
    assert "torch.compile default" in capsys.readouterr().err
    eager, compiled = _decoded(tmp_path / "eager.mp4"), _decoded(tmp_path / "compiled.mp4")
    assert eager.shape == compiled.shape
    assert np.abs(eager.astype(np.int16) - compiled.astype(np.int16)).max() <= 2
    with pytest.raises(ValueError, match="compile: plain one-process sampling only; drop --broadcast"):
        sample_video(stdit3_run, "x", tmp_path / "v.gif", broadcast="paper", compile="default")
    with pytest.raises(ValueError, match="compile: expected one of"):
        sample_video(stdit3_run, "x", tmp_path / "v.gif", compile="fast")
    assert not list(tmp_path.glob("v.*"))
