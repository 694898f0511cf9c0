"""stdit.train.diffusion: Open-Sora 1.0's IDDPM against golden losses and the math.

Golden: tests/data/opensora_v1/stdit_tiny_a.json's "iddpm" section (losses of Open-Sora v1.0.0's own
IDDPM on the tiny golden STDiT, float32 on CPU). Measured max |error| per term: loss 2.4e-7, mse 2.4e-7
(one float32 ulp at 1.4-1.7), vb 6.0e-8; the tolerances are 10x that.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stdit.models import STDiT, stdit_from_preset
from stdit.train.diffusion import (
    IDDPM,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_flat,
    normal_kl,
    space_timesteps,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "opensora_v1"
GOLDEN_ATOL = {"loss": 2.5e-6, "mse": 2.5e-6, "vb": 6e-7}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class FixedOutput(nn.Module):
    """Returns a learnable tensor (B, 2C, ...) regardless of x (plus 0*x to keep the graph honest);
    records the timesteps it was called with."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out.clone())
        self.seen_t = []

    def forward(self, x, t, **kwargs):
        self.seen_t.append(t.clone())
        return self.out + 0 * x.sum()


class CondUncond(nn.Module):
    """CFG fake: known eps / v for the conditional rows (force_drop_ids 0) and unconditional rows
    (force_drop_ids 1), independent of x. Records what it was called with."""

    def __init__(self, eps_c, eps_u, v_c, v_u):
        super().__init__()
        self.eps_c, self.eps_u, self.v_c, self.v_u = eps_c, eps_u, v_c, v_u
        self.calls = []

    def forward(self, x, t, y=None, mask=None, force_drop_ids=None):
        self.calls.append(dict(B=x.shape[0], t=t.clone(), y=y, mask=mask, drop=force_drop_ids))
        drop = force_drop_ids.bool().view(-1, *([1] * (x.dim() - 1)))
        reps = (x.shape[0] // self.eps_c.shape[0],) + (1,) * (x.dim() - 1)
        eps = torch.where(drop, self.eps_u.repeat(reps), self.eps_c.repeat(reps))
        v = torch.where(drop, self.v_u.repeat(reps), self.v_c.repeat(reps))
        return torch.cat([eps, v], dim=1) + 0 * x.sum()


def _randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def golden():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    meta = json.loads((DATA / "stdit_tiny_a.json").read_text())
    kwargs = dict(meta["constructor_kwargs"])
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    model = STDiT(**kwargs)
    model.load_state_dict(safetensors_torch.load_file(DATA / "stdit_tiny_a.safetensors"), strict=True)
    model.eval()
    model.attention_backend = "reference"
    io = safetensors_torch.load_file(DATA / "stdit_tiny_a_io.safetensors")
    return meta, model, io


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model = stdit_from_preset("STDiT-mini", attention_backend="reference")
    _randomize(model)
    model.eval()
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 1, 4, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return model, dict(y=y, mask=mask)


# ------------------------------------------------------------------------------------------------
# golden
# ------------------------------------------------------------------------------------------------


def test_golden_training_losses(golden):
    meta, model, io = golden
    assert io["iddpm_t"].tolist() == meta["iddpm"]["t"] == [3, 711]
    with torch.no_grad():
        terms = IDDPM().training_losses(
            model, io["iddpm_x_start"], io["iddpm_t"], model_kwargs=dict(y=io["y"], mask=io["mask"]), noise=io["iddpm_noise"]
        )
    for name in ("loss", "mse", "vb"):
        want = torch.tensor(meta["iddpm"]["values"][name])
        assert torch.equal(want, io[f"iddpm_{name}"])  # the json and the tensor file agree
        got = terms[name]
        assert got.shape == (2,) and got.dtype == torch.float32
        err = (got - want).abs().max().item()
        assert err <= GOLDEN_ATOL[name], f"{name}: max |got - golden| = {err:.3g} > {GOLDEN_ATOL[name]}"
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=0, atol=0)


def test_golden_model_t0_decoder_nll_finite(golden):
    _, model, io = golden
    with torch.no_grad():
        terms = IDDPM().training_losses(
            model, io["iddpm_x_start"], torch.tensor([0, 0]), model_kwargs=dict(y=io["y"], mask=io["mask"]), noise=io["iddpm_noise"]
        )
    for v in terms.values():
        assert torch.isfinite(v).all() and (v > 0).all()


