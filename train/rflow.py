"""Open-Sora 1.2's rectified flow (RFLOW): training loss, timestep transform and Euler sampler.

Rectified flow joins data x0 (t = 0) and noise (t = K = num_timesteps = 1000; T is the frame
count) by a straight line, ``x_t = (1 - t/K) x0 + (t/K) noise``, and the model learns the constant
velocity ``x0 - noise`` (pointing from noise to data). Sampling integrates that velocity from t = K
down to 0 with Euler steps. Everything below follows Open-Sora v1.2.0's scheduler and reproduces its golden numbers
(tests/data/opensora_v12, checked by tests/train/test_rflow.py), quirks included.

API (what the trainer and the sampling command use)::

    rf = RFlow(use_timestep_transform=True, sample_method="logit-normal")   # Open-Sora 1.2 training
    t = rf.sample_t(x0, model_kwargs)                                       # (B,) drawn (and transformed) t
    terms = rf.training_losses(model, x0, model_kwargs, noise=None, mask=x_mask, t=None)
    terms["loss"]                                                           # (B,) per-sample loss

    rf = RFlow(use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0)  # Open-Sora 1.2 inference
    x0 = rf.sample(model, z, y=y, mask=caption_mask, model_kwargs=dict(height=h, width=w, num_frames=nf,
                   fps=fps, ar=ar), cond_mask=None, progress=True)        # z (B, C, T, H, W) noise -> latents

``model(x, timestep, y=..., mask=..., x_mask=..., fps=..., height=..., width=..., num_frames=..., ar=...)``
is called as STDiT3 takes it: ``model(x_t, t, **model_kwargs)`` in training, and with the batch
doubled for classifier-free guidance in sampling. It returns (B, 2C, T, H, W) (STDiT3 keeps
pred_sigma=True: channels C..2C-1 are computed and unused) or (B, C, T, H, W); the velocity is
the first C channels.

Quirks of the reference, kept (each is tested against its golden values):

* :func:`timestep_transform` shifts t towards noise for larger videos, ratio
  r = sqrt(h*w / 512^2) * sqrt(num_frames // 17 * 5). Only ``num_frames[0] == 1`` makes a batch an
  image batch (the first sample decides for all), and clips of 2..16 frames get r = 0: t' = 0 for
  every t < K and 0/0 = NaN at t = K, which is the sampler's first step. ``nan_quirk=False`` gives
  such clips the image factor 1 instead (no collapse, no NaN); every other value is unchanged.
* :meth:`RFlow.training_losses` transforms t only when it draws t itself; a t passed in is used as
  it is. ``transform_scale`` reaches only that draw: the sampler's transform always uses scale 1.
* With a frame mask (``mask``; the trainer passes x_mask), frames with mask False are fed x0
  exactly and left out of the loss mean.
* The sampler's null caption is the model's ``y_embedder.y_embedding`` buffer, masked with the
  prompts' caption mask; guidance is ``u + cfg_scale * (c - u)`` with the conditional half first;
  the last Euler step integrates all the way to t = 0.

Library or hand-written: the Euler update is diffusers' ``FlowMatchEulerDiscreteScheduler`` with the
sigmas t/K (its velocity is noise - x0, so it gets -v), used whenever the batch shares one schedule.
Written here, each with its reason beside it: the timestep transform (resolution- and frame-aware,
per sample: diffusers' shift is one number per scheduler), the noising ``add_noise`` (diffusers'
``scale_noise`` looks each time up in its own schedule, so it cannot take the continuous per-sample
training times; written here it also rounds as the reference, bitwise), the loss (diffusers ships
none for flow matching), the per-sample Euler step (when the samples' schedules differ),
classifier-free guidance and the conditioning frames.
diffusers is optional (the ``train`` extra): imported only when :meth:`RFlow.sample` runs, and without it
the per-sample step (the same update) runs instead.

Dimension alphabet: B batch, C latent channels, T frames, H, W latent height and width, L caption
tokens, Ct caption channels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["SAMPLE_METHODS", "RFlow", "timestep_transform"]

SAMPLE_METHODS = ("uniform", "logit-normal")
ModelFn = Callable[..., Tensor]
NoiseSource = Tensor | Callable[[int, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Timestep transform
# ------------------------------------------------------------------------------------------------


def timestep_transform(
    t: Tensor,
    model_kwargs: Mapping[str, Tensor],
    *,
    base_resolution: int = 512 * 512,
    base_num_frames: int = 1,
    scale: float = 1.0,
    num_timesteps: int = 1000,
    nan_quirk: bool = True,
) -> Tensor:
    """Open-Sora 1.2's resolution- and length-aware shift of rectified-flow times, per sample.

    With s = t / num_timesteps and r = sqrt(h*w / base_resolution) * sqrt(f / base_num_frames) * scale,
    where f = 1 for an image batch and ``num_frames // 17 * 5`` (the latent frames of Open-Sora 1.2's
    VAE) otherwise: ``t' = num_timesteps * r*s / (1 + (r - 1)*s)``. r > 1 moves every t towards
    noise, as bigger inputs need more noise to destroy the same structure; t = 0 and t = K stay put (r > 0).

    t: (B,) times in [0, num_timesteps] (float, or integer steps).
    model_kwargs: ``height``, ``width`` (pixels) and ``num_frames``, each a (B,) tensor; other keys
        are ignored. Only ``num_frames[0] == 1`` makes the whole batch an image batch.
    num_timesteps: K; Open-Sora's function defaults to 1, but both its callers pass the scheduler's
        1000, the default here.
    nan_quirk: True (Open-Sora) gives clips of 2..16 frames f = 0, so t' = 0 and, at t = K, 0/0 = NaN;
        False gives them f = 1 (as an image) and changes nothing else.
    Returns (B,) t' in t's floating dtype (float32 for integer t).
    """
    if not isinstance(t, Tensor) or t.dim() != 1:
        got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t: expected a (B,) tensor of times, got {got}")
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs: expected a dict with height, width and num_frames, got "
                        f"{type(model_kwargs).__name__}")
    sizes = {}
    for key in ("height", "width", "num_frames"):
        v = model_kwargs.get(key)
        if not isinstance(v, Tensor) or v.shape != t.shape or v.is_complex() or v.dtype == torch.bool:
            got = f"shape {tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"model_kwargs[{key!r}]: the timestep transform needs a real ({t.shape[0]},) tensor "
                             f"(one value per sample), got {got}")
        sizes[key] = v
    for name, value in (("base_resolution", base_resolution), ("base_num_frames", base_num_frames),
                        ("num_timesteps", num_timesteps), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}: expected a positive number, got {value!r}")

    # The reference's operations in its order, so that float32 rounding matches.
    s = t / num_timesteps
    ratio_space = (sizes["height"] * sizes["width"] / base_resolution).sqrt()
    nf = sizes["num_frames"]
    latent_frames = nf // 17 * 5
    if not nan_quirk:
        latent_frames = latent_frames.clamp(min=1)
    # the first sample decides for the batch (torch.where instead of `if nf[0] == 1`: no host sync)
    frames = torch.where(nf[:1] == 1, torch.ones_like(nf), latent_frames)
    ratio_time = (frames / base_num_frames).sqrt()
    ratio = ratio_space * ratio_time * scale
    new_s = ratio * s / (1 + (ratio - 1) * s)
    return new_s * num_timesteps


# ------------------------------------------------------------------------------------------------
# RFlow
# ------------------------------------------------------------------------------------------------


class RFlow:
    """Open-Sora 1.2's rectified flow: the scheduler of ``RFLOW`` / ``RFlowScheduler``, with its defaults.

    Args:
        num_timesteps: K, the time of pure noise (1000).
        num_sampling_steps: Euler steps of :meth:`sample` (Open-Sora: 10 by default, 30 in its
            inference config).
        cfg_scale: classifier-free guidance scale of :meth:`sample` (4.0 by default, 7.0 in the
            inference config).
        use_timestep_transform: apply :func:`timestep_transform` to drawn training times and to the
            sampling schedule (both Open-Sora 1.2 configs set it).
        transform_scale: the transform's ``scale`` for drawn training times only.
        sample_method: how training draws t: "uniform" (t ~ U[0, K)) or "logit-normal"
            (t = K * sigmoid(N(loc, scale)); Open-Sora 1.2's training config).
        loc, scale: the logit-normal's mean and standard deviation.
        use_discrete_timesteps: integer times: training draws t from {0, ..., K-1} (uniform only),
            the sampling schedule is rounded to integers.
        nan_quirk: passed to :func:`timestep_transform` (True: Open-Sora's NaN for 2..16 frames).
        overshoot_quirk: True (Open-Sora) keeps the sampling schedule as the float32 transform gives
            it: t = K maps to r / (1 + (r - 1)) * K, a few ulp above K for about one size in ten
            (1000.0005 at 24 x 32 pixels), and since a frame is generated at a step iff
            cond_mask * K >= t, such a first step treats even the frames to generate as kept (the
            step is lost and the next noises the starting noise again). False clamps the schedule to
            [0, K].
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        num_sampling_steps: int = 10,
        cfg_scale: float = 4.0,
        use_timestep_transform: bool = False,
        transform_scale: float = 1.0,
        sample_method: str = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        use_discrete_timesteps: bool = False,
        nan_quirk: bool = True,
        overshoot_quirk: bool = True,
    ):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
        if isinstance(num_sampling_steps, bool) or not isinstance(num_sampling_steps, int) or num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps: expected a positive int, got {num_sampling_steps!r}")
        for name, value in (("cfg_scale", cfg_scale), ("transform_scale", transform_scale), ("loc", loc),
                            ("scale", scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number, got {value!r}")
        if not transform_scale > 0 or not scale > 0:
            raise ValueError(f"transform_scale and scale: expected positive numbers, got {transform_scale!r}, {scale!r}")
        if sample_method not in SAMPLE_METHODS:
            raise ValueError(f"sample_method: expected one of {SAMPLE_METHODS}, got {sample_method!r}")
        if use_discrete_timesteps and sample_method != "uniform":
            raise ValueError("use_discrete_timesteps: integer times are drawn uniformly only; "
                             f"sample_method must be 'uniform', got {sample_method!r}")
        self.num_timesteps = num_timesteps
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = float(cfg_scale)
        self.use_timestep_transform = bool(use_timestep_transform)
        self.transform_scale = float(transform_scale)
        self.sample_method = sample_method
        self.loc, self.scale = float(loc), float(scale)
        self.use_discrete_timesteps = bool(use_discrete_timesteps)
        self.nan_quirk = bool(nan_quirk)
        self.overshoot_quirk = bool(overshoot_quirk)

    def __repr__(self) -> str:
        return (f"RFlow(num_timesteps={self.num_timesteps}, num_sampling_steps={self.num_sampling_steps}, "
                f"cfg_scale={self.cfg_scale}, use_timestep_transform={self.use_timestep_transform}, "
                f"transform_scale={self.transform_scale}, sample_method={self.sample_method!r}, loc={self.loc}, "
                f"scale={self.scale}, use_discrete_timesteps={self.use_discrete_timesteps}, "
                f"nan_quirk={self.nan_quirk})")

    # -- times -----------------------------------------------------------------------------------

    def transform(self, t: Tensor, model_kwargs: Mapping[str, Tensor], scale: float = 1.0) -> Tensor:
        """:func:`timestep_transform` with this scheduler's K and nan_quirk."""
        return timestep_transform(t, model_kwargs, scale=scale, num_timesteps=self.num_timesteps,
                                  nan_quirk=self.nan_quirk)

    def sample_t(self, x_start: Tensor, model_kwargs: Mapping[str, Tensor] | None = None) -> Tensor:
        """Training times for a batch, drawn as :meth:`training_losses` draws them: (B,) on x_start's device.

        Discrete: int64 uniform in {0..K-1}; "uniform": float32 U[0, 1) * K; "logit-normal":
        K * sigmoid(N(loc, scale)), drawn on the CPU from the default generator and moved (as the
        reference, so a seed gives the same times on any device). Then, with
        use_timestep_transform, the transform with ``transform_scale`` (needs model_kwargs' height,
        width and num_frames).
        """
        self._check_x(x_start, "x_start")
        B, device = x_start.shape[0], x_start.device
        if self.use_discrete_timesteps:
            t = torch.randint(0, self.num_timesteps, (B,), device=device)
        elif self.sample_method == "uniform":
            t = torch.rand((B,), device=device) * self.num_timesteps
        else:
            # torch's LogisticNormal over a 1-D base is the 2-simplex (sigmoid(x), 1 - sigmoid(x)),
            # x ~ N(loc, scale): coordinate 0 is the logit-normal; it draws exactly as the reference.
            dist = torch.distributions.LogisticNormal(torch.tensor([self.loc]), torch.tensor([self.scale]))
            t = dist.sample((B,))[:, 0].to(device) * self.num_timesteps
        if self.use_timestep_transform:
            t = self.transform(t, self._check_kwargs(model_kwargs), scale=self.transform_scale)
        return t

    def timesteps(self, batch: int, model_kwargs: Mapping[str, Tensor] | None = None,
                  device: torch.device | str | None = None) -> list[Tensor]:
        """The sampling schedule: ``num_sampling_steps`` (batch,) tensors, from K down (t = 0 excluded).

        t_i = (1 - i/steps) * K as Python floats (rounded to ints when use_discrete_timesteps), each
        a float32 (int64 when discrete) tensor; with use_timestep_transform each goes through the
        transform per sample, with scale 1 (the reference's sampler never passes transform_scale).
        """
        steps, K = self.num_sampling_steps, self.num_timesteps
        times: list[float | int] = [(1.0 - i / steps) * K for i in range(steps)]
        if self.use_discrete_timesteps:
            times = [round(t) for t in times]
        out = [torch.tensor([t] * batch, device=device) for t in times]
        if self.use_timestep_transform:
            kwargs = self._check_kwargs(model_kwargs)
            out = [self.transform(t, kwargs) for t in out]
        if not self.overshoot_quirk:
            out = [t.clamp(0, K) for t in out]
        return out

    # -- forward process and loss ----------------------------------------------------------------

    def add_noise(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t/K) x0 + (t/K) noise, for x (B, C, T, H, W) and t (B,).

        Hand-written: diffusers' ``scale_noise`` finds each time by value in its own sampling schedule,
        which continuous per-sample training times are not in. Rounded as the reference (a = 1 -
        t.float()/K, then a*x0 + (1 - a)*noise), which gives its x_t bitwise.
        """
        if noise.shape != x_start.shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)} does not match x_start {tuple(x_start.shape)}")
        a = (1 - t.float() / self.num_timesteps).reshape(-1, *([1] * (x_start.dim() - 1)))
        return a * x_start + (1 - a) * noise

    def training_losses(
        self,
        model: ModelFn,
        x_start: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        t: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Rectified-flow loss for one batch: dict(loss=(B,)).

        x_start: x0 (B, C, T, H, W) latents. t: (B,) times in [0, K], used as given; None draws them
        with :meth:`sample_t` (the transform applies only then). noise: (B, C, T, H, W), default
        ``randn_like(x_start)`` drawn after t. The model gets ``model(x_t, t, **model_kwargs)``.
        mask: (B, T) bool, the trainer's x_mask (True = generated frame): frames with False are fed
            x0 (they condition the others) and left out of the mean. A sample whose mask is all
            False has no frame to average: the reference divides 0 by 0 (NaN); here its loss is 0.
        weights: optional (K,) per-step weights, looked up at integer t (use_discrete_timesteps).
        loss = mean over C, H, W and the kept frames of (v - (x0 - noise))^2, v the output's first C
        channels.
        """
        model_kwargs = self._check_kwargs(model_kwargs)
        self._check_x(x_start, "x_start")
        B, _, T = x_start.shape[:3]
        if t is None:
            t = self.sample_t(x_start, model_kwargs)
        else:
            self._check_t(t, B)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif not isinstance(noise, Tensor) or noise.shape != x_start.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise: shape {got} does not match x_start {tuple(x_start.shape)}")
        if mask is not None:
            mask = self._check_frame_mask(mask, B, T, "mask")
        if weights is not None:
            weights = self._check_weights(weights, t)

        x_t = self.add_noise(x_start, noise, t)
        if mask is not None:
            # the reference's x_t0 = add_noise(x0, noise, 0), which is x0 exactly
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_start)
        model_output = model(x_t, t, **model_kwargs)
        velocity = self._velocity(model_output, x_start)
        err = (velocity - (x_start - noise)).pow(2)
        if weights is not None:
            err = weights[t.long()].float().reshape(B, 1, 1, 1, 1) * err
        if mask is None:
            loss = err.mean(dim=(1, 2, 3, 4))
        else:
            # the reference's order: frame sums first, then (C, H, W), over kept frames * C*H*W
            per_frame = err.transpose(1, 2).reshape(B, T, -1)
            denom = (mask.sum(dim=1) * per_frame.shape[-1]).clamp(min=1)
            loss = (per_frame * mask[:, :, None]).sum(dim=1).sum(dim=1) / denom
        return {"loss": loss}

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        z: Tensor,
        *,
        y: Tensor,
        mask: Tensor | None = None,
        null_y: Tensor | None = None,
        model_kwargs: dict | None = None,
        cond_mask: Tensor | None = None,
        cfg_scale: float | None = None,
        progress: bool = False,
        noise: NoiseSource | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int, float, int], object] | None = None,
    ) -> Tensor:
        """Euler integration of the learned velocity from z (t = K) to latents (t = 0), with guidance.

        z: (B, C, T, H, W) starting noise (float32). Returns the (B, C, T, H, W) float32 latents.
        y: (B, 1, L, Ct) or (B, L, Ct) caption embeddings (T5 hidden states).
        mask: (B, L) caption mask (1 = token kept), or None for all L tokens. The null caption takes
            the same mask (the reference repeats the prompts' mask over the doubled batch).
        null_y: the unconditional caption, (L, Ct), (B, L, Ct) or (B, 1, L, Ct); None takes
            ``model.y_embedder.y_embedding`` (STDiT3's learned null caption).
        model_kwargs: the other model inputs, as tensors of batch B: ``height``, ``width``,
            ``num_frames`` (these three also drive the timestep transform), ``fps``, ``ar`` and any
            other keyword the model takes. Tensors whose first dim is B are repeated to 2B.
        cond_mask: (B, T) per-frame values m in [0, 1] (float, or bool = 1/0): 1 generates the frame,
            0 keeps z's frame as it is (conditioning frames: put their clean latents in z), and
            0 < m < 1 keeps it until the step where t <= m*K, then replaces it once by noise at that t
            and generates it from there. Frame f is generated at a step iff m_f * K >= t; the model
            gets that as ``x_mask`` (2B, T).
        cfg_scale: overrides the scheduler's guidance scale. Each step runs the model once on the
            doubled batch (conditional half first) and uses ``v = u + cfg_scale * (c - u)`` on the
            first C output channels, in float32 whatever the model's output dtype.
        noise: the per-step noise for cond_mask (the reference draws ``randn_like(z)`` at every step
            when a cond_mask is given, used or not): None draws it from ``generator`` (None: torch's
            default generator, the reference's stream); a (steps, B, C, T, H, W) tensor replays it; a
            callable ``noise(step, z) -> (B, C, T, H, W)`` supplies it.
        progress: a tqdm bar over the steps.
        on_step: called as ``on_step(i, t, steps)`` before the i-th of ``steps`` model evaluations, t
            the first sample's timestep as a Python number (e.g. stdit.models.accel.FastSampling.on_step);
            the schedule is read to the host once, before the first step.
        """
        B = self._check_z(z)
        kwargs = self._check_kwargs(model_kwargs)
        cfg = self.cfg_scale if cfg_scale is None else cfg_scale
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
            raise TypeError(f"cfg_scale: expected a number or None, got {cfg_scale!r}")
        y2, mask2 = self._null_caption(model, y, mask, null_y, B)
        doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v
                   for k, v in kwargs.items()}
        for key in ("y", "mask", "x_mask"):
            if key in doubled:
                raise ValueError(f"model_kwargs: {key!r} is set by sample() itself (y / mask arguments, "
                                 f"cond_mask); remove it from model_kwargs")
        timesteps = self.timesteps(B, kwargs, z.device)
        steps = len(timesteps)
        if cond_mask is not None:
            cond_mask = self._check_cond_mask(cond_mask, z)
            noise_added = cond_mask == 1  # frames being generated from the start
        if isinstance(noise, Tensor) and tuple(noise.shape) != (steps, *z.shape):
            raise ValueError(f"noise: expected a ({steps}, {', '.join(map(str, z.shape))}) tensor (one draw per "
                             f"step), got {tuple(noise.shape)}")
        if noise is not None and not isinstance(noise, Tensor) and not callable(noise):
            raise TypeError(f"noise: expected None, a tensor or a callable, got {type(noise).__name__}")

        euler = self._diffusers_euler(timesteps)  # None when the samples' schedules differ
        z = z.float()
        order = range(steps)
        host_times = torch.stack(timesteps)[:, 0].tolist() if on_step is not None else None
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc="RFLOW sampling")
        for i in order:
            t = timesteps[i]
            if on_step is not None:
                on_step(i, host_times[i], steps)
            if cond_mask is not None:
                x0 = z.clone()
                step_noise = self._step_noise(noise, i, x0, generator)
                x_noise = self.add_noise(x0, step_noise, t)
                upper = cond_mask * self.num_timesteps >= t[:, None]  # (B, T): generated at this step
                doubled["x_mask"] = upper.repeat(2, 1)
                # frames whose generation starts at this step: noised once, to this t
                z = torch.where((upper & ~noise_added)[:, None, :, None, None], x_noise, x0)
                noise_added = upper

            out = model(torch.cat([z, z]), torch.cat([t, t]), y=y2, mask=mask2, **doubled)
            v2 = self._velocity(out, z, batch=2 * B).float()
            cond, uncond = v2[:B], v2[B:]
            v = uncond + cfg * (cond - uncond)

            if euler is not None:
                # diffusers' velocity is noise - x0 (ours x0 - noise): it steps z + (s_next - s) * (-v)
                z = euler.step(-v, euler.timesteps[i], z).prev_sample
            else:
                # Per-sample step, written here: diffusers' scheduler holds one sigma table for the
                # whole batch, and these samples' transformed schedules differ.
                t_next = timesteps[i + 1] if i + 1 < steps else torch.zeros_like(t)
                dt = (t - t_next) / self.num_timesteps
                z = z + v * dt[:, None, None, None, None]

            if cond_mask is not None:
                z = torch.where(upper[:, None, :, None, None], z, x0)  # kept frames stay as they were
        return z

    def _diffusers_euler(self, timesteps: list[Tensor]):
        """diffusers' flow-matching Euler scheduler on the sigmas t_i / K (+ the terminal 0), when every
        sample has the same schedule; else None (the per-sample step in :meth:`sample`).

        Also None without diffusers (GPU images often lack it): the per-sample step is the same
        update, so sampling needs no training dependency (tests/train/test_rflow.py checks both)."""
        stacked = torch.stack(timesteps)  # (steps, B)
        if not torch.equal(stacked, stacked[:, :1].expand_as(stacked)):
            return None
        try:
            from diffusers import FlowMatchEulerDiscreteScheduler
        except ImportError:
            return None

        sigmas = (stacked[:, 0].double() / self.num_timesteps).tolist()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_timesteps, shift=1.0)
        scheduler.set_timesteps(sigmas=sigmas, device=stacked.device)
        # Step indices count from 0: diffusers otherwise finds the first index by value, which breaks
        # on repeated times (a collapsed schedule of zeros).
        scheduler.set_begin_index(0)
        return scheduler

    def _null_caption(self, model: ModelFn, y: Tensor, mask: Tensor | None, null_y: Tensor | None,
                      B: int) -> tuple[Tensor, Tensor | None]:
        """(2B, 1, L, Ct) captions, prompts first then the null caption, and the (2B, L) mask."""
        if not isinstance(y, Tensor) or y.dim() not in (3, 4) or y.shape[0] != B or (y.dim() == 4 and y.shape[1] != 1):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y: expected caption embeddings ({B}, 1, L, Ct) or ({B}, L, Ct), got {got}")
        y = y if y.dim() == 4 else y[:, None]
        L, Ct = y.shape[-2:]
        if null_y is None:
            null_y = getattr(getattr(model, "y_embedder", None), "y_embedding", None)
            if not isinstance(null_y, Tensor):
                raise ValueError("null_y: the model has no y_embedder.y_embedding (STDiT3's null caption); "
                                 "pass the unconditional caption embedding as null_y")
        if not isinstance(null_y, Tensor) or tuple(null_y.shape[-2:]) != (L, Ct) or null_y.dim() not in (2, 3, 4):
            got = tuple(null_y.shape) if isinstance(null_y, Tensor) else type(null_y).__name__
            raise ValueError(f"null_y: expected ({L}, {Ct}), ({B}, {L}, {Ct}) or ({B}, 1, {L}, {Ct}) to match y, got {got}")
        null_y = null_y.reshape(-1, 1, L, Ct).to(device=y.device, dtype=y.dtype)
        if null_y.shape[0] not in (1, B):
            raise ValueError(f"null_y: expected a batch of 1 or {B}, got {null_y.shape[0]}")
        y2 = torch.cat([y, null_y.expand(B, 1, L, Ct)])
        if mask is None:
            return y2, None
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, L):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected the ({B}, {L}) caption mask, got {got}")
        return y2, mask.repeat(2, 1)

    def _step_noise(self, noise: NoiseSource | None, i: int, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        if noise is None:
            # the reference's randn_like(x0) is this draw on the default generator
            return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        drawn = noise[i] if isinstance(noise, Tensor) else noise(i, x0)
        if not isinstance(drawn, Tensor) or drawn.shape != x0.shape:
            got = tuple(drawn.shape) if isinstance(drawn, Tensor) else type(drawn).__name__
            raise ValueError(f"noise: step {i} gave {got}, expected {tuple(x0.shape)}")
        return drawn.to(device=x0.device, dtype=x0.dtype)

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def _velocity(out: Tensor, x: Tensor, batch: int | None = None) -> Tensor:
        """The first C channels of the model output (B, C or 2C, T, H, W); x gives C, T, H, W (and B
        unless ``batch`` is given)."""
        B, C = (x.shape[0] if batch is None else batch), x.shape[1]
        ok = isinstance(out, Tensor) and out.dim() == x.dim() and out.shape[0] == B and out.shape[2:] == x.shape[2:]
        if not ok or out.shape[1] not in (C, 2 * C):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model output: expected ({B}, {2 * C} or {C}, {', '.join(map(str, x.shape[2:]))}) "
                             f"(the velocity in the first {C} channels), got {got}")
        return out[:, :C]

    @staticmethod
    def _check_kwargs(model_kwargs: Mapping | None) -> dict:
        if model_kwargs is None:
            return {}
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs: expected a dict or None, got {type(model_kwargs).__name__}")
        return dict(model_kwargs)

    @staticmethod
    def _check_x(x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 5 or not x.is_floating_point():
            got = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a floating (B, C, T, H, W) tensor, got {got}")

    def _check_z(self, z: Tensor) -> int:
        self._check_x(z, "z")
        return z.shape[0]

    def _check_t(self, t: Tensor, batch: int) -> None:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != batch or t.is_complex() or t.dtype == torch.bool:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t: expected a ({batch},) tensor of times in [0, {self.num_timesteps}], got {got}")
        if batch and not bool(((t >= 0) & (t <= self.num_timesteps)).all()):
            raise ValueError(f"t: times must lie in [0, {self.num_timesteps}], got min {t.min().item()} "
                             f"max {t.max().item()}")

    @staticmethod
    def _check_frame_mask(mask: Tensor, B: int, T: int, name: str) -> Tensor:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{name}: expected a ({B}, {T}) per-frame bool mask, got {got}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{name}: expected a bool (or 0/1 integer) per-frame mask, got {mask.dtype}")
            mask = mask.bool()
        return mask

    def _check_weights(self, weights: Tensor, t: Tensor) -> Tensor:
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (self.num_timesteps,):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weights: expected a ({self.num_timesteps},) per-step table, got {got}")
        if t.is_floating_point():
            raise ValueError("weights: the table is indexed by integer steps; pass integer t "
                             "(use_discrete_timesteps=True), got float t")
        return weights.to(t.device)

    @staticmethod
    def _check_cond_mask(cond_mask: Tensor, z: Tensor) -> Tensor:
        B, T = z.shape[0], z.shape[2]
        if not isinstance(cond_mask, Tensor) or tuple(cond_mask.shape) != (B, T) or cond_mask.is_complex():
            got = tuple(cond_mask.shape) if isinstance(cond_mask, Tensor) else type(cond_mask).__name__
            raise ValueError(f"cond_mask: expected a ({B}, {T}) per-frame tensor with values in [0, 1], got {got}")
        cond_mask = cond_mask.to(device=z.device, dtype=torch.float32)
        if not bool(((cond_mask >= 0) & (cond_mask <= 1)).all()):
            raise ValueError(f"cond_mask: values must lie in [0, 1] (1 generate, 0 keep), got {cond_mask.tolist()}")
        return cond_mask
