"""Thin wrappers that turn models into the one denoiser interface the losses take.

A *denoiser* is a callable ``(x_t, t, cond) -> x0_hat`` (k-diffusion's ``external.py`` idea).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sd_dmd.core.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class EpsDenoiser:
    """Wrap an eps-predicting model ``eps_fn(x_t, t, cond)`` as an x0 denoiser (Tweedie / DDPM Eq.)."""

    def __init__(self, eps_fn: Callable, schedule: NoiseSchedule):
        self.eps_fn = eps_fn  # (x_t, t, cond) -> eps_hat
        self.schedule = schedule  # converts eps to x0

    def __call__(self, x_t, t, cond=None):
        return self.schedule.eps_to_x0(x_t, self.eps_fn(x_t, t, cond), t)


class CFGDenoiser:
    """Classifier-free guidance, DMD2's convention: out = out_u + s (out_c - out_u).

    Guidance is linear in eps and x0 = (x_t - sigma eps) / alpha is affine in eps with the same x_t, so
    guiding x0 equals guiding eps. Unconditional and conditional halves run in one batched forward.
    """

    def __init__(self, denoiser: Denoiser, scale: float, uncond: torch.Tensor):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.denoiser = denoiser  # unguided denoiser taking a batch of conditions
        self.scale = scale  # guidance scale s; 1 = conditional only
        self.uncond = uncond  # unconditional embedding, batch 1 (broadcast) or B

    def __call__(self, x_t, t, cond):
        if self.scale == 1.0:
            return self.denoiser(x_t, t, cond)
        b = x_t.shape[0]
        uncond = self.uncond.to(device=cond.device, dtype=cond.dtype).expand(b, *cond.shape[1:])
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        out_u, out_c = out.chunk(2)
        return out_u + self.scale * (out_c - out_u)