# ------------------------------------------------------------------------------------------------
# tables, forward process
# ------------------------------------------------------------------------------------------------


def test_tables_float64_and_diffusers_float32_differ():
    d = IDDPM()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert d.betas.dtype == np.float64 and np.array_equal(d.betas, betas)
    assert np.array_equal(d.alphas_cumprod, np.cumprod(1 - betas))
    assert d.timestep_map == list(range(1000))
    # why the tables are not taken from diffusers: its DDPMScheduler builds them in float32
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert s.alphas_cumprod.dtype == torch.float32
    diff = np.abs(s.alphas_cumprod.double().numpy() - d.alphas_cumprod)
    assert diff.max() < 1e-6  # same schedule ...
    assert (s.alphas_cumprod.numpy() != d.alphas_cumprod.astype(np.float32)).any()  # ... not the same numbers
    # posterior variance clipped at step 0 with step 1's value
    assert d.posterior_variance[0] == 0
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])


def test_q_sample_exact_and_statistics():
    d = IDDPM()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4, 4, 2, 64, 64), 0.7)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    xt = d.q_sample(x0, t, noise)
    ab = d.alphas_cumprod[t.numpy()]
    # coefficients looked up in float64 and cast to float32, as the reference does: bitwise
    c1, c2 = (torch.from_numpy(c).float().view(-1, 1, 1, 1, 1) for c in (np.sqrt(ab), np.sqrt(1 - ab)))
    assert torch.equal(xt, c1 * x0 + c2 * noise)
    a = torch.from_numpy(ab).float()
    # statistics of fresh noise: mean sqrt(abar) x0, std sqrt(1 - abar)
    xt = d.q_sample(x0, t)
    mean, std = mean_flat(xt), xt.flatten(1).std(dim=1)
    torch.testing.assert_close(mean, a.sqrt() * 0.7, rtol=0, atol=0.02)
    torch.testing.assert_close(std, (1 - a).sqrt(), rtol=0.03, atol=1e-3)
    assert std[0] < 0.011 and abs(std[3].item() - 1) < 0.03  # t = 0 is nearly clean, t = 999 nearly pure noise


# ------------------------------------------------------------------------------------------------
# the loss terms
# ------------------------------------------------------------------------------------------------


def _fixed_model(shape=(2, 4, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).clamp(-1, 1)
    noise = torch.randn(shape, generator=g)
    out = torch.cat([torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 2 - 1], dim=1)
    return x0, noise, FixedOutput(out)


def test_vb_matches_independent_math():
    """t > 0: KL against torch.distributions; t == 0: decoder NLL against the exact normal CDF."""
    d = IDDPM()
    x0, noise, model = _fixed_model()
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1  # data on the 256-level grid
    t = torch.tensor([0, 400])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] > 0).all()

    xt = d.q_sample(x0, t, noise)
    eps, v = model.out[:, :4].detach().double(), model.out[:, 4:].detach().double()
    ab, ab_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    tt = t.numpy()

    def col(arr):
        return torch.from_numpy(np.asarray(arr)[tt]).view(-1, 1, 1, 1, 1)

    beta = col(d.betas)
    x0_hat = (xt.double() - col(np.sqrt(1 - ab)) * eps) / col(np.sqrt(ab))
    def post_mean(a):
        return (col(np.sqrt(ab_prev)) * col(d.betas) * a + col(np.sqrt(1 - d.betas)) * col(1 - ab_prev) * xt.double()) / col(1 - ab)
    bt = d.betas * (1 - ab_prev) / (1 - ab)
    beta_tilde = col(bt)
    bt_clipped = bt.copy()
    bt_clipped[0] = bt[1]  # beta~_0 = 0: IDDPM clips the log with step 1's value
    log_var = (v + 1) / 2 * beta.log() + (1 - v) / 2 * col(bt_clipped).log()
    p = torch.distributions.Normal(post_mean(x0_hat), (0.5 * log_var).exp())

    # t = 400: KL(q || p) in bits
    q = torch.distributions.Normal(post_mean(x0.double())[1], beta_tilde[1].sqrt())
    p1 = torch.distributions.Normal(p.mean[1], p.stddev[1])
    kl = torch.distributions.kl_divergence(q, p1).mean() / math.log(2)
    assert abs(terms["vb"][1].item() - kl.item()) < 3e-6 * kl.item()  # measured 3.3e-7 relative (float32)

    # t = 0: -log P(bin of x0) with exact CDFs. The module (like DDPM / IDDPM) uses the tanh
    # approximation of the normal CDF (abs error 1.8e-4), which matters in the low-probability bins
    # of this sharp decoder (std ~ 0.01 vs bin width 2/255): measured 1.7% apart. The 5% bound and the
    # 2e-4 bound on the approximation are properties of that formula, not rounding: kept.
    mu, sd = p.mean[0], p.stddev[0]
    hi = torch.where(x0[0] > 0.999, torch.full_like(mu, math.inf), x0[0].double() + 1 / 255)
    lo = torch.where(x0[0] < -0.999, torch.full_like(mu, -math.inf), x0[0].double() - 1 / 255)
    prob = torch.special.ndtr((hi - mu) / sd) - torch.special.ndtr((lo - mu) / sd)
    nll = -prob.clamp(min=1e-12).log().mean() / math.log(2)
    assert abs(terms["vb"][0].item() - nll.item()) < 0.05 * nll.item()
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max() < 2e-4
    assert terms["vb"][0] > terms["vb"][1]  # the decoder term is a different (larger) quantity


