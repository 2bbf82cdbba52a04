"""What one DMD training step computes, as functions of the shared model and an explicit batch.

The loop (:mod:`sd_dmd.train`) draws the random numbers, splits a batch into micro-batches, runs these
under autocast, and owns accumulation, synchronisation, clipping, stepping and logging. Nothing here
knows about processes or optimisers, so a turn's gradient can be checked on its own (tests/test_correctness.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from sd_dmd.core.losses import (dmd_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss, grad_ratio,
                                input_grad, native_weighting, with_grad)


def split_batch(value, n: int) -> list:
    if value is None:
        return [None] * n
    if len(value) % n:
        raise ValueError(f"cannot split a batch of {len(value)} into {n} equal micro-batches")
    k = len(value) // n
    return [value[i * k:(i + 1) * k] for i in range(n)]


class _Splittable:
    def split(self, n: int) -> list:
        """``n`` equal micro-batches (every tensor/list field cut along its first dimension; ints shared)."""
        parts = {f.name: (split_batch(v, n) if not isinstance(v, int) else [v] * n)
                 for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
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
    sim_steps: int = 0  # backward simulation: G runs this many of its timesteps (no grad) before the trained call
    sim_noise: Optional[torch.Tensor] = None  # fresh re-noising noise for those steps, (B, sim_steps, C, H, W)
    gan_t: Optional[torch.Tensor] = None  # GAN: timesteps that diffuse G's sample before the discriminator, (B,)
    gan_noise: Optional[torch.Tensor] = None


@dataclass
class CriticBatch(_Splittable):
    t: torch.Tensor  # fake-score timesteps, (B,)
    noise: torch.Tensor  # noise that diffuses the samples to t
    real: Optional[torch.Tensor] = None  # GAN: encoded real latents, (B_real, C, H, W)
    real_prompts: Optional[list] = None  # their captions
    real_t: Optional[torch.Tensor] = None  # their own diffusion-GAN timesteps and noise
    real_noise: Optional[torch.Tensor] = None
    gan_t: Optional[torch.Tensor] = None  # the generator samples' diffusion-GAN timesteps and noise
    gan_noise: Optional[torch.Tensor] = None
    r1_noise: Optional[torch.Tensor] = None  # approximate R1: gan.r1_alpha * N(0, I) added to the real latents


def backward_simulate(model, z: torch.Tensor, cond: torch.Tensor, timesteps: list[int], k: int,
                      noise: Optional[torch.Tensor]) -> torch.Tensor:
    """DMD2's backward simulation: G's x0 at ``timesteps[k]``, on the input its own first ``k`` steps make.

    From pure noise ``z`` (at ``timesteps[0]``), G runs ``k`` steps under no_grad, each x0 re-noised to the next
    timestep with *fresh* noise (``noise[:, i]``), as the few-step sampler does at inference; then one call with
    gradients. ``k = 0`` is the one-step case, pure noise in (the case other ports skip)."""
    x_t = z
    with torch.no_grad():
        for i in range(k):
            x0 = model.generate(x_t, cond, timesteps[i])
            t_next = torch.full((z.shape[0],), timesteps[i + 1], device=z.device, dtype=torch.long)
            x_t = model.schedule.add_noise(x0, noise[:, i].to(x0.dtype), t_next).to(z.dtype)
    return model.generate(x_t, cond, timesteps[k])


def generator_loss(model, batch: GeneratorBatch, *, dm_weight: float = 1.0, regression: Optional[Callable] = None,
                   regression_weight: float = 0.0, timesteps: Optional[list[int]] = None,
                   gan_weight: Union[float, Callable[[float], float]] = 0.0, gan_features: str = "fake",
                   grad_scale: float = 1.0, divergence=None):
    """The generator turn's loss for one micro-batch: a sum of terms, each a function of denoiser callables.

    dm_weight * DM loss (Eq. 7-8) + regression_weight * regression loss (Sec. 4.2.4) + gan_weight * DMD2's GAN
    term. G's sample comes from :func:`backward_simulate` over ``timesteps`` (one step when None).
    The GAN term's gradient is taken w.r.t. G's sample x alone (no gradient for the discriminator's LoRA or head) and
    enters the loss as a linear term in x with that gradient (:func:`with_grad`; the loss value is unchanged).
    ``gan_dm_grad_ratio`` = ||gan_weight d loss_gan/dx|| / ||dm_weight d loss_dm/dx||; ``gan_grad_sq`` and
    ``dm_grad_sq`` are the two squared norms (the GAN's at weight 1), for a ratio over a larger batch. ``gan_weight``
    may be a callable ``(gan_grad_sq, dm_grad_sq, term) -> weight`` of ``term`` (the GAN term at weight 1) in this
    loss: adaptive mode (training/gan_weight.py), which may also take ``term``'s gradient aside and return 0.
    ``grad_scale``: the fp16 loss scale, for the GAN gradient taken here. ``divergence`` (f-distill, issue 36): an
    object whose ``weights(logits, t)`` gives each sample's DM weight from the discriminator's logits at the DM's own
    noised sample (no gradient reaches the head or the fake score); None: DMD's reverse KL, every weight 1.
    Returns ``(loss, stats, x, cond)``; ``x`` (detached) and ``cond`` are what the fake score trains on.
    """
    cond = model.encode_prompts(batch.prompts)
    timesteps = timesteps or [model.conditioning_timestep]
    x = backward_simulate(model, batch.z, cond, timesteps, batch.sim_steps, batch.sim_noise)
    real, fake = model.dm_denoisers()  # one UNet call for both with train.one_call_roles (issue 35)
    h, s_h = None, {}
    if divergence is not None:
        with torch.no_grad():
            x_t = model.schedule.add_noise(x.detach(), batch.noise, batch.t)
            logits = model.discriminator(gan_features)(x_t, batch.t, cond, features_grad=False)
        h, s_h = divergence.weights(logits, batch.t)
    loss_dm, stats = dmd_loss(x, real, fake, batch.t, batch.noise, model.schedule, cond, sample_weight=h)
    stats.update(s_h)
    loss = dm_weight * loss_dm
    if (callable(gan_weight) or gan_weight > 0) and batch.gan_t is not None:
        loss_gan, s_gan = gan_generator_loss(model.discriminator(gan_features), x, batch.gan_t, batch.gan_noise,
                                             model.schedule, cond)
        g_gan = input_grad(loss_gan, x, grad_scale)  # frees the discriminator's graph
        g_dm = input_grad(dm_weight * loss_dm, x, grad_scale, retain_graph=True)
        sq_gan, sq_dm = g_gan.float().pow(2).sum().item(), g_dm.float().pow(2).sum().item()  # at gan weight 1
        term = with_grad(x, loss_gan, g_gan)
        w = gan_weight(sq_gan, sq_dm, term) if callable(gan_weight) else gan_weight
        loss = loss + w * term
        stats.update(s_gan, gan_weight_generator=w, gan_grad_sq=sq_gan, dm_grad_sq=sq_dm)
        raw = grad_ratio(g_gan, g_dm)
        if math.isfinite(raw):  # dm_weight 0: no ratio (an inf would read as a non-finite step)
            stats["gan_dm_grad_ratio"] = w * raw
    if regression is not None and batch.ref_z is not None:
        x_ref = model.generate(batch.ref_z, model.encode_prompts(batch.ref_prompts))
        loss_reg, s_reg = regression(x_ref, batch.ref_y)
        loss = loss + regression_weight * loss_reg
        stats.update(s_reg)
    return loss, stats, x.detach(), cond


@torch.no_grad()
def generator_samples(model, z: torch.Tensor, prompts: list, timesteps: Optional[list[int]] = None, k: int = 0,
                      noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh detached samples ``(G(z), cond)`` for the extra fake updates of TTUR (backward-simulated to step k)."""
    cond = model.encode_prompts(prompts)
    return backward_simulate(model, z, cond, timesteps or [model.conditioning_timestep], k, noise), cond


def critic_loss(model, x: torch.Tensor, cond: torch.Tensor, batch: CriticBatch, weighting: str = "eps",
                gan_weight: float = 0.0, gan_features: str = "fake", r1_weight: float = 0.0):
    """The critic turn's loss: the fake score's denoising loss on detached generator samples, plus
    gan_weight * DMD2's discriminator loss (G's samples against the batch's real latents) when it has them, with
    r1_weight * approximate R1 inside it when the batch has ``r1_noise``. ``weighting="auto"``: the teacher's own
    loss (eps- or v-MSE, by ``model.prediction_type``). Returns ``(loss, stats)``."""
    if weighting == "auto":
        weighting = native_weighting(getattr(model, "prediction_type", "epsilon"))
    loss, stats = fake_score_loss(model.fake_denoiser(), x, batch.t, batch.noise, model.schedule, cond, weighting)
    if gan_weight > 0 and batch.real is not None:
        real_cond = model.encode_prompts(batch.real_prompts)
        loss_d, s_d = gan_discriminator_loss(model.discriminator(gan_features), x, batch.real, batch.gan_t,
                                             batch.real_t, batch.gan_noise, batch.real_noise, model.schedule, cond,
                                             real_cond, r1_weight, batch.r1_noise)
        loss = loss + gan_weight * loss_d
        stats.update(s_d)
    return loss, stats
