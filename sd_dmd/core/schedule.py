"""Noise schedules: SD's DDPM one (scaled_linear, T = 1000), the flow-matching one of SD3 (issue 38), and timestep
sampling.

Notation as DESIGN.md: x_t = alpha_t x0 + sigma_t eps for an integer index t in [0, T) (T = 1000), more noise as t
grows. DDPM: abar_t = alphas_cumprod[t], alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
x0_hat = (x_t - sigma_t eps_hat) / alpha_t. Flow matching: alpha_t = 1 - sigma_t with sigma_t the teacher's own
training sigmas (shifted), x0_hat = x_t - sigma_t v_hat for the velocity v = eps - x0. Everything above the schedule
(the losses, the draws, the step) sees only indices, ``alpha_sigma``, ``add_noise`` and ``to_x0``, so it is the same
for both; :meth:`NoiseSchedule.model_timestep` is what the network is given for an index (t itself for DDPM, 1000
sigma_t for flow matching).
"""
from __future__ import annotations

from typing import Optional

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so ``v`` (shape [B]) broadcasts against an ``ndim`` tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class NoiseSchedule:
    """Variance-preserving DDPM schedule; all helpers index by integer timestep tensors."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double().float()  # [T], fp32
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000):
        """As diffusers DDPMScheduler(beta_schedule="scaled_linear") — SD v1.x/2.x-base defaults."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0).float())

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """From any diffusers scheduler exposing ``alphas_cumprod`` (DDPM/DDIM/PNDM/LCM)."""
        return cls(torch.as_tensor(scheduler.alphas_cumprod))

    def _at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t.long().to(like.device)]

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """(alpha_t, sigma_t) broadcastable against ``like`` (fp32)."""
        abar = append_dims(self._at(t, like), like.ndim)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise (as DDPMScheduler.add_noise)."""
        a, s = self.alpha_sigma(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def eps_to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return (x_t.float() - s * eps.float()) / a

    def v_to_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = alpha_t x_t - sigma_t v for v = alpha_t eps - sigma_t x0 (v-prediction, Salimans & Ho 2022)."""
        a, s = self.alpha_sigma(t, x_t)
        return a * x_t.float() - s * v.float()

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, prediction_type: str = "epsilon"):
        """The x0 of a UNet output of ``prediction_type`` ("epsilon" or "v_prediction", as diffusers names them)."""
        if prediction_type == "epsilon":
            return self.eps_to_x0(x_t, out, t)
        if prediction_type == "v_prediction":
            return self.v_to_x0(x_t, out, t)
        raise ValueError(f"unknown prediction_type '{prediction_type}' (epsilon or v_prediction)")

    def x0_to_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return (x_t.float() - a * x0.float()) / s

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for index ``t``: the index itself (SD's UNets are trained on it)."""
        return t

    def describe_range(self, t_min: int, t_max: int) -> str:
        return f"t in [{t_min}, {t_max}]"


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow (SD3, Flux): x_t = (1 - sigma_t) x0 + sigma_t eps, the network predicting v = eps - x0, so
    x0 = x_t - sigma_t v.

    Index t in [0, T) is the teacher's training sigma number t, counted from the least noise: sigma_t is
    ``FlowMatchEulerDiscreteScheduler``'s ``sigmas`` in ascending order, i.e. shift s / (1 + (shift - 1) s) of
    s = (t + 1) / T, and the network is given 1000 sigma_t, as the scheduler's ``timesteps``. So t = 999 is sigma = 1
    (pure noise: the one-step generator's input) and every range of indices in the config (DM, fake score, GAN) is a
    range of the teacher's own training timesteps, with its shift."""

    def __init__(self, sigmas: torch.Tensor, timestep_scale: float = 1000.0):
        self.sigmas = sigmas.float()  # [T], ascending
        self.num_train_timesteps = len(sigmas)
        self.timestep_scale = timestep_scale
        self.alphas_cumprod = (1.0 - self.sigmas) ** 2  # the same SNR, for code that reads it (not for noising)

    @classmethod
    def from_scheduler(cls, scheduler) -> "FlowMatchSchedule":
        """From a ``FlowMatchEulerDiscreteScheduler`` (or a scheduler with its config): its training sigmas, exactly
        as its ``__init__`` computes them. Dynamic shifting (Flux: a shift that depends on the image size) is refused."""
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting"):
            raise ValueError("a flow-matching scheduler with use_dynamic_shifting (a resolution-dependent shift, as "
                             "Flux's) is not supported yet; SD3's fixed shift is")
        n = int(cfg.get("num_train_timesteps", 1000))
        fresh = type(scheduler).from_config(cfg)  # set_timesteps changes .sigmas; a fresh one has the training ones
        return cls(torch.as_tensor(fresh.sigmas[:n]).flip(0), float(n))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        s = append_dims(self.sigmas.to(like.device)[t.long().to(like.device)], like.ndim)
        return 1.0 - s, s

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, prediction_type: str = "flow"):
        if prediction_type != "flow":
            raise ValueError(f"a flow-matching schedule takes the velocity ('flow'), not '{prediction_type}'")
        _, s = self.alpha_sigma(t, x_t)
        return x_t.float() - s * out.float()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """1000 sigma_t, as ``FlowMatchEulerDiscreteScheduler.timesteps`` (what SD3's transformer is trained on)."""
        return self.sigmas.to(t.device)[t.long()] * self.timestep_scale

    def describe_range(self, t_min: int, t_max: int) -> str:
        return f"t in [{t_min}, {t_max}] (sigma in [{self.sigmas[t_min]:.3f}, {self.sigmas[t_max]:.3f}])"


def schedule_of(scheduler) -> NoiseSchedule:
    """The schedule of a diffusers scheduler: flow matching for ``FlowMatch*`` schedulers, DDPM for those exposing
    ``alphas_cumprod``."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchSchedule.from_scheduler(scheduler)
    return NoiseSchedule.from_scheduler(scheduler)


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [t_min, t_max] inclusive (DMD: [0.02T, 0.98T])."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    t = torch.randint(t_min, t_max + 1, (batch,), generator=generator, device="cpu")
    return t.to(device)


# ----- where diffusers' LCMScheduler samples a few-step generator as the trainer does -------------------------------
LCM_SIGMA_DATA = 0.5  # LCMScheduler.get_scalings_for_boundary_condition_discrete's sigma_data (fixed in diffusers)
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling
LCM_X0_TOLERANCE = 1e-4  # the most LCMScheduler's sample may leave the trainer's x0, per unit of latent


def lcm_x0_deviation(t: int, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> float:
    """The most ``LCMScheduler``'s ``denoised`` at timestep ``t`` can differ from the x0 the UNet predicts (the
    trainer's G(x_t, t)), per unit of latent magnitude.

    LCM's boundary condition returns c_skip * x_t + c_out * x0, with c_skip = s^2 / ((k t)^2 + s^2) and
    c_out = k t / sqrt((k t)^2 + s^2) (s = sigma_data = 0.5, k = timestep_scaling), so for |x_t|, |x0| <= 1
    |denoised - x0| <= c_skip * |x_t| + |1 - c_out| * |x0| <= c_skip + |1 - c_out|, reached at x_t = -x0 = +-1.
    About 3.75e-3 / t^2 at k = 10: 3.8e-9 at t = 999, 6.0e-8 at 249, 9.4e-4 at 2, 2 (x_t, not x0) at 0."""
    x = float(t) * timestep_scaling
    c_skip = LCM_SIGMA_DATA ** 2 / (x ** 2 + LCM_SIGMA_DATA ** 2)
    c_out = x / (x ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
    return c_skip + abs(1.0 - c_out)


def smallest_lcm_timestep(timestep_scaling: float = LCM_TIMESTEP_SCALING, tol: float = LCM_X0_TOLERANCE,
                          num_train_timesteps: int = 1000) -> Optional[int]:
    """The smallest timestep at which :func:`lcm_x0_deviation` is within ``tol`` (7 for diffusers' defaults); the
    deviation falls as t grows, so every larger timestep is within it too. None when no timestep is."""
    return next((t for t in range(num_train_timesteps) if lcm_x0_deviation(t, timestep_scaling) <= tol), None)


def lcm_timesteps_error(timesteps, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                        tol: float = LCM_X0_TOLERANCE) -> Optional[str]:
    """Why ``LCMScheduler`` would not sample a few-step generator at ``timesteps`` as the trainer does (its x0 at
    each), or None. At small t LCM's boundary condition mixes x_t into its sample (:func:`lcm_x0_deviation`); the
    trainer, the model card and ``sd_dmd_sampling.json`` would promise what diffusers does not give."""
    bad = [int(t) for t in timesteps if lcm_x0_deviation(int(t), timestep_scaling) > tol]
    if not bad:
        return None
    lo = smallest_lcm_timestep(timestep_scaling, tol)
    worst = max(lcm_x0_deviation(t, timestep_scaling) for t in bad)
    allowed = f"the smallest allowed timestep is {lo}" if lo is not None else "no timestep is allowed"
    return (f"timestep{'s' if len(bad) > 1 else ''} {bad} would sample differently in diffusers: at small t "
            f"LCMScheduler returns c_skip * x_t + c_out * x0 rather than the generator's x0 (up to {worst:.2e} per "
            f"unit of latent, over {tol:.0e}); {allowed}")
