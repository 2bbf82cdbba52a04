"""The GAN terms' weights: fixed (``gan.generator_weight`` / ``gan.discriminator_weight``, DMD2's numbers), or adaptive.

Adaptive (``gan.weight_mode: adaptive``), in the spirit of VQGAN's adaptive discriminator weight
(taming-transformers' ``calculate_adaptive_weight``: ||grad nll|| / ||grad g_loss|| at the last layer): each generator
update measures r = ||d loss_gan/dx|| / ||dm_weight d loss_dm/dx|| on G's samples x of the **global batch** (the GAN
term at weight 1; the squared norms summed over micro-batches and processes, so 1 process x 2 micro-batches and 2
processes x 1 measure the same r), smooths it (EMA, ``gan.ratio_ema_decay``, started at the first measurement) and
sets the generator's GAN weight to ``target_ratio / EMA(r)`` (at most ``gan.max_weight``), so that the logged
``gan_dm_grad_ratio`` sits at ``gan.target_ratio``. The current measurement counts: with one micro-batch the weight
is set before the term enters the loss; with several (:class:`Deferred`), each micro-batch's GAN term is
backpropagated aside at weight 1 and added, times the weight, once the whole batch is measured.
The discriminator weight stays ``gan.discriminator_weight`` (as VQGAN adapts only the generator's term): the ratio
measured is the generator's balance, while the discriminator weight sets another one, the fake LoRA's between its
score loss and the discriminator loss. ``gan.adaptive_discriminator: true`` scales it with the generator's weight
instead, at DMD2's proportion ``discriminator_weight / generator_weight`` (10x). Before the first measurement both
are the configured ones.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def ratio(sq_num: float, sq_den: float) -> float:
    """sqrt(sq_num / sq_den); 0 when both are 0, inf when only the denominator is."""
    return math.sqrt(sq_num / sq_den) if sq_den > 0 else (0.0 if sq_num == 0 else float("inf"))


class GANWeight:
    def __init__(self, gan_cfg, reduce: Optional[Callable[[list], list]] = None):
        self.cfg = gan_cfg
        self.reduce = reduce  # mean over processes of a list of floats (every process then sets the same weight)
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

    def global_sums(self, sq_gan: float, sq_dm: float) -> tuple[float, float]:
        """This process's squared norms -> the global batch's (means over processes: the ratio is the same)."""
        return tuple(self.reduce([sq_gan, sq_dm])) if self.reduce is not None else (sq_gan, sq_dm)

    def update(self, sq_gan: float, sq_dm: float) -> float:
        """One measurement over the global batch (its squared norms, already reduced); returns the weight to use."""
        raw = ratio(sq_gan, sq_dm)
        if math.isfinite(raw):  # a non-finite measurement (its step is skipped) leaves the EMA as it was
            d = self.cfg.ratio_ema_decay
            self.ema = raw if self.ema is None else d * self.ema + (1 - d) * raw
        return self.generator_weight()

    def __call__(self, sq_gan: float, sq_dm: float, term=None) -> float:
        """One micro-batch that is this process's whole share of the step: reduce over processes, update, weight."""
        return self.update(*self.global_sums(sq_gan, sq_dm))

    def for_generator(self):
        """What :func:`sd_dmd.core.step.generator_loss` takes as ``gan_weight``: this (adaptive) or the number."""
        return self if self.adaptive else self.cfg.generator_weight

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.ema = (state or {}).get("ema")


class Deferred:
    """The adaptive weight over several micro-batches: each one's GAN term is backpropagated to ``params`` at weight
    1 into a buffer of its own (and 0 into the loss); :meth:`finish` measures the whole batch, updates the weight once
    and adds weight x buffer to the gradients. Exact: the loss is linear in the term. Cost: one more backward of
    G's last call per micro-batch (adaptive mode with accumulation only)."""

    def __init__(self, weight: GANWeight, params: list, n_micro: int, loss_scale: float = 1.0):
        self.weight, self.params, self.factor = weight, params, loss_scale / n_micro
        self.sq = [0.0, 0.0]
        self.side = [torch.zeros_like(p) for p in params]
        self.n = n_micro

    def __call__(self, sq_gan: float, sq_dm: float, term) -> float:
        self.sq[0] += sq_gan / self.n
        self.sq[1] += sq_dm / self.n
        grads = torch.autograd.grad(term * self.factor, self.params, retain_graph=True, allow_unused=True)
        for buf, g in zip(self.side, grads):
            if g is not None:
                buf.add_(g)
        return 0.0

    def finish(self) -> float:
        """The weight, from the whole batch; the GAN term's gradient joins the accumulated ones at it."""
        w = self.weight.update(*self.weight.global_sums(*self.sq))
        for p, buf in zip(self.params, self.side):
            p.grad = buf * w if p.grad is None else p.grad.add_(buf, alpha=w)
        return w
