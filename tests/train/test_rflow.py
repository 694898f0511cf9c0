"""stdit.train.rflow: Open-Sora 1.2's rectified flow against golden data from its own code.

Golden sets: every ``*_io.safetensors`` in tests/data/opensora_v12 and in the folders named by the
environment variable STDIT_GOLDENS_V12 (os.pathsep-separated), each beside its ``<name>.json`` (and
``<name>.safetensors`` weights for the real-model tests). Every shape, setting and tolerance is
read from the files: the scheduler arguments from the JSON's RFLOW(...) strings, the tolerances
from its ``recommended_tolerances``.

Three layers of checks:
* the timestep transform: the whole golden table (NaN where the reference gives NaN) and the
  ``nan_quirk=False`` switch;
* the scheduler math without the model: a replay stand-in returns, at step i, outputs whose guided
  velocity is the golden ``*_v_pred[i]`` and asserts it is called with the golden timesteps and
  x_mask; the loss from the golden raw model output;
* end to end with STDiT3 (models/stdit3.py) loaded with the golden weights.
Each layer has mistake checks: a known wrong variant must miss the golden by far more than the
tolerance, so the tolerances can fail.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from stdit.train.rflow import RFlow, timestep_transform

safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).resolve().parents[1] / "data" / "opensora_v12"
SAMPLE_KWARG_KEYS = ("height", "width", "num_frames", "ar", "fps")


# ------------------------------------------------------------------------------------------------
# golden sets
# ------------------------------------------------------------------------------------------------


def _golden_files() -> list[Path]:
    """Bundled sets, the shared golden folder beside the checkout when there is one, $STDIT_GOLDENS_V12's;
    a file name already found is read once."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "goldens" / "opensora_v12"
    dirs = [DATA] + ([shared] if shared.is_dir() else [])
    dirs += [Path(p) for p in os.environ.get("STDIT_GOLDENS_V12", "").split(os.pathsep) if p]
    found: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.glob("*_io.safetensors")):
            found.setdefault(path.name, path)
    return list(found.values())


GOLDEN_IO = _golden_files()
IDS = [f"{p.parent.name}/{p.name[: -len('_io.safetensors')]}" for p in GOLDEN_IO]


