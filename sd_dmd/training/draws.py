"""What one training step reads: every random input of both turns, drawn in one place.

Every random number of a step is a function of the global sample it belongs to, not of the process that draws it:
sample ``g`` of the global batch draws its prompt, noise, timesteps and store rows from its own stream, keyed by
``(seed, step, attempt, what, turn, g)`` (numpy's SeedSequence: a 128-bit PCG64 state, so no two keys share a
stream). Process ``r`` of ``P``, with ``n`` samples per turn (``train.batch_size`` x accumulation), draws the samples
``r*n .. r*n + n - 1`` and nothing else. Hence (docs/RELIABILITY.md, "What scales"):

- 1 process x 1 micro-batch of B, 1 x 2 of B/2 and 2 processes x 1 of B/2 draw the same global batch;
- a resume on any process count draws what the uninterrupted run would have drawn: there is no random state to
  save, restore or re-seed;
- each process's cost is its own samples' draws (O(local batch)), however many processes there are.

``attempt`` counts the retries of a step whose generator turn was not finite on some process (every process skips
it together): a retry draws new samples. Decisions every process must share (the backward-simulation depth of a
step, of each extra fake turn) are keyed without a sample index.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from sd_dmd.core.step import CriticBatch, GeneratorBatch

# what a stream is for (the 4th entry of a key)
GEN, REG, SIM, FRESH, FRESH_K, CRITIC, REAL = range(7)


class Draws:
    """The random inputs of this process's share of a step. ``begin(step, attempt)`` before each step."""

    def __init__(self, cfg, prompts: list[str], latent_shape, num_train_timesteps: int, device, rank: int,
                 pairs=None, real=None):
        self.cfg, self.prompt_list, self.latent_shape, self.device = cfg, prompts, tuple(latent_shape), device
        self.t_all = num_train_timesteps - 1
        self.pairs, self.real, self.rank = pairs, real, rank
        self.step = self.attempt = 0

    def begin(self, step: int, attempt: int = 0) -> None:
        self.step, self.attempt = step, attempt

    # ----- streams -------------------------------------------------------------------------------
    def stream(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.train.seed, self.step, self.attempt, *key])

    def shared(self, *key: int) -> np.random.Generator:
        """A stream of the step's, not a sample's: what every process must decide alike."""
        return self.stream(*key)

    def per_sample(self, n: int, *key: int) -> list[np.random.Generator]:
        """The streams of this process's ``n`` samples (global indices ``rank*n ..``) for ``key``."""
        return [self.stream(*key, self.rank * n + i) for i in range(n)]

    def normal(self, rngs: list, *shape: int) -> torch.Tensor:
        """One standard-normal latent-shaped tensor (times ``shape``) per stream, stacked: (n, *shape, C, H, W)."""
        full = (*shape, *self.latent_shape)
        return torch.from_numpy(np.stack([r.standard_normal(full, dtype=np.float32) for r in rngs])).to(self.device)

    def integers(self, rngs: list, lo: int, hi: int) -> torch.Tensor:
        """One integer in [lo, hi] (inclusive) per stream."""
        return torch.tensor([int(r.integers(lo, hi + 1)) for r in rngs], dtype=torch.long)

    def timesteps(self, rngs: list, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Uniform integer timesteps in [lo, hi] (DMD: [0.02T, 0.98T]), one per stream."""
        return self.integers(rngs, lo, self.t_all if hi is None else hi).to(self.device)

    def prompts(self, rngs: list) -> list[str]:
        return [self.prompt_list[i] for i in self.integers(rngs, 0, len(self.prompt_list) - 1).tolist()]

    # ----- backward simulation -------------------------------------------------------------------
    def sim_steps(self) -> int:
        """How many of G's timesteps the generator turn's backward simulation runs before the trained call: uniform
        over 0..len-1, and the same on every process (a stream of the step's)."""
        n = len(self.cfg.dmd.generator_timesteps)
        return int(self.shared(SIM).integers(n)) if n > 1 else 0

    # ----- the two turns' batches ----------------------------------------------------------------
    def generator_batch(self, gan: bool) -> GeneratorBatch:
        """One generator turn's inputs for all of this process's micro-batches at once (micro-batch i is the i-th
        slice), so that accumulating K micro-batches of B equals one step on the batch of K * B."""
        cfg = self.cfg
        n = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        k = self.sim_steps()
        s = self.per_sample(n, GEN)
        batch = GeneratorBatch(self.prompts(s), self.normal(s), self.timesteps(s, cfg.dmd.t_min, cfg.dmd.t_max),
                               self.normal(s), sim_steps=k, sim_noise=self.normal(s, k) if k else None)
        if gan:
            batch.gan_t, batch.gan_noise = self.timesteps(s), self.normal(s)
        if self.pairs is not None:
            rows = self.integers(self.per_sample(cfg.regression.batch_size * cfg.train.gradient_accumulation_steps,
                                                 REG), 0, len(self.pairs) - 1).tolist()
            z_ref, y_ref, batch.ref_prompts = self.pairs.batch(rows, verify=cfg.regression.verify_noise)
            batch.ref_z, batch.ref_y = z_ref.to(self.device), y_ref.to(self.device)
        return batch

    def fresh_samples(self, n: int, turn: int = 1) -> tuple[list[str], torch.Tensor, int, Optional[torch.Tensor]]:
        """(prompts, z, k, re-noising noise) for fake turn ``turn`` >= 1 of TTUR (its own depth k, shared by all
        processes)."""
        n_ts = len(self.cfg.dmd.generator_timesteps)
        k = int(self.shared(FRESH_K, turn).integers(n_ts)) if n_ts > 1 else 0
        s = self.per_sample(n, FRESH, turn)
        return self.prompts(s), self.normal(s), k, self.normal(s, k) if k else None

    def critic_batch(self, n: int, gan: bool, turn: int = 0) -> CriticBatch:
        """Fake turn ``turn``'s timesteps and noise; with the GAN on, a batch of real latents and both sides'
        diffusion-GAN timesteps and noise."""
        s = self.per_sample(n, CRITIC, turn)
        batch = CriticBatch(self.timesteps(s), self.normal(s))
        if gan:
            cfg = self.cfg
            rs = self.per_sample((cfg.gan.batch_size or cfg.train.batch_size) * cfg.train.gradient_accumulation_steps,
                                 REAL, turn)
            rows = self.integers(rs, 0, len(self.real) - 1).tolist()
            real, batch.real_prompts = self.real.batch(rows)
            batch.real, batch.real_t, batch.real_noise = real.to(self.device), self.timesteps(rs), self.normal(rs)
            batch.gan_t, batch.gan_noise = self.timesteps(s), self.normal(s)
            if cfg.gan.r1_weight > 0:  # drawn last: runs without R1 keep their draws
                batch.r1_noise = cfg.gan.r1_alpha * self.normal(rs)
        return batch
