"""The GAN terms' weights: fixed (``gan.generator_weight`` / ``gan.discriminator_weight``, DMD2's numbers), or adaptive.

Adaptive (``gan.weight_mode: adaptive``), in the spirit of VQGAN's adaptive discriminator weight
(taming-transformers' ``calculate_adaptive_weight``: ||grad nll|| / ||grad g_loss|| at the last layer): each generator
micro-batch measures r = ||d loss_gan/dx|| / ||dm_weight d loss_dm/dx|| on G's sample x (the GAN term at weight 1),
smooths it (EMA, ``gan.ratio_ema_decay``, started at the first measurement) and sets the generator's GAN weight to
``target_ratio / EMA(r)`` (at most ``gan.max_weight``), so that the logged ``gan_dm_grad_ratio`` sits at
``gan.target_ratio``. The weight is set before the term enters the loss: the current measurement counts.
The discriminator weight stays ``gan.discriminator_weight`` (as VQGAN adapts only the generator's term): the ratio
measured is the generator's balance, while the discriminator weight sets another one, the fake LoRA's between its
score loss and the discriminator loss. ``gan.adaptive_discriminator: true`` scales it with the generator's weight
instead, at DMD2's proportion ``discriminator_weight / generator_weight`` (10x). Before the first measurement both
are the configured ones.
"""
from __future__ import annotations

import math
from typing import Callable, Optional


class GANWeight:
    def __init__(self, gan_cfg, reduce: Optional[Callable[[float], float]] = None):
        self.cfg = gan_cfg
        self.reduce = reduce  # mean over processes (every process then sets the same weight)
        self.ema: Optional[float] = None  # smoothed ratio at GAN weight 1

    @property
    def adaptive(self) -> bool:
        return self.cfg.weight_mode == "adaptive"

    def generator_weight(self) -> float:
        if not self.adaptive or self.ema is None:
            return self.cfg.generator_weight
        return min(self.cfg.max_weight, self.cfg.target_ratio / self.ema) if self.ema > 0 else self.cfg.max_weight

    def discriminator_weight(self) -> float:
        c = self.cfg
        if self.adaptive and c.adaptive_discriminator:
            return c.discriminator_weight * self.generator_weight() / c.generator_weight
        return c.discriminator_weight

    def __call__(self, raw_ratio: float) -> float:
        """Update with one measured ratio (at GAN weight 1) and return the generator's GAN weight to use now."""
        if self.reduce is not None:
            raw_ratio = self.reduce(raw_ratio)
        if math.isfinite(raw_ratio):  # a non-finite measurement (its step is skipped) leaves the EMA as it was
            d = self.cfg.ratio_ema_decay
            self.ema = raw_ratio if self.ema is None else d * self.ema + (1 - d) * raw_ratio
        return self.generator_weight()

    def for_generator(self):
        """What :func:`sd_dmd.core.step.generator_loss` takes as ``gan_weight``: this (adaptive) or the number."""
        return self if self.adaptive else self.cfg.generator_weight

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.ema = (state or {}).get("ema")