def _rflow_kwargs(text: str) -> dict:
    """The keyword arguments of the first ``RFLOW(...)`` call in a JSON description string."""
    m = re.search(r"RFLOW\(([^)]*)\)", text)
    assert m, f"no RFLOW(...) call in {text!r}"
    call = ast.parse(f"f({m.group(1)})", mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


class Golden:
    def __init__(self, io_path: Path):
        name = io_path.name[: -len("_io.safetensors")]
        self.name = name
        self.io = safetensors_torch.load_file(io_path)
        self.meta = json.loads((io_path.parent / f"{name}.json").read_text())
        self.weights = io_path.parent / f"{name}.safetensors"
        self.tol = self.meta["recommended_tolerances"]
        self.train_kwargs = _rflow_kwargs(self.meta["rflow_loss"]["scheduler"])
        self.sample_kwargs = _rflow_kwargs(self.meta["sampler"]["scheduler"])

    def close(self, got: torch.Tensor, key: str, tol_name: str) -> float:
        """Asserts |got - golden| <= atol + rtol |golden| (NaN where the golden is NaN); returns max error."""
        want = self.io[key]
        tol = self.tol[tol_name]
        assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(got.isnan(), want.isnan()), f"{key}: NaN positions differ"
        err = (got.double() - want.double()).abs().nan_to_num()
        bound = tol["atol"] + tol["rtol"] * want.double().abs().nan_to_num()
        worst = (err - bound).max().item()
        assert worst <= 0, f"{key}: max |got - golden| = {err.max().item():.3g}, over atol + rtol|golden| by {worst:.3g}"
        return err.max().item()

    def sample_model_kwargs(self) -> dict:
        return {k: self.io[f"sample_{k}"] for k in SAMPLE_KWARG_KEYS if f"sample_{k}" in self.io}

    def rf_model_kwargs(self, *, x_mask: bool = True) -> dict:
        io = self.io
        kw = {"y": io["y"], "mask": io["mask"], "fps": io["fps"], "height": io["height"], "width": io["width"],
                  "num_frames": io["rf_num_frames"], "ar": io["height"] / io["width"]}
        if x_mask:
            kw["x_mask"] = io["x_mask"]
        return kw


@cache
def _load(i: int) -> Golden:
    return Golden(GOLDEN_IO[i])


@pytest.fixture(params=range(len(GOLDEN_IO)), ids=IDS)
def golden(request) -> Golden:
    return _load(request.param)


def test_golden_sets_found():
    assert GOLDEN_IO, f"no *_io.safetensors in {DATA} or STDIT_GOLDENS_V12"


# ------------------------------------------------------------------------------------------------
# timestep_transform
# ------------------------------------------------------------------------------------------------


def _table(g: Golden, nan_quirk: bool = True) -> torch.Tensor:
    io = g.io
    rows = [timestep_transform(io["tt_t"][i : i + 1], {"height": io["tt_height"][i : i + 1],
                               "width": io["tt_width"][i : i + 1], "num_frames": io["tt_num_frames"][i : i + 1]},
                               num_timesteps=1000, nan_quirk=nan_quirk)
            for i in range(io["tt_t"].shape[0])]  # fmt: skip
    return torch.cat(rows)


def test_timestep_transform_table(golden):
    out = _table(golden)
    err = golden.close(out, "tt_out", "timesteps")
    assert err <= 1e-3
    nan_rows = golden.io["tt_out"].isnan()
    nf = golden.io["tt_num_frames"]
    # the reference's NaN: 2..16 frames at t = T (0/0)
    assert torch.equal(nan_rows, (nf >= 2) & (nf <= 16) & (golden.io["tt_t"] == 1000))


@pytest.mark.parametrize("case", ["ttb0", "ttb1"])
def test_timestep_transform_first_sample_decides(golden, case):
    io = golden.io
    kw = {"height": io[f"{case}_height"], "width": io[f"{case}_width"], "num_frames": io[f"{case}_num_frames"]}
    golden.close(timestep_transform(io[f"{case}_t"], kw), f"{case}_out", "timesteps")
    # mistake check: deciding image-or-video per sample misses the golden of a mixed batch
    per_sample = torch.cat([timestep_transform(io[f"{case}_t"][i : i + 1], {k: v[i : i + 1] for k, v in kw.items()})
                            for i in range(kw["height"].shape[0])])  # fmt: skip
    assert (per_sample - io[f"{case}_out"]).abs().max() > 100 * golden.tol["timesteps"]["atol"]


def test_timestep_transform_rf_t(golden):
    t = timestep_transform(golden.io["rf_t_raw"], golden.rf_model_kwargs(),
                           scale=golden.train_kwargs.get("transform_scale", 1.0))
    golden.close(t, "rf_t", "timesteps")


def test_timestep_transform_nan_quirk_off(golden):
    io = golden.io
    quirk, fixed = io["tt_out"], _table(golden, nan_quirk=False)
    assert not fixed.isnan().any()
    short = (io["tt_num_frames"] >= 2) & (io["tt_num_frames"] <= 16)
    # every row the quirk does not touch is unchanged, bitwise
    assert torch.equal(fixed[~short], _table(golden)[~short])
    # short clips are treated as single images: equal to the 1-frame row of the same t, h, w
    for i in torch.nonzero(short).flatten().tolist():
        same = ((io["tt_t"] == io["tt_t"][i]) & (io["tt_height"] == io["tt_height"][i])
                & (io["tt_width"] == io["tt_width"][i]) & (io["tt_num_frames"] == 1))  # fmt: skip
        if same.any():
            assert fixed[i] == quirk[same][0], i


def test_timestep_transform_float64_oracle():
    """Per-sample sizes in one video batch against the formula in float64, written independently."""
    g = torch.Generator().manual_seed(0)
    B = 6
    t = torch.rand(B, generator=g) * 1000
    h = torch.tensor([64.0, 144, 240, 512, 720, 360])
    w = torch.tensor([64.0, 256, 426, 512, 1280, 640])
    nf = torch.tensor([51.0, 17, 102, 34, 68, 200])
    got = timestep_transform(t, {"height": h, "width": w, "num_frames": nf}, scale=1.5)
    expect = []
    for i in range(B):
        r = ((float(h[i]) * float(w[i])) / 512**2) ** 0.5 * (int(nf[i]) // 17 * 5) ** 0.5 * 1.5
        s = float(t[i]) / 1000
        expect.append(1000 * r * s / (1 + (r - 1) * s))
    torch.testing.assert_close(got.double(), torch.tensor(expect, dtype=torch.float64), atol=1e-3, rtol=1e-6)
    # integer inputs give float times; t = 0 and T are fixed points
    ends = timestep_transform(torch.tensor([0, 1000]), {"height": h[:2].long(), "width": w[:2].long(),
                                                           "num_frames": nf[:2].long()})  # fmt: skip
    assert ends.dtype == torch.float32 and ends.tolist() == [0.0, 1000.0]


def test_timestep_transform_errors():
    t = torch.tensor([500.0, 500.0])
    kw = {"height": torch.tensor([64.0, 64.0]), "width": torch.tensor([64.0, 64.0]), "num_frames": torch.tensor([51.0, 51.0])}
    with pytest.raises(ValueError, match="num_frames"):
        timestep_transform(t, {k: v for k, v in kw.items() if k != "num_frames"})
    with pytest.raises(ValueError, match="height"):
        timestep_transform(t, dict(kw, height=torch.tensor([64.0])))
    with pytest.raises(ValueError, match="t: expected"):
        timestep_transform(t[:, None], kw)
    with pytest.raises(TypeError, match="model_kwargs"):
        timestep_transform(t, None)
    with pytest.raises(ValueError, match="num_timesteps"):
        timestep_transform(t, kw, num_timesteps=0)


# ------------------------------------------------------------------------------------------------
# sampler, replayed without the model
# ------------------------------------------------------------------------------------------------


class Replay:
    """Stands in for STDiT3 in the sampler: at step i it returns (2B, 2C, ...) outputs whose guided
    velocity u + cfg (c - u) is the golden v_pred[i] (c = v - (cfg-1) D, u = v - cfg D for a random D,
    so the guidance scale and the half order matter), garbage in channels C..2C-1, and records
    what it was called with."""

    def __init__(self, v_pred: torch.Tensor, cfg: float, seed: int = 0):
        self.v_pred, self.cfg = v_pred, cfg
        gen = torch.Generator().manual_seed(seed)
        self.delta = torch.randn(v_pred.shape, generator=gen)
        self.junk = 100 * torch.randn(v_pred.shape, generator=gen)
        self.calls: list[dict] = []

    def __call__(self, x, timestep, **kwargs):
        i = len(self.calls)
        self.calls.append(dict(x=x.clone(), t=timestep.clone(), **kwargs))
        v, d = self.v_pred[i], self.delta[i]
        cond, uncond = v - (self.cfg - 1) * d, v - self.cfg * d
        return torch.cat([torch.cat([cond, uncond]), torch.cat([self.junk[i], self.junk[i]])], dim=1)


def _replay(g: Golden, prefix: str, *, seed_noise: bool = False, rf: RFlow | None = None, null_y=None):
    io = g.io
    rf = rf or RFlow(**g.sample_kwargs)
    model = Replay(io[f"{prefix}_v_pred"], rf.cfg_scale)
    cond = prefix == "samplec"
    kwargs = {"y": io["sample_y"], "mask": io["sample_mask"], "model_kwargs": g.sample_model_kwargs(),
                  "null_y": torch.randn(io["sample_y"].shape[1:]) if null_y is None else null_y}
    if cond:
        kwargs["cond_mask"] = io["samplec_mask"]
        if seed_noise:
            torch.manual_seed(g.meta["seeds"]["sample_cond_noise"])
        else:
            kwargs["noise"] = io["samplec_noise"]
    out = rf.sample(model, io["sample_z"], **kwargs)
    return out, model


def _check_calls(g: Golden, prefix: str, calls: list[dict]) -> None:
    io = g.io
    B = io["sample_z"].shape[0]
    assert len(calls) == io[f"{prefix}_t"].shape[0]
    for i, call in enumerate(calls):
        t = call["t"]
        assert t.shape == (2 * B,) and torch.equal(t[:B], t[B:])
        want_t = io[f"{prefix}_t"][i]
        tol = g.tol["timesteps"]
        assert ((t[:B] - want_t).abs() <= tol["atol"] + tol["rtol"] * want_t.abs()).all(), (i, t, want_t)
        x = call["x"]
        assert torch.equal(x[:B], x[B:])
        err = (x[:B] - io[f"{prefix}_z_in"][i]).abs().max().item()
        assert err <= g.tol["sampler_latents"]["atol"], f"{prefix}_z_in[{i}]: {err:.3g}"
        if prefix == "samplec":
            assert torch.equal(call["x_mask"], io["samplec_x_mask"][i]), i
        else:
            assert "x_mask" not in call
        # captions: the prompts, then the null caption, with the prompts' mask twice
        assert torch.equal(call["y"][:B, 0], io["sample_y"])
        assert torch.equal(call["mask"], io["sample_mask"].repeat(2, 1))
        for k, v in g.sample_model_kwargs().items():
            assert torch.equal(call[k], torch.cat([v, v])), k


@pytest.mark.parametrize("prefix", ["sample", "samplec"])
def test_sampler_replay(golden, prefix):
    if f"{prefix}_out" not in golden.io:
        pytest.skip(f"no {prefix}_* in this set")
    out, model = _replay(golden, prefix)
    _check_calls(golden, prefix, model.calls)
    golden.close(out, f"{prefix}_out", "sampler_latents")


def test_sampler_replay_per_sample_step(golden, monkeypatch):
    """The hand-written per-sample Euler step (taken when the samples' schedules differ) on the goldens."""
    monkeypatch.setattr(RFlow, "_diffusers_euler", lambda self, timesteps: None)
    for prefix in ("sample", "samplec"):
        if f"{prefix}_out" not in golden.io:
            continue
        out, model = _replay(golden, prefix)
        _check_calls(golden, prefix, model.calls)
        golden.close(out, f"{prefix}_out", "sampler_latents")


def test_sampler_replay_reference_rng(golden):
    """Without injected noise the per-step draws come from torch's default generator, as the reference's
    randn_like: seeding as the reference did reproduces the conditioned run."""
    if "samplec_out" not in golden.io:
        pytest.skip("no samplec_* in this set")
    out, model = _replay(golden, "samplec", seed_noise=True)
    _check_calls(golden, "samplec", model.calls)
    golden.close(out, "samplec_out", "sampler_latents")


def test_sampler_replay_null_caption_from_model(golden):
    io = golden.io
    rf = RFlow(**golden.sample_kwargs)
    model = Replay(io["sample_v_pred"], rf.cfg_scale)
    null = torch.randn(io["sample_y"].shape[1:])
    model.y_embedder = type("YEmbedder", (), {"y_embedding": null})()
    rf.sample(model, io["sample_z"], y=io["sample_y"][:, None], mask=io["sample_mask"],
              model_kwargs=golden.sample_model_kwargs())
    B = io["sample_z"].shape[0]
    for call in model.calls:
        assert torch.equal(call["y"][B:, 0], null.expand(B, *null.shape))


@pytest.mark.parametrize("mistake", ["no_transform", "cfg_7.5", "halves_swapped", "velocity_sign"])
def test_sampler_replay_mistakes_detected(golden, mistake, monkeypatch):
    io = golden.io
    kwargs = dict(golden.sample_kwargs)
    if mistake == "no_transform":
        kwargs["use_timestep_transform"] = False
    rf = RFlow(**kwargs)
    model = Replay(io["sample_v_pred"], rf.cfg_scale)
    if mistake == "cfg_7.5":
        rf.cfg_scale += 0.5
    if mistake == "halves_swapped":
        inner = model.__call__
        model = lambda x, t, **kw: inner(x, t, **kw).roll(x.shape[0] // 2, dims=0)
    if mistake == "velocity_sign":  # the step taken with diffusers' noise - x0 velocity as is
        monkeypatch.setattr(RFlow, "_diffusers_euler", lambda self, timesteps: None)
        monkeypatch.setattr(RFlow, "_velocity", staticmethod(lambda out, x, batch=None: -out[:, : x.shape[1]]))
    out = rf.sample(model, io["sample_z"], y=io["sample_y"], mask=io["sample_mask"],
                    null_y=torch.randn(io["sample_y"].shape[1:]), model_kwargs=golden.sample_model_kwargs())
    err = (out - io["sample_out"]).abs().max().item()
    assert err > 100 * golden.tol["sampler_latents"]["atol"], f"{mistake}: only {err:.3g} from the golden"


def test_sampler_per_sample_schedules_float64_oracle():
    """Two samples of different sizes: per-sample schedules, stepped by hand; against a float64 loop."""
    rf = RFlow(use_timestep_transform=True, num_sampling_steps=5, cfg_scale=3.0)
    B, C, T, H, W = 2, 4, 3, 2, 2
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, C, T, H, W, generator=g)
    A = torch.randn(C, C, generator=g) * 0.3
    kw = {"height": torch.tensor([256.0, 720.0]), "width": torch.tensor([256.0, 1280.0]),
              "num_frames": torch.tensor([51.0, 102.0]), "fps": torch.tensor([24.0, 24.0])}

    def model(x, t, y, mask=None, **_):  # a smooth x- and t-dependent velocity, caption-dependent
        v = torch.einsum("bcthw,dc->bdthw", x, A) * (t / 1000)[:, None, None, None, None] + y[:, 0, :1, :1, None, None]
        return torch.cat([v, v], dim=1)

    y = torch.randn(B, 3, 1, generator=g)
    null = torch.zeros(3, 1)
    got = rf.sample(model, z, y=y, null_y=null, model_kwargs=kw)

    ts = [timestep_transform(torch.full((B,), (1 - i / 5) * 1000), kw).double() for i in range(5)] + [torch.zeros(B)]
    x = z.double()
    for i in range(5):
        t = ts[i]
        base = torch.einsum("bcthw,dc->bdthw", x, A.double()) * (t / 1000)[:, None, None, None, None]
        c, u = base + y.double()[:, :1, :1, None, None], base
        v = u + 3.0 * (c - u)
        x = x + v * ((ts[i] - ts[i + 1].double()) / 1000)[:, None, None, None, None]
    assert (got.double() - x).abs().max() < 1e-5


def test_sampler_errors():
    rf = RFlow(num_sampling_steps=2)
    z = torch.randn(2, 4, 3, 2, 2)
    y = torch.randn(2, 5, 8)
    null = torch.randn(5, 8)
    ok = lambda x, t, **kw: torch.zeros(x.shape[0], 8, *x.shape[2:])
    with pytest.raises(ValueError, match="z: expected"):
        rf.sample(ok, z[0], y=y, null_y=null)
    with pytest.raises(ValueError, match="y: expected"):
        rf.sample(ok, z, y=y[:1], null_y=null)
    with pytest.raises(ValueError, match="null_y"):
        rf.sample(ok, z, y=y, null_y=torch.randn(4, 8))
    with pytest.raises(ValueError, match="null_y: the model has no"):
        rf.sample(ok, z, y=y)
    with pytest.raises(ValueError, match="mask: expected"):
        rf.sample(ok, z, y=y, null_y=null, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cond_mask"):
        rf.sample(ok, z, y=y, null_y=null, cond_mask=torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="noise: expected"):
        rf.sample(ok, z, y=y, null_y=null, cond_mask=torch.ones(2, 3), noise=torch.randn(3, *z.shape))
    with pytest.raises(ValueError, match="model output"):
        rf.sample(lambda x, t, **kw: torch.zeros(x.shape[0], 3, *x.shape[2:]), z, y=y, null_y=null)
    with pytest.raises(ValueError, match="set by sample"):
        rf.sample(ok, z, y=y, null_y=null, model_kwargs={"x_mask": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="height"):  # the transform needs the sizes
        RFlow(use_timestep_transform=True).sample(ok, z, y=y, null_y=null)
    out = rf.sample(ok, z, y=y, null_y=null, progress=True)
    assert torch.equal(out, z)


# ------------------------------------------------------------------------------------------------
# training loss, without the model
# ------------------------------------------------------------------------------------------------


class FixedModel:
    """Returns a fixed output; records (x_t, t) it was given."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone(), kwargs))
        return self.out


def _masked_loss(g: Golden, rf: RFlow | None = None, **over):
    io = g.io
    rf = rf or RFlow(**g.train_kwargs)
    model = FixedModel(io["rf_model_out_masked"])
    args = {"model_kwargs": g.rf_model_kwargs(), "noise": io["rf_noise"], "mask": io["x_mask"], "t": io["rf_t"]}
    args.update(over)
    return rf.training_losses(model, io["rf_x_start"], **args)["loss"], model


def test_training_losses_from_golden_model_output(golden):
    """The masked loss from the golden raw model output: x_t fed to the model and the loss."""
    loss, model = _masked_loss(golden)
    (x_t, t, kwargs), = model.calls
    assert torch.equal(t, golden.io["rf_t"])
    assert (x_t - golden.io["rf_x_t_masked"]).abs().max() <= golden.tol["rf_x_t"]["atol"]
    assert torch.equal(kwargs["x_mask"], golden.io["x_mask"])
    golden.close(loss, "rf_loss_masked", "rf_losses")


def test_add_noise_plain_x_t(golden):
    io = golden.io
    x_t = RFlow().add_noise(io["rf_x_start"], io["rf_noise"], io["rf_t"])
    golden.close(x_t, "rf_x_t_plain", "rf_x_t")


@pytest.mark.parametrize("mistake", ["target_noise_minus_x0", "cond_frames_in_mean", "t_not_transformed",
                                     "cond_frames_noised", "add_noise_swapped"])  # fmt: skip
def test_training_loss_mistakes_detected(golden, mistake):
    """Each mistake README lists moves the loss (or the x_t the model sees) by far more than the tolerance."""
    io = golden.io
    tol_loss, tol_xt = golden.tol["rf_losses"]["atol"], golden.tol["rf_x_t"]["atol"]
    x0, noise, m = io["rf_x_start"], io["rf_noise"], io["x_mask"]
    v = io["rf_model_out_masked"][:, : x0.shape[1]]
    if mistake == "target_noise_minus_x0":
        err = (v - (noise - x0)).pow(2)
        loss = (err * m[:, None, :, None, None]).sum(dim=(1, 2, 3, 4)) / (m.sum(1) * err[:, :, 0].numel() / m.shape[0])
        assert (loss - io["rf_loss_masked"]).abs().max() > 100 * tol_loss
    elif mistake == "cond_frames_in_mean":
        loss, _ = _masked_loss(golden)
        plain = (v - (x0 - noise)).pow(2).mean(dim=(1, 2, 3, 4))
        assert torch.allclose(loss, io["rf_loss_masked"], atol=tol_loss)
        assert (plain - io["rf_loss_masked"]).abs().max() > 100 * tol_loss
    elif mistake == "t_not_transformed":
        _, model = _masked_loss(golden, t=io["rf_t_raw"])
        assert (model.calls[0][0] - io["rf_x_t_masked"]).abs().max() > 100 * tol_xt
    elif mistake == "cond_frames_noised":
        _, model = _masked_loss(golden, mask=None)
        assert (model.calls[0][0] - io["rf_x_t_masked"]).abs().max() > 100 * tol_xt
    else:
        s = (io["rf_t"] / 1000)[:, None, None, None, None]
        swapped = s * x0 + (1 - s) * noise
        assert (swapped - io["rf_x_t_plain"]).abs().max() > 100 * tol_xt


def test_sample_t_logit_normal_and_transform():
    """The draw is T * sigmoid(N(loc, scale)) on the default CPU generator (the reference's stream),
    then the transform with transform_scale; training_losses draws t, then the noise."""
    x0 = torch.randn(3, 4, 2, 2, 2)
    kw = {"height": torch.full((3,), 256.0), "width": torch.full((3,), 256.0), "num_frames": torch.full((3,), 51.0)}
    rf = RFlow(sample_method="logit-normal", loc=0.5, scale=2.0)
    torch.manual_seed(7)
    t = rf.sample_t(x0)
    torch.manual_seed(7)
    expect = torch.sigmoid(torch.normal(torch.full((3, 1), 0.5), torch.full((3, 1), 2.0)))[:, 0] * 1000
    assert torch.equal(t, expect)

    rf = RFlow(sample_method="logit-normal", use_timestep_transform=True, transform_scale=2.0)
    torch.manual_seed(8)
    t = rf.sample_t(x0, kw)
    torch.manual_seed(8)
    raw = torch.sigmoid(torch.randn(3, 1))[:, 0] * 1000
    assert torch.equal(t, timestep_transform(raw, kw, scale=2.0))

    model = FixedModel(torch.zeros(3, 8, 2, 2, 2))
    torch.manual_seed(9)
    rf.training_losses(model, x0, dict(kw))
    torch.manual_seed(9)
    t = rf.sample_t(x0, kw)
    noise = torch.randn_like(x0)
    x_t, t_seen, _ = model.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(x_t, rf.add_noise(x0, noise, t))


def test_sample_t_uniform_and_discrete():
    x0 = torch.randn(500, 1, 1, 1, 1)
    t = RFlow().sample_t(x0)
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1000 and t.std() > 250
    t = RFlow(use_discrete_timesteps=True).sample_t(x0)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    steps = RFlow(num_sampling_steps=3, use_discrete_timesteps=True).timesteps(2)
    assert [s.tolist() for s in steps] == [[1000, 1000], [667, 667], [333, 333]]


def test_training_losses_weights_and_empty_mask():
    rf = RFlow(use_discrete_timesteps=True)
    x0, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    out = torch.randn(2, 8, 3, 2, 2)
    t = torch.tensor([10, 700])
    weights = torch.linspace(0.5, 2.0, 1000)
    plain = rf.training_losses(FixedModel(out), x0, noise=noise, t=t)["loss"]
    weighted = rf.training_losses(FixedModel(out), x0, noise=noise, t=t, weights=weights)["loss"]
    torch.testing.assert_close(weighted, plain * weights[t])
    expect = ((out[:, :4].double() - (x0 - noise).double()) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(plain.double(), expect, atol=1e-6, rtol=0)
    # a sample with no generated frame has nothing to average: loss 0, not the reference's 0/0
    mask = torch.tensor([[False, False, False], [True, False, True]])
    loss = rf.training_losses(FixedModel(out), x0, noise=noise, t=t, mask=mask)["loss"]
    assert loss[0] == 0 and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="integer"):
        RFlow().training_losses(FixedModel(out), x0, noise=noise, t=t.float(), weights=weights)


def test_training_losses_errors():
    rf = RFlow()
    x0 = torch.randn(2, 4, 3, 2, 2)
    out = torch.zeros(2, 8, 3, 2, 2)
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="x_start"):
        rf.training_losses(FixedModel(out), x0[0], t=t)
    with pytest.raises(ValueError, match="t: times must lie"):
        rf.training_losses(FixedModel(out), x0, t=torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="t: expected"):
        rf.training_losses(FixedModel(out), x0, t=t[:1])
    with pytest.raises(ValueError, match="noise"):
        rf.training_losses(FixedModel(out), x0, t=t, noise=torch.randn(2, 4, 3, 2, 1))
    with pytest.raises(ValueError, match="mask"):
        rf.training_losses(FixedModel(out), x0, t=t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="model output"):
        rf.training_losses(FixedModel(out[:, :3]), x0, t=t)
    with pytest.raises(TypeError, match="model_kwargs"):
        rf.training_losses(FixedModel(out), x0, model_kwargs=[1], t=t)
    with pytest.raises(ValueError, match="height"):  # drawing with the transform needs the sizes
        RFlow(use_timestep_transform=True).training_losses(FixedModel(out), x0)
    with pytest.raises(ValueError, match="sample_method"):
        RFlow(sample_method="normal")
    with pytest.raises(ValueError, match="use_discrete_timesteps"):
        RFlow(sample_method="logit-normal", use_discrete_timesteps=True)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        RFlow(num_sampling_steps=0)


def test_defaults_are_open_soras():
    rf = RFlow()
    assert (rf.num_timesteps, rf.num_sampling_steps, rf.cfg_scale, rf.use_timestep_transform, rf.transform_scale,
            rf.sample_method, rf.loc, rf.scale, rf.use_discrete_timesteps) == (
            1000, 10, 4.0, False, 1.0, "uniform", 0.0, 1.0, False)  # fmt: skip


def test_sampling_without_diffusers():
    """diffusers is optional: without it the module imports and sampling takes the per-sample Euler
    step (the same update): a constant velocity 1 carries z = 0 from t = 1000 to exactly 1."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import torch\n"
        "from stdit.train.rflow import RFlow\n"
        "m = lambda x, t, **kw: torch.ones(x.shape[0], 8, *x.shape[2:])\n"
        "out = RFlow(num_sampling_steps=3).sample(m, torch.zeros(1, 4, 1, 1, 1), y=torch.zeros(1, 2, 3), "
        "null_y=torch.zeros(2, 3))\n"
        "assert torch.allclose(out, torch.ones_like(out), atol=1e-6, rtol=0), out\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=120)


# ------------------------------------------------------------------------------------------------
# end to end with STDiT3 and the golden weights
# ------------------------------------------------------------------------------------------------


def _stdit3(g: Golden):
    try:
        from stdit.models.stdit3 import STDiT3
    except ImportError as e:
        pytest.skip(f"needs stdit.models.stdit3.STDiT3 (models/stdit3.py), not importable yet: {e}")
    if not g.weights.exists():
        pytest.skip(f"no weights {g.weights.name} for this set")
    return _real_model(g.weights, STDiT3, json.dumps(g.meta["constructor_kwargs"]))


@cache
def _real_model(weights: Path, cls, kwargs_json: str):
    model = cls(**json.loads(kwargs_json))
    state = {k: v.float() for k, v in safetensors_torch.load_file(weights).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


class Recorder:
    """Wraps the real model; records inputs and raw outputs."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.y_embedder = model.y_embedder

    def __call__(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        self.calls.append(dict(x=x.clone(), t=t.clone(), out=out.clone(), **kwargs))
        return out


@pytest.mark.parametrize("case", ["masked", "x_mask_no_mask_arg", "plain"])
def test_real_model_training_losses(golden, case):
    io = golden.io
    model = Recorder(_stdit3(golden))
    rf = RFlow(**golden.train_kwargs)
    kw = golden.rf_model_kwargs(x_mask=case != "plain")
    with torch.no_grad():
        loss = rf.training_losses(model, io["rf_x_start"], kw, noise=io["rf_noise"],
                                  mask=io["x_mask"] if case == "masked" else None, t=io["rf_t"])["loss"]
    golden.close(loss, f"rf_loss_{case}", "rf_losses")
    if case in ("masked", "plain"):
        golden.close(model.calls[0]["x"], f"rf_x_t_{case}", "rf_x_t")
    if case == "masked":
        tol = golden.tol["out_and_out_no_x_mask"]["atol"]
        assert (model.calls[0]["out"] - io["rf_model_out_masked"]).abs().max() <= tol


@pytest.mark.parametrize("prefix", ["sample", "samplec"])
def test_real_model_sampler(golden, prefix):
    io = golden.io
    model = Recorder(_stdit3(golden))
    rf = RFlow(**golden.sample_kwargs)
    kwargs = {"y": io["sample_y"], "mask": io["sample_mask"], "model_kwargs": golden.sample_model_kwargs()}
    if prefix == "samplec":
        kwargs.update(cond_mask=io["samplec_mask"], noise=io["samplec_noise"])
    out = rf.sample(model, io["sample_z"], **kwargs)
    golden.close(out, f"{prefix}_out", "sampler_latents")
    B, C = io["sample_z"].shape[:2]
    tol_v = golden.tol["sampler_velocity"]["atol"]
    for i, call in enumerate(model.calls):
        assert (call["x"][:B] - io[f"{prefix}_z_in"][i]).abs().max() <= golden.tol["sampler_latents"]["atol"]
        c, u = call["out"][:B, :C], call["out"][B:, :C]
        v = u + rf.cfg_scale * (c - u)
        assert (v - io[f"{prefix}_v_pred"][i]).abs().max() <= tol_v, i
    # mistake check with the real model: no timestep transform moves the result far off
    if prefix == "sample":
        wrong = RFlow(**dict(golden.sample_kwargs, use_timestep_transform=False)).sample(model.model, io["sample_z"],
                                                                                          **kwargs)  # fmt: skip
        assert (wrong - io["sample_out"]).abs().max() > 100 * golden.tol["sampler_latents"]["atol"]


def test_overshoot_quirk_and_its_switch():
    """float32 maps t = K a few ulp above K at some sizes (24 x 32 pixels, one frame): kept by default
    as Open-Sora computes it, which makes the first conditioned step treat every frame as kept; with
    overshoot_quirk=False the schedule is clamped to [0, K] and the first step generates them."""
    kw = dict(height=torch.tensor([24.0]), width=torch.tensor([32.0]), num_frames=torch.tensor([1.0]))
    quirk = RFlow(use_timestep_transform=True, num_sampling_steps=3).timesteps(1, kw)
    fixed = RFlow(use_timestep_transform=True, num_sampling_steps=3, overshoot_quirk=False).timesteps(1, kw)
    assert quirk[0].item() > 1000.0 and fixed[0].item() == 1000.0
    assert all(torch.equal(a, b) for a, b in zip(quirk[1:], fixed[1:]))  # only the overshoot changes
    seen = []

    def model(x, t, x_mask=None, **kwargs):
        seen.append(x_mask[0].tolist())
        return torch.zeros(x.shape[0], 8, *x.shape[2:])

    z, y = torch.randn(1, 4, 2, 2, 2), torch.zeros(1, 1, 2, 3)
    for overshoot, first in ((True, [False, False]), (False, [True, True])):
        seen.clear()
        rf = RFlow(use_timestep_transform=True, num_sampling_steps=3, overshoot_quirk=overshoot)
        rf.sample(model, z, y=y, null_y=torch.zeros(2, 3), model_kwargs=kw, cond_mask=torch.ones(1, 2))
        assert seen[0] == first
