"""SD's DDPM noise schedule (scaled_linear, T = 1000) and timestep sampling.

Notation as DESIGN.md: abar_t = alphas_cumprod[t], alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
x_t = alpha_t x0 + sigma_t eps, x0_hat = (x_t - sigma_t eps_hat) / alpha_t.
"""
from __future__ import annotations

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

    def x0_to_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        return (x_t.float() - a * x0.float()) / s


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [t_min, t_max] inclusive (DMD: [0.02T, 0.98T])."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    t = torch.randint(t_min, t_max + 1, (batch,), generator=generator, device="cpu")
    return t.to(device)
