"""`fit_vae` / `stdit fit-vae`: a short fit lowers the reconstruction error and writes a VAE that
`VideoVAE.from_pretrained` loads offline with standardised latents; the CLI skips a finished fit; bad
arguments are rejected naming the argument."""

import json
import math
import os

import pytest
import torch

from stdit.train.cli import main as train_cli
from stdit.train.encoders import VideoVAE
from stdit.train.vae_fit import fit_vae, vae_is_complete

SMALL = dict(image_size=(16, 16), batch_frames=8, widths=(8, 16, 16, 16), frames_per_video=4, progress=False,
             preview_size=(16, 16))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stdit.train.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("vaedata")
    return make_synthetic_dataset(root, num_videos=4, num_images=2, frames=8, size=(32, 32), seed=2, corrupt=2)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "vae"
    return fit_vae(data, out, steps=40, lr=3e-3, **SMALL)


def test_fit_lowers_reconstruction_error_and_saves(fitted):
    assert vae_is_complete(fitted)
    rec = json.loads((fitted / "fit_vae.json").read_text())
    assert rec["frames"] == 4 * 4 + 2  # corrupt files skipped
    assert rec["recon_mse_end"] < 0.7 * rec["recon_mse_start"]
    assert rec["train_mse_last"] < rec["train_mse_first"]
    # standardising the latents is an exact reparametrisation: the error is float rounding (measured: equal
    # to the last digit; tolerance at float32 rounding of the rescaled weights)
    assert rec["recon_mse_standardised"] == pytest.approx(rec["recon_mse_end"], rel=1e-5, abs=0)
    # each latent channel then has mean 0 and std 1/0.18215 over the pool (unbiased estimates over the
    # n = frames x h x w values of a channel), so the std over all 4 channels is sqrt(4(n-1)/(4n-1));
    # measured error 8.8e-9 (std) and 5.0e-8 (mean), tolerances ~10x
    n = rec["frames"] * (SMALL["image_size"][0] // 8) * (SMALL["image_size"][1] // 8)
    assert rec["latent_std_x_0.18215"] == pytest.approx(math.sqrt(4 * (n - 1) / (4 * n - 1)), rel=0, abs=1e-7)
    assert abs(rec["latent_mean_x_0.18215"]) < 5e-7
    assert (fitted / "recon_preview.png").is_file()
    assert not [p for p in fitted.parent.iterdir() if p.name.startswith(".vae.")]  # no temp dirs left
    umask = os.umask(0)
    os.umask(umask)
    assert fitted.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_from_pretrained_loads_offline(fitted, data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = VideoVAE.from_pretrained(fitted)
    assert vae.scaling_factor == pytest.approx(0.18215)
    assert vae.downsample == 8 and vae.latent_channels == 4
    assert json.loads((fitted / "config.json").read_text())["scaling_factor"] == pytest.approx(0.18215)
    from stdit.train.data import VideoTextDataset

    video = VideoTextDataset(data, num_frames=4, frame_interval=1, image_size=(16, 16))[0]["video"][None]
    z = vae.encode(video, sample=False)
    assert z.shape == (1, 4, 4, 2, 2)
    out = vae.decode(z)
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_cli_fits_then_skips_when_complete(data, tmp_path, capsys):
    out = tmp_path / "vae"
    args = ["fit-vae", "--csv", str(data), "--out", str(out), "--steps", "3", "--image-size", "16", "16",
            "--batch-frames", "4", "--widths", "8", "16", "16", "16", "--quiet"]
    assert train_cli(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["fit_vae"] == "done" and vae_is_complete(out)
    stamp = (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_cli(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["fit_vae"] == "skipped"
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    # the folder holds a VAE of other data: refused (not silently reused), the VAE untouched
    other = tmp_path / "other.csv"
    other.write_text(data.read_text())
    assert train_cli([*args[:2], str(other), *args[3:]]) == 2
    assert "holds a VAE fitted on" in capsys.readouterr().err
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    # a bad argument through the CLI: an error naming it, exit status 2
    assert train_cli(["fit-vae", "--csv", str(data), "--out", str(tmp_path / "v2"), "--steps", "0", "--quiet"]) == 2
    assert "steps" in capsys.readouterr().err


def test_existing_outputs_are_not_clobbered(data, fitted, tmp_path):
    with pytest.raises(FileExistsError, match="out_dir"):
        fit_vae(data, fitted, steps=1, **SMALL)  # complete VAE, no overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out_dir"):
        fit_vae(data, other, steps=1, overwrite=True, **SMALL)
    assert (other / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=1.5), "steps"), (dict(batch_frames=0), "batch_frames"),
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(image_size=(12, 16)), "image_size"),
    (dict(image_size=(16,)), "image_size"), (dict(widths=(8, 16, 16)), "widths"), (dict(seed=-1), "seed"),
    (dict(kl_weight=-1.0), "kl_weight"),
])
def test_bad_arguments_name_the_argument(data, tmp_path, kwargs, name):
    base = dict(steps=1, image_size=(16, 16), batch_frames=2, progress=False)
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fit_vae(data, tmp_path / "vae", **base)
    assert not (tmp_path / "vae").exists()


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="csv_path"):
        fit_vae(tmp_path / "nope.csv", tmp_path / "vae", steps=1, progress=False)
