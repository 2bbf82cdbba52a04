"""What one DMD training step computes, as functions of the shared model and an explicit batch.

The loop (:mod:`sd_dmd.train`) draws the random numbers, splits a batch into micro-batches, runs these
under autocast, and owns accumulation, synchronisation, clipping, stepping and logging. Nothing here
knows about processes or optimisers, so a turn's gradient can be checked on its own (tests/test_correctness.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .losses import dmd_loss, fake_score_loss


def split_batch(value, n: int) -> list:
    if value is None:
        return [None] * n
    if len(value) % n:
        raise ValueError(f"cannot split a batch of {len(value)} into {n} equal micro-batches")
    k = len(value) // n
    return [value[i * k:(i + 1) * k] for i in range(n)]


class _Splittable:
    def split(self, n: int) -> list:
        """``n`` equal micro-batches (every field cut along its first dimension)."""
        parts = {f.name: split_batch(getattr(self, f.name), n) for f in dataclasses.fields(self)}
        return [type(self)(**{k: v[i] for k, v in parts.items()}) for i in range(n)]


@dataclass
class GeneratorBatch(_Splittable):
    prompts: list  # captions of the distribution-matching samples
    z: torch.Tensor  # generator input noise, (B, C, H, W)
    t: torch.Tensor  # distribution-matching timesteps, (B,)
    noise: torch.Tensor  # noise that diffuses G(z) to t, (B, C, H, W)
    ref_z: Optional[torch.Tensor] = None  # regression pairs: the teacher's input noise, (R, C, H, W)
    ref_y: Optional[torch.Tensor] = None  # regression pairs: the teacher's 50-step latents
    ref_prompts: Optional[list] = None  # regression pairs: their captions


@dataclass
class CriticBatch(_Splittable):
    t: torch.Tensor  # fake-score timesteps, (B,)
    noise: torch.Tensor  # noise that diffuses the samples to t


def generator_loss(model, batch: GeneratorBatch, *, dm_weight: float = 1.0, regression: Optional[Callable] = None,
                   regression_weight: float = 0.0):
    """dm_weight * DM loss (Eq. 7-8) + regression_weight * regression loss (Sec. 4.2.4) for one micro-batch.

    Returns ``(loss, stats, x, cond)``; ``x`` (detached) and ``cond`` are what the fake score trains on.
    """
    cond = model.encode_prompts(batch.prompts)
    x = model.generate(batch.z, cond)
    loss_dm, stats = dmd_loss(x, model.real_denoiser(), model.fake_denoiser(), batch.t, batch.noise,
                              model.schedule, cond)
    loss = dm_weight * loss_dm
    if regression is not None and batch.ref_z is not None:
        x_ref = model.generate(batch.ref_z, model.encode_prompts(batch.ref_prompts))
        loss_reg, s_reg = regression(x_ref, batch.ref_y)
        loss = loss + regression_weight * loss_reg
        stats.update(s_reg)
    return loss, stats, x.detach(), cond


@torch.no_grad()
def generator_samples(model, z: torch.Tensor, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh detached samples ``(G(z), cond)`` for the extra fake updates of TTUR."""
    cond = model.encode_prompts(prompts)
    return model.generate(z, cond), cond


def critic_loss(model, x: torch.Tensor, cond: torch.Tensor, batch: CriticBatch, weighting: str = "eps"):
    """The fake score's denoising loss on detached generator samples. Returns ``(loss, stats)``."""
    return fake_score_loss(model.fake_denoiser(), x, batch.t, batch.noise, model.schedule, cond, weighting)