def test_normal_kl_and_decoder_helpers():
    g = torch.Generator().manual_seed(3)
    m1, m2, l1, l2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), want, rtol=0, atol=1e-13)  # measured 7.1e-15 (float64)
    x = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(x, means=torch.zeros(256), log_scales=torch.full((256,), math.log(0.5)))
    assert torch.isfinite(ll).all() and (ll <= 0).all()
    # the bins cover the line: the CDF differences telescope to 1 (measured exactly 1; float32 rounding bound)
    torch.testing.assert_close(ll.exp().sum(), torch.tensor(1.0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="x"):
        discretized_gaussian_log_likelihood(x, means=torch.zeros(3), log_scales=torch.zeros(256))


def test_vb_detaches_eps():
    d = IDDPM()
    x0, noise, model = _fixed_model()
    t = torch.tensor([0, 600])
    terms = d.training_losses(model, x0, t, noise=noise)
    terms["vb"].sum().backward()
    grad = model.out.grad
    assert torch.equal(grad[:, :4], torch.zeros_like(grad[:, :4]))  # eps gets nothing from vb
    assert (grad[:, 4:].abs().flatten(1).amax(1) > 0).all()  # the variance output learns from vb, both branches
    model.out.grad = None
    terms = d.training_losses(model, x0, t, noise=noise)
    terms["mse"].sum().backward()
    assert torch.equal(model.out.grad[:, 4:], torch.zeros_like(grad[:, 4:]))
    assert model.out.grad[:, :4].abs().max() > 0
    torch.testing.assert_close(terms["mse"], mean_flat((noise - model.out[:, :4]) ** 2))


def test_learn_sigma_false():
    d = IDDPM(learn_sigma=False)
    x0, noise, model = _fixed_model()
    model.out.data = model.out.data[:, :4].contiguous()
    terms = d.training_losses(model, x0, torch.tensor([0, 10]), noise=noise)
    assert torch.equal(terms["loss"], terms["mse"]) and not terms["vb"].any()


# ------------------------------------------------------------------------------------------------
# respacing
# ------------------------------------------------------------------------------------------------


def test_respacing_100():
    d = IDDPM(timestep_respacing="100")
    m = d.timestep_map
    assert len(m) == d.num_timesteps == 100 and m[0] == 0 and m[-1] == 999
    assert set(np.diff(m)) <= {10, 11}  # evenly spaced: round(i * 999 / 99)
    assert m == [round(i * 999 / 99) for i in range(100)]
    assert IDDPM(timestep_respacing=100).timestep_map == m
    # the respaced betas reproduce alphas_cumprod at the kept steps
    full = np.cumprod(1 - linear_beta_schedule(1000))
    # measured: equal to the last bit; tolerance a few float64 roundings per step of the 100-step cumprod
    np.testing.assert_allclose(np.cumprod(1 - d.betas), full[m], rtol=1e-14, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod, full[m], rtol=1e-14, atol=0)
    assert math.isclose(d.betas[0], 1e-4, rel_tol=1e-12) and d.betas.max() < 0.25  # measured 1.1e-13
    # the model is called with the ORIGINAL indices
    x0, noise, model = _fixed_model()
    terms = d.training_losses(model, x0, torch.tensor([99, 5]), noise=noise)
    assert model.seen_t[-1].tolist() == [999, 50] and model.seen_t[-1].dtype == torch.int64
    assert torch.isfinite(terms["loss"]).all()


def test_respacing_variants():
    assert space_timesteps(1000, "") == list(range(1000)) == space_timesteps(1000, None)
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert space_timesteps(1000, 1) == [0]
    for bad in ("abc", 2000, "ddim999", 0, 2.5, "10,x"):
        with pytest.raises(ValueError, match="timestep_respacing"):
            IDDPM(timestep_respacing=bad)


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def test_sample_stdit_mini_finite_and_deterministic(mini):
    model, kwargs = mini
    d = IDDPM(timestep_respacing="4")
    shape = (2, 4, 2, 4, 4)
    outs = [
        d.sample(model, shape, kwargs, progress=(seed == 0), generator=torch.Generator().manual_seed(seed))
        for seed in (0, 0, 1)
    ]
    assert outs[0].shape == shape and outs[0].dtype == torch.float32 and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    # no guidance (one pass) also runs
    out = d.sample(model, shape, kwargs, cfg_scale=None, progress=False, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and not torch.equal(out, outs[0])


def _cfg_fake(B=2, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, 2, 4, 4)
    eps_c, eps_u = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    v_c, v_u = torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1
    return shape, CondUncond(eps_c, eps_u, v_c, v_u)


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_combination_exact(guide_channels):
    shape, fake = _cfg_fake()
    d = IDDPM(timestep_respacing="10")
    x = torch.randn(shape)
    y, mask = torch.randn(2, 1, 4, 16), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    s = 7.0
    out = d._guided(fake, x, torch.tensor([555, 555]), dict(y=y, mask=mask), s, guide_channels)
    call = fake.calls[-1]
    assert call["B"] == 4 and call["drop"].tolist() == [0, 0, 1, 1] and call["t"].tolist() == [555] * 4
    assert torch.equal(call["y"], torch.cat([y, y])) and torch.equal(call["mask"], torch.cat([mask, mask]))
    guided = fake.eps_u + s * (fake.eps_c - fake.eps_u)
    g = 4 if guide_channels is None else 3
    assert torch.equal(out[:, :g], guided[:, :g])
    assert torch.equal(out[:, g:4], fake.eps_c[:, g:])  # Open-Sora's 4th channel: conditional, unguided
    assert torch.equal(out[:, 4:], fake.v_c)  # variance channels: the conditional half's


def test_guide_channels_3_vs_none_differ_only_in_channel_3():
    shape, fake = _cfg_fake()
    d = IDDPM(timestep_respacing="3")
    kw = dict(y=torch.randn(2, 1, 4, 16), mask=torch.ones(2, 4, dtype=torch.long))
    a = d.sample(fake, shape, kw, guide_channels=None, progress=False, generator=torch.Generator().manual_seed(0))
    b = d.sample(fake, shape, kw, guide_channels=3, progress=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, :3], b[:, :3])  # eps of channels 0..2 and the variance are identical
    assert not torch.allclose(a[:, 3], b[:, 3])
    # the model saw original step indices, high to low
    assert [c["t"][0].item() for c in fake.calls[-3:]] == [999, 500, 0]
    # cfg_scale = 1 equals no guidance (eps_u + 1*(eps_c - eps_u) = eps_c)
    c = d.sample(fake, shape, kw, cfg_scale=1.0, progress=False, generator=torch.Generator().manual_seed(0))
    nog = lambda x, t, **k: fake(x, t, force_drop_ids=torch.zeros(x.shape[0], dtype=torch.long), **k)  # noqa: E731
    e = d.sample(nog, shape, kw, cfg_scale=None, progress=False, generator=torch.Generator().manual_seed(0))
    # float32 rounding amplified by 1/sqrt(abar): measured 3.1e-5 (|x| up to 17); tolerance 3x that
    torch.testing.assert_close(c, e, rtol=0, atol=1e-4)


class Oracle(nn.Module):
    """The exact eps of data concentrated at x0 = c: eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t),
    with abar of the ORIGINAL 1000-step process at the step index the model is given."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))

    def forward(self, x, t, force_drop_ids=None, **kwargs):
        a = self.abar[t].view(-1, *([1] * (x.dim() - 1)))
        c = self.c.repeat(x.shape[0] // self.c.shape[0], *([1] * (x.dim() - 1)))  # CFG doubles the batch
        eps = ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


# measured |sample - point|: 8.3e-8 (ancestral, 10 steps), 1.4e-6 (DPM-Solver, 10 steps); tolerances 10x
@pytest.mark.parametrize("sampler, atol", [("ancestral", 1e-6), ("dpm_solver", 1.5e-5)])
def test_samplers_recover_point_mass_with_exact_eps(sampler, atol):
    """With the exact eps of a point mass the reverse process must land on it: checks the step
    index map (model sees original indices), the respaced schedule and the update rules."""
    c = torch.linspace(-0.8, 0.8, 2 * 4 * 2 * 4 * 4, dtype=torch.float64).view(2, 4, 2, 4, 4)
    oracle = Oracle(c)
    gen = torch.Generator().manual_seed(0)
    if sampler == "ancestral":
        out = IDDPM(timestep_respacing="10").sample(oracle, c.shape, cfg_scale=None, progress=False, generator=gen)
    else:
        pytest.importorskip("diffusers")
        out = IDDPM().sample_dpm_solver(oracle, c.shape, num_inference_steps=10, cfg_scale=4.0, progress=False, generator=gen)
    torch.testing.assert_close(out.double(), c, rtol=0, atol=atol)


def test_dpm_solver(mini):
    pytest.importorskip("diffusers")
    model, kwargs = mini
    d = IDDPM()
    shape = (2, 4, 2, 4, 4)
    a = d.sample_dpm_solver(model, shape, kwargs, num_inference_steps=5, progress=False, generator=torch.Generator().manual_seed(0))
    b = d.sample_dpm_solver(model, shape, kwargs, num_inference_steps=5, progress=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == shape and torch.isfinite(a).all() and torch.equal(a, b)
    # guidance handling is shared with sample(): guide_channels=3 only changes channel 3
    shape, fake = _cfg_fake()
    x = d.sample_dpm_solver(fake, shape, kwargs, num_inference_steps=4, progress=False, generator=torch.Generator().manual_seed(0))
    y = d.sample_dpm_solver(fake, shape, kwargs, num_inference_steps=4, guide_channels=3, progress=False,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, :3], y[:, :3]) and not torch.allclose(x[:, 3], y[:, 3])
    ts = [c["t"][0].item() for c in fake.calls[-4:]]
    assert ts[0] > 900 and ts == sorted(ts, reverse=True)  # original-scale indices, descending


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------


def test_bad_inputs():
    d = IDDPM()
    x0, noise, model = _fixed_model()
    ok_t = torch.tensor([1, 2])
    for bad_t in (torch.tensor([0, 1000]), torch.tensor([-1, 3]), torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), [1, 2]):
        with pytest.raises(ValueError, match="^t:"):
            d.training_losses(model, x0, bad_t, noise=noise)
    with pytest.raises(ValueError, match="^t:"):
        IDDPM(timestep_respacing="100").training_losses(model, x0, torch.tensor([100, 0]), noise=noise)
    with pytest.raises(ValueError, match="^noise"):
        d.training_losses(model, x0, ok_t, noise=noise[:, :3])
    with pytest.raises(ValueError, match="^x_start"):
        d.training_losses(model, x0.long(), ok_t)
    with pytest.raises(ValueError, match="^model_kwargs"):
        d.training_losses(model, x0, ok_t, model_kwargs=[1])
    eps_only = FixedOutput(torch.zeros(x0.shape))
    with pytest.raises(ValueError, match="model output.*2\\*C"):
        d.training_losses(eps_only, x0, ok_t, noise=noise)
    with pytest.raises(ValueError, match="^noise"):
        d.q_sample(x0, ok_t, noise[:1])
    with pytest.raises(ValueError, match="^shape"):
        d.sample(model, (2,), progress=False)
    with pytest.raises(ValueError, match="^guide_channels"):
        d.sample(model, (2, 4, 2, 4, 4), guide_channels=5, progress=False)
    with pytest.raises(ValueError, match="^num_inference_steps"):
        d.sample_dpm_solver(model, (2, 4, 2, 4, 4), num_inference_steps=0, progress=False)
    with pytest.raises(ValueError, match="^num_timesteps"):
        IDDPM(num_timesteps=0)
