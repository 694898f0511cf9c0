"""Open-Sora 1.0's diffusion process (IDDPM), written from the math of Nichol & Dhariwal 2021.

* 1000 steps, linear beta schedule 1e-4 .. 0.02 (tables in float64, every lookup cast to float32 as the
  reference does), epsilon prediction;
* learned-range variance: the model returns 2C channels, eps and v (``IDDPM.p_mean_variance``);
* training loss per sample = MSE(eps) + vb, the variational-bound term in bits computed with eps
  detached so that only the variance learns from it (``IDDPM.training_losses``); it reproduces the
  golden losses of Open-Sora's own code (tests/data/opensora_v1) to 2.4e-7 in float32;
* respacing for sampling (Open-Sora samples 100 of the 1000 steps, ``space_timesteps``); the model
  always sees the original step index;
* sampling: ancestral sampling of the respaced process with classifier-free guidance
  (``IDDPM.sample``), or diffusers' DPM-Solver in 20-25 steps (``IDDPM.sample_dpm_solver``).

Written here rather than taken from diffusers: the beta tables (diffusers builds them in float32, which
cannot reproduce the reference's losses), the vb term with the learned-range variance, IDDPM's
respacing with its map to the original indices, and the ancestral sampler (it shares
``p_mean_variance`` with the vb term; diffusers' DDPMScheduler would need float32 tables and a custom
timestep list for the same thing).

Latents are not clipped: IDDPM's ``clip_denoised=True`` clamps the predicted x_0 to [-1, 1], which is
meant for pixels; Open-Sora 1.0 samples VAE latents (x 0.18215, not bounded by 1) with
``clip_denoised=False``, the default everywhere here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .extras import train_imports

__all__ = [
    "IDDPM",
    "linear_beta_schedule",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]


# ------------------------------------------------------------------------------------------------
# Schedules and respacing
# ------------------------------------------------------------------------------------------------


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Float64 linear betas of DDPM, 1e-4 .. 0.02 at 1000 steps (Nichol & Dhariwal scale both ends
    by 1000/num_timesteps so other lengths keep the same overall noise)."""
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: int | str | Sequence[int] | None) -> list[int]:
    """Original step indices kept by a respaced process, sorted ascending.

    spacing: None/"" keeps every step; an int K or "K" keeps K steps evenly spaced over
    0..num_timesteps-1 (index ``round(i * (N-1)/(K-1))``, both ends kept); "K1,K2,..." (or a list)
    splits 0..N-1 into equal sections and spaces Ki steps in section i; "ddimK" uses the integer
    stride s with ``len(range(0, N, s)) == K`` (0, s, 2s, ...).
    """
    N = num_timesteps
    if spacing is None or (isinstance(spacing, str) and spacing.strip() == ""):
        return list(range(N))
    if isinstance(spacing, str):
        text = spacing.strip()
        if text.startswith("ddim"):
            try:
                want = int(text[4:])
            except ValueError:
                raise ValueError(f"timestep_respacing: cannot parse {spacing!r}") from None
            for stride in range(1, N + 1):
                if len(range(0, N, stride)) == want:
                    return list(range(0, N, stride))
            raise ValueError(f"timestep_respacing: no integer stride gives exactly {want} of {N} steps")
        try:
            counts = [int(p) for p in text.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing: cannot parse {spacing!r}") from None
    elif isinstance(spacing, (int, np.integer)) and not isinstance(spacing, bool):
        counts = [int(spacing)]
    elif isinstance(spacing, Sequence) and all(isinstance(c, (int, np.integer)) for c in spacing):
        counts = [int(c) for c in spacing]
    else:
        raise ValueError(f"timestep_respacing: expected an int, a string like '100' or a list, got {spacing!r}")
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"timestep_respacing: step counts must be >= 1, got {spacing!r}")

    per, extra = divmod(N, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"timestep_respacing: cannot keep {count} steps of a {size}-step section (of {N})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


# ------------------------------------------------------------------------------------------------
# Gaussian helpers (DDPM / Improved DDPM math)
# ------------------------------------------------------------------------------------------------


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that DDPM's decoder uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats, elementwise) of data x in [-1, 1] quantized to 256 bins of width 2/255
    under N(means, exp(log_scales)^2); the edge bins take the whole tails (DDPM's decoder L_0)."""
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(f"x: shape {tuple(x.shape)} must equal means {tuple(means.shape)} "
                         f"and log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ------------------------------------------------------------------------------------------------
# IDDPM
# ------------------------------------------------------------------------------------------------

ModelFn = Callable[..., Tensor]


class IDDPM:
    """Open-Sora 1.0's Gaussian diffusion: IDDPM with eps prediction and learned-range variance.

    Args:
        num_timesteps: length of the training process (1000 in Open-Sora).
        timestep_respacing: "" / None (all steps: the training process), an int or a string such as
            "100" (Open-Sora's sampling), "K1,K2" or "ddimK"; see :func:`space_timesteps`. Every
            step index ``t`` taken by the methods below is an index into the RESPACED process
            (0..len(timestep_map)-1); the model is called with ``timestep_map[t]``.
        learn_sigma: the model returns eps and v (2*C channels); False: eps only (C channels), fixed
            "large" variance (beta_t, beta~_1 at t=0) and a loss of MSE alone (vb reported as 0).
        betas: optional float64 beta table of the ORIGINAL process (default: linear 1e-4..0.02).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        timestep_respacing: int | str | Sequence[int] | None = "",
        learn_sigma: bool = True,
        betas: np.ndarray | Sequence[float] | None = None,
    ):
        if betas is None:
            base = linear_beta_schedule(num_timesteps)
        else:
            base = np.asarray(betas, dtype=np.float64)
            if base.shape != (num_timesteps,) or not ((base > 0) & (base <= 1)).all():
                raise ValueError(f"betas: expected {num_timesteps} values in (0, 1], got shape {base.shape}")
        self.num_train_timesteps = num_timesteps
        self.train_betas = base  # the original (unspaced) schedule, float64
        self.learn_sigma = bool(learn_sigma)
        self.timestep_map = space_timesteps(num_timesteps, timestep_respacing)

        # Respaced process: betas recomputed from alphas_cumprod at the kept steps.
        abar = np.cumprod(1.0 - base)
        if len(self.timestep_map) == num_timesteps:
            betas64 = base.copy()
        else:
            kept = abar[self.timestep_map]
            betas64 = 1.0 - kept / np.concatenate([[1.0], kept[:-1]])
        self._set_tables(betas64)

    # -- tables ----------------------------------------------------------------------------------

    def _set_tables(self, betas: np.ndarray) -> None:
        # float64, as the reference: diffusers' DDPMScheduler(beta_schedule="linear") builds these in
        # float32 (float32 linspace and cumprod), and 867 of its 1000 alphas_cumprod then differ from the
        # float64 table rounded to float32 (by up to 2.5e-7), enough to miss the reference's losses
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] is 0 (log -inf): clip with the step-1 value
        pv1 = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[pv1], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # fixed-large variance (learn_sigma=False)
        fixed = np.concatenate([[pv1], betas[1:]])
        self.fixed_large_log_variance = np.log(fixed)
        self._torch_tables: dict[str, Tensor] = {}

    def _extract(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """table[t] of a float64 table cast to float32 (as the reference's lookup; casting the
        table first gives the same bits and keeps the lookup on t's device), shaped (B, 1, ...)."""
        key = f"{name}@{t.device}"
        table = self._torch_tables.get(key)
        if table is None:
            table = self._torch_tables[key] = torch.from_numpy(getattr(self, name)).float().to(t.device)
        return table[t.long()].reshape(-1, *([1] * (ndim - 1)))

    def _check_t(self, t: Tensor, batch: int, device: torch.device | None = None) -> Tensor:
        if not isinstance(t, Tensor):
            raise ValueError(f"t: expected a ({batch},) integer tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t: expected shape ({batch},) (one step per sample), got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t: expected an integer tensor of step indices, got {t.dtype}")
        if batch and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"t: step indices must lie in [0, {self.num_timesteps - 1}] (this process has "
                f"{self.num_timesteps} steps), got min {int(t.min())} max {int(t.max())}"
            )
        return t.long() if device is None else t.long().to(device)

    def map_timesteps(self, t: Tensor) -> Tensor:
        """Respaced step indices -> the original process's indices (what the model is fed)."""
        key = f"timestep_map@{t.device}"
        table = self._torch_tables.get(key)
        if table is None:
            table = self._torch_tables[key] = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
        return table[t.long()]

    # -- forward process -------------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        self._check_x(x_start, "x_start")
        t = self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)} does not match x_start {tuple(x_start.shape)}")
        n = x_start.dim()
        a, b = self._extract("sqrt_alphas_cumprod", t, n), self._extract("sqrt_one_minus_alphas_cumprod", t, n)
        return a * x_start + b * noise

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_t: shape {tuple(x_t.shape)} does not match x_start {tuple(x_start.shape)}")
        n = x_t.dim()
        mean = self._extract("posterior_mean_coef1", t, n) * x_start + self._extract("posterior_mean_coef2", t, n) * x_t
        return mean, self._extract("posterior_variance", t, n), self._extract("posterior_log_variance_clipped", t, n)

    # -- reverse process -------------------------------------------------------------------------

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor,
                        clip_denoised: bool = False) -> dict[str, Tensor]:
        """Mean and (log-)variance of p(x_{t-1} | x_t) from the model's raw output.

        model_output: (B, 2C, ...) eps and v when learn_sigma, else (B, C, ...) eps.
        Returns dict(mean, variance, log_variance, pred_xstart, eps).
        """
        self._check_output(model_output, x_t)
        n = x_t.dim()
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (v + 1) / 2  # v in [-1, 1] interpolates between beta~_t and beta_t (log domain)
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            log_variance = self._extract("fixed_large_log_variance", t, n).expand_as(x_t)
        a, b = self._extract("sqrt_recip_alphas_cumprod", t, n), self._extract("sqrt_recipm1_alphas_cumprod", t, n)
        pred_xstart = a * x_t - b * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart,
                    eps=eps)

    def vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0, the discretized-Gaussian decoder NLL -log p(x_0|x_1) at t == 0. Uses model_output as
        given (detach eps before calling for the hybrid loss)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- training --------------------------------------------------------------------------------

    def training_losses(
        self,
        model: ModelFn,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Open-Sora's hybrid loss for one batch: dict(loss, mse, vb), each (B,).

        model(x_t, timestep_map[t], **model_kwargs) must return (B, 2C, ...) (eps, v) when
        learn_sigma, else (B, C, ...). mse = mean over non-batch dims of (noise - eps)^2; vb (bits)
        is computed with eps detached (only the variance output gets its gradient); loss = mse + vb.
        """
        model_kwargs = self._check_kwargs(model_kwargs)
        self._check_x(x_start, "x_start")
        t = self._check_t(t, x_start.shape[0], x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif not isinstance(noise, Tensor) or noise.shape != x_start.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise: shape {got} does not match x_start {tuple(x_start.shape)}")
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.map_timesteps(t), **model_kwargs)
        self._check_output(model_output, x_t)
        C = x_start.shape[1]
        eps = model_output[:, :C]
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, C:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return dict(loss=mse + vb, mse=mse, vb=vb)

    # -- sampling --------------------------------------------------------------------------------

    def _guided(self, model: ModelFn, x: Tensor, model_t: Tensor, model_kwargs: dict,
                cfg_scale: float | None, guide_channels: int | None) -> Tensor:
        """One model evaluation with classifier-free guidance; returns (B, out_channels, ...)."""
        B, C = x.shape[:2]
        if cfg_scale is None:
            out = model(x, model_t, **model_kwargs)
            self._check_output(out, x)
            return out
        doubled = {k: (torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v)
                   for k, v in model_kwargs.items()}
        drop = torch.cat([torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)]).to(x.device)
        out = model(torch.cat([x, x]), torch.cat([model_t, model_t]), **doubled, force_drop_ids=drop)
        if not isinstance(out, Tensor) or out.dim() != x.dim() or out.shape[0] != 2 * B:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model output: expected a batch of {2 * B} (conditional + unconditional), got {got}")
        cond, uncond = out[:B], out[B:]
        self._check_output(cond, x)
        g = C if guide_channels is None else guide_channels
        eps_c, eps_u = cond[:, :C], uncond[:, :C]
        guided = eps_u[:, :g] + cfg_scale * (eps_c[:, :g] - eps_u[:, :g])
        # unguided eps channels (Open-Sora's quirk) and the variance channels: the conditional half's
        return torch.cat([guided, cond[:, g:]], dim=1)

    def _check_sampling_args(self, shape, cfg_scale, guide_channels) -> tuple[int, ...]:
        if not isinstance(shape, Sequence) or len(shape) < 2 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"shape: expected a sequence of positive ints (B, C, ...), got {shape!r}")
        C = shape[1]
        if guide_channels is not None and (not isinstance(guide_channels, int) or not 1 <= guide_channels <= C):
            raise ValueError(f"guide_channels: expected None or an int in [1, {C}], got {guide_channels!r}")
        if cfg_scale is not None and not isinstance(cfg_scale, (int, float)):
            raise ValueError(f"cfg_scale: expected a number or None, got {cfg_scale!r}")
        return tuple(shape)

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        shape: Sequence[int],
        model_kwargs: dict | None = None,
        *,
        cfg_scale: float | None = 7.0,
        guide_channels: int | None = None,
        progress: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        noise: Tensor | None = None,
        clip_denoised: bool = False,
        on_step: Callable[[int, float, int], object] | None = None,
    ) -> Tensor:
        """Ancestral sampling of the (respaced) reverse process with the learned variance.

        Build ``IDDPM(timestep_respacing="100")`` for Open-Sora's 100 sampling steps. Each step
        calls ``model(x, timestep_map[t], **model_kwargs)``; with classifier-free guidance
        (cfg_scale not None) the batch is doubled -- every tensor in model_kwargs whose leading dim
        is B is repeated (so the unconditional half keeps the caption mask, as in Open-Sora) and
        ``force_drop_ids`` = [0]*B + [1]*B makes the second half use the null caption -- and
        ``eps = eps_u + cfg_scale * (eps_c - eps_u)``. The variance channels are not guided (the
        conditional half's are used).

        guide_channels: None (default) guides all C eps channels. Open-Sora 1.0 used 3: its CFG
            code came from DiT/PixArt, written for 3-channel outputs, and guides ``eps[:, :3]`` only,
            leaving the 4th latent channel with the conditional eps unguided. That is an inherited
            quirk, not a design choice, so the default here is full guidance; pass 3 to reproduce
            Open-Sora's samples.
        cfg_scale: guidance scale (Open-Sora's inference configs use 7.0); None disables guidance
            (one pass, no force_drop_ids -- for models without a null caption).
        clip_denoised: False (default; Open-Sora's call) -- latents are not bounded by [-1, 1].
        generator / device / noise: randomness (initial noise and per-step noise are drawn from
            ``generator`` on ``device``; pass ``noise`` to fix the starting x_T).
        on_step: called as ``on_step(k, t, steps)`` before the k-th of ``steps`` model evaluations, t
            the (original-process) timestep the model gets, a Python number (e.g.
            stdit.models.accel.FastSampling.on_step).
        Returns x_0 of ``shape`` (float32).
        """
        shape = self._check_sampling_args(shape, cfg_scale, guide_channels)
        model_kwargs = self._check_kwargs(model_kwargs)
        device, x = self._start(shape, generator, device, noise)
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="IDDPM sampling")
        B = shape[0]
        for k, i in enumerate(steps):
            if on_step is not None:
                on_step(k, float(self.timestep_map[i]), self.num_timesteps)
            t = torch.full((B,), i, dtype=torch.long, device=device)
            out = self._guided(model, x, self.map_timesteps(t), model_kwargs, cfg_scale, guide_channels)
            pm = self.p_mean_variance(out.float(), x, t, clip_denoised=clip_denoised)
            if i > 0:
                z = torch.randn(shape, generator=generator, device=device)
                x = pm["mean"] + torch.exp(0.5 * pm["log_variance"]) * z
            else:
                x = pm["mean"]
        return x

    @torch.no_grad()
    def sample_dpm_solver(
        self,
        model: ModelFn,
        shape: Sequence[int],
        model_kwargs: dict | None = None,
        *,
        num_inference_steps: int = 20,
        cfg_scale: float | None = 7.0,
        guide_channels: int | None = None,
        progress: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        noise: Tensor | None = None,
        algorithm_type: str = "dpmsolver++",
        solver_order: int = 2,
    ) -> Tensor:
        """Fast deterministic sampling with ``diffusers.DPMSolverMultistepScheduler`` (20-25 steps).

        The scheduler gets the ORIGINAL 1000-step beta table (float64 -> diffusers keeps float32),
        epsilon prediction, and calls the model with original step indices; respacing does not
        apply. Same classifier-free guidance as :meth:`sample` (guide_channels default None = all
        channels; 3 = Open-Sora's quirk). The learned variance is unused (ODE solver); eps is the
        first C channels, sliced here: diffusers' ``variance_type="learned_range"`` would keep
        ``model_output[:, :3]``, hard-coded for 3-channel images, wrong for 4-channel latents.
        """
        with train_imports("diffusers"):
            from diffusers import DPMSolverMultistepScheduler

        shape = self._check_sampling_args(shape, cfg_scale, guide_channels)
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps: expected an int in [1, {self.num_train_timesteps}], "
                             f"got {num_inference_steps!r}")
        model_kwargs = self._check_kwargs(model_kwargs)
        device, x = self._start(shape, generator, device, noise)
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_train_timesteps,
            trained_betas=self.train_betas,
            prediction_type="epsilon",
            algorithm_type=algorithm_type,
            solver_order=solver_order,
        )
        with warnings.catch_warnings():  # diffusers 0.42 calls np.array(tensor, copy=False) here
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * scheduler.init_noise_sigma
        steps = scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="DPM-Solver sampling")
        B, C = shape[:2]
        for ts in steps:
            model_t = torch.full((B,), int(ts), dtype=torch.long, device=device)
            out = self._guided(model, x, model_t, model_kwargs, cfg_scale, guide_channels)
            x = scheduler.step(out[:, :C].float(), ts, x, generator=generator).prev_sample
        return x

    @staticmethod
    def _start(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None,
               noise: Tensor | None) -> tuple[torch.device, Tensor]:
        """The sampling device (``device``, else the generator's, else CPU) and x_T: ``noise`` if given,
        else drawn from ``generator``."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        device = torch.device(device)
        if noise is None:
            return device, torch.randn(shape, generator=generator, device=device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)} does not match shape {shape}")
        return device, noise.to(device=device, dtype=torch.float32)

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def _check_kwargs(model_kwargs: dict | None) -> dict:
        if model_kwargs is None:
            return {}
        if not isinstance(model_kwargs, dict):
            raise ValueError(f"model_kwargs: expected a dict or None, got {type(model_kwargs).__name__}")
        return model_kwargs

    @staticmethod
    def _check_x(x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            got = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a floating (B, C, ...) tensor, got {got}")

    def _check_output(self, out: Tensor, x: Tensor) -> None:
        C = x.shape[1]
        want = (x.shape[0], 2 * C if self.learn_sigma else C, *x.shape[2:])
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            why = ("2*C channels (eps and the learned variance; learn_sigma=True)" if self.learn_sigma
                   else "C channels (eps; learn_sigma=False)")
            raise ValueError(f"model output: expected shape {want}, {why}, got {got}")
