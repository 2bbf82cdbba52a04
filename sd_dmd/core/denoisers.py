"""Thin wrappers that turn models into the one denoiser interface the losses take.

A *denoiser* is a callable ``(x_t, t, cond) -> x0_hat`` (k-diffusion's ``external.py`` idea).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sd_dmd.core.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class PredictionDenoiser:
    """Wrap a model ``fn(x_t, t, cond)`` predicting eps (``prediction_type="epsilon"``) or v (``"v_prediction"``) as
    an x0 denoiser: x0 = (x_t - sigma eps) / alpha, or alpha x_t - sigma v."""

    def __init__(self, fn: Callable, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        self.fn = fn  # (x_t, t, cond) -> the model's prediction
        self.schedule = schedule  # converts it to x0
        self.prediction_type = prediction_type

    def __call__(self, x_t, t, cond=None):
        return self.schedule.to_x0(x_t, self.fn(x_t, t, cond), t, self.prediction_type)


class EpsDenoiser(PredictionDenoiser):
    """Wrap an eps-predicting model ``eps_fn(x_t, t, cond)`` as an x0 denoiser (Tweedie / DDPM Eq.)."""

    def __init__(self, eps_fn: Callable, schedule: NoiseSchedule):
        super().__init__(eps_fn, schedule, "epsilon")


class CFGDenoiser:
    """Classifier-free guidance, DMD2's convention: out = out_u + s (out_c - out_u).

    Guidance is linear in eps (or v) and x0 is affine in either with the same x_t and coefficients summing
    1 - s + s = 1, so guiding x0 equals guiding the model's output. Unconditional and conditional halves run in
    one batched forward.
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
