"""Where a DMD2 + GAN step's time goes, before and after issue 27's generator GAN term (one run, modes interleaved).

    OMP_NUM_THREADS=1 python benchmarks/gan_step_time.py [--steps 8] [--config configs/digits_dmd2_gan.yaml] [...]

Modes, alternated step by step on one Trainer (so that machine load hits each alike):
  before: the GAN term backpropagated as a loss (gradients for the fake LoRA and the GAN head, then thrown away)
  after:  the library's path: the GAN term's gradient taken on G's sample x alone (no parameter gradients)
  no-GAN: the generator turn without the GAN term (what the GAN term costs on top)
Prints the median seconds of the generator turn, the fake turns and the whole step per mode, and after / before.
Extra arguments are config overrides (``--gan.generator_weight 0.064``...).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, device_line

from sd_dmd.core import step as core_step
from sd_dmd.core.losses import dmd_loss, gan_generator_loss


def loss_before(model, batch, *, dm_weight=1.0, regression=None, regression_weight=0.0, timesteps=None,
                gan_weight=0.0, gan_features="fake", grad_scale=1.0):
    """The generator loss as it was before issue 27 (the GAN term a plain loss term; no regression here)."""
    cond = model.encode_prompts(batch.prompts)
    x = core_step.backward_simulate(model, batch.z, cond, timesteps or [model.conditioning_timestep],
                                    batch.sim_steps, batch.sim_noise)
    loss_dm, stats = dmd_loss(x, model.real_denoiser(), model.fake_denoiser(), batch.t, batch.noise,
                              model.schedule, cond)
    loss = dm_weight * loss_dm
    if gan_weight and batch.gan_t is not None:
        loss_gan, s = gan_generator_loss(model.discriminator(gan_features), x, batch.gan_t, batch.gan_noise,
                                         model.schedule, cond)
        loss, _ = loss + gan_weight * loss_gan, stats.update(s)
    return loss, stats, x.detach(), cond


def timed_step(t, mode: str) -> dict:
    from sd_dmd.training import turns

    turns.generator_loss = loss_before if mode == "before" else core_step.generator_loss
    gan_on = t.gan_on
    if mode == "no-GAN":
        t.gan_on = lambda: False
    t0 = time.perf_counter()
    _, _, samples = turns.generator_turn(t)
    if mode == "before":  # what the old turn did: drop the gradients the GAN term left on the critic's parameters
        for p in t.fake_params + t.head_params:
            p.grad = None
    t.gan_on = gan_on
    t1 = time.perf_counter()
    for k in range(t.cfg.dmd.fake_updates_per_step):
        turns.fake_turn(t, samples if k == 0 else None)
    t2 = time.perf_counter()
    turns.generator_loss = core_step.generator_loss
    return {"generator turn": t1 - t0, "fake turns": t2 - t1, "step": t2 - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_dmd2_gan.yaml"))
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1)
    args, overrides = p.parse_known_args()
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import Trainer

    cfg, _ = load_config(Config, ["--config", args.config, "--logging.tracker", "none", *overrides])
    t = Trainer(cfg, Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    modes = ("before", "after", "no-GAN")
    times: dict = {m: [] for m in modes}
    for i in range(args.steps + 1):
        for m in modes:
            r = timed_step(t, m)
            if i:  # the first round warms up
                times[m].append(r)
    print(device_line(), f"batch {cfg.train.batch_size}, fake updates {cfg.dmd.fake_updates_per_step}, "
          f"{args.steps} steps per mode (median s)")
    print("| mode | generator turn | fake turns | step |\n|---|---|---|---|")
    med = {m: {k: statistics.median(r[k] for r in times[m]) for k in times[m][0]} for m in modes}
    for m in modes:
        print(f"| {m} | " + " | ".join(f"{v:.3f}" for v in med[m].values()) + " |")
    b, a, n = med["before"], med["after"], med["no-GAN"]
    print(f"after / before: generator turn {a['generator turn'] / b['generator turn']:.2f}, step "
          f"{a['step'] / b['step']:.2f}; the GAN term's own cost in the generator turn (minus no-GAN): "
          f"{b['generator turn'] - n['generator turn']:.3f} s -> {a['generator turn'] - n['generator turn']:.3f} s")


if __name__ == "__main__":
    main()
