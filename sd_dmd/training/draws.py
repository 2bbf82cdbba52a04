"""What one training step reads: every random input of both turns, drawn in one place, in a fixed order.

Process r draws its prompts, noise, timesteps, regression-pair rows and real-latent rows from its own CPU
generator, seeded from (seed, r) (after a resume on another process count, from (seed, step, r):
:func:`sd_dmd.train.resume_seed`). The depth of a step's backward simulation is a function of (seed, step)
only, so every process runs the same graph. The loop (:mod:`sd_dmd.train`) asks for a batch, splits it into
micro-batches and hands each to :mod:`sd_dmd.step`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from sd_dmd.core.schedule import sample_timesteps
from sd_dmd.core.step import CriticBatch, GeneratorBatch

SIM_STREAM = 2  # SeedSequence([seed, step, SIM_STREAM]) picks the backward-simulation depth of a step


class Draws:
    """The per-process random inputs of a step (``rng`` is what a checkpoint saves per process)."""

    def __init__(self, cfg, prompts: list[str], latent_shape, num_train_timesteps: int, device, rank: int,
                 pairs=None, real=None):
        self.cfg, self.prompt_list, self.latent_shape, self.device = cfg, prompts, tuple(latent_shape), device
        self.t_all = num_train_timesteps - 1
        self.pairs, self.real = pairs, real
        self.rng = torch.Generator("cpu").manual_seed(
            int(np.random.SeedSequence([cfg.train.seed, rank]).generate_state(1)[0]))

    # ----- primitives --------------------------------------------------------------------------
    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((*shape, *self.latent_shape), generator=self.rng).to(self.device)

    def prompts(self, n: int) -> list[str]:
        idx = torch.randint(0, len(self.prompt_list), (n,), generator=self.rng)
        return [self.prompt_list[i] for i in idx.tolist()]

    def timesteps(self, n: int, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        return sample_timesteps(n, lo, self.t_all if hi is None else hi, generator=self.rng, device=self.device)

    def rows(self, store, n: int) -> list[int]:
        return torch.randint(0, len(store), (n,), generator=self.rng).tolist()

    # ----- backward simulation -------------------------------------------------------------------
    def sim_steps(self, step: int) -> int:
        """How many of G's timesteps the backward simulation runs before the trained call: uniform over
        0..len-1, and the same on every process (a function of (seed, step) only)."""
        n = len(self.cfg.dmd.generator_timesteps)
        if n == 1:
            return 0
        return int(np.random.SeedSequence([self.cfg.train.seed, step, SIM_STREAM]).generate_state(1)[0] % n)

    def sim_noise(self, n: int, k: int) -> Optional[torch.Tensor]:
        """Fresh re-noising noise for k simulated steps, (n, k, C, H, W)."""
        return self.randn(n, k) if k else None

    # ----- the two turns' batches ----------------------------------------------------------------
    def generator_batch(self, step: int, gan: bool) -> GeneratorBatch:
        """One generator turn's inputs for all micro-batches at once, so that accumulating K micro-batches of B
        equals one step on the batch of K * B."""
        cfg = self.cfg
        n = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        k = self.sim_steps(step)
        batch = GeneratorBatch(self.prompts(n), self.randn(n), self.timesteps(n, cfg.dmd.t_min, cfg.dmd.t_max),
                               self.randn(n), sim_steps=k, sim_noise=self.sim_noise(n, k))
        if gan:
            batch.gan_t, batch.gan_noise = self.timesteps(n), self.randn(n)
        if self.pairs is not None:
            rows = self.rows(self.pairs, cfg.regression.batch_size * cfg.train.gradient_accumulation_steps)
            z_ref, y_ref, batch.ref_prompts = self.pairs.batch(rows, verify=cfg.regression.verify_noise)
            batch.ref_z, batch.ref_y = z_ref.to(self.device), y_ref.to(self.device)
        return batch

    def fresh_samples(self, n: int) -> tuple[list[str], torch.Tensor, int, Optional[torch.Tensor]]:
        """(prompts, z, k, re-noising noise) for the extra fake updates of TTUR (k drawn per update)."""
        prompts, z = self.prompts(n), self.randn(n)
        n_ts = len(self.cfg.dmd.generator_timesteps)
        k = int(torch.randint(0, n_ts, (1,), generator=self.rng)) if n_ts > 1 else 0
        return prompts, z, k, self.sim_noise(n, k)

    def critic_batch(self, n: int, gan: bool) -> CriticBatch:
        """A fake turn's timesteps and noise; with the GAN on, a batch of real latents and both sides'
        diffusion-GAN timesteps and noise."""
        batch = CriticBatch(self.timesteps(n), self.randn(n))
        if gan:
            cfg = self.cfg
            r = (cfg.gan.batch_size or cfg.train.batch_size) * cfg.train.gradient_accumulation_steps
            real, batch.real_prompts = self.real.batch(self.rows(self.real, r))
            batch.real, batch.real_t, batch.real_noise = real.to(self.device), self.timesteps(r), self.randn(r)
            batch.gan_t, batch.gan_noise = self.timesteps(n), self.randn(n)
            if cfg.gan.r1_weight > 0:  # drawn only then: runs without R1 keep their random streams
                batch.r1_noise = cfg.gan.r1_alpha * self.randn(r)
        return batch
