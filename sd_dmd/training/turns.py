"""What one training update does, on a Trainer's model, data and optimisers: the generator turn, the fake-score
turns (TTUR), and the one decision that applies (or skips) their gradients on every process."""
from __future__ import annotations

import math
from typing import Optional

import torch

from sd_dmd.core.step import critic_loss, generator_loss, generator_samples, split_batch
from sd_dmd.training.gan_weight import Deferred, ratio
from sd_dmd.training.state import follow_schedule


def add_mean(total: dict, stats: dict, n: int) -> None:
    """Accumulate one of ``n`` micro-batches' stats into their mean."""
    for k, v in stats.items():
        total[k] = total.get(k, 0.0) + v / n


def apply_gradients(acc, groups, stats: dict, max_norm: float) -> tuple[float, bool]:
    """One update decision over ``groups``, a list of (params, prepared optimizer, scheduler).

    Average the gradients and ``stats`` (in place: every process then logs the global batch's means) over processes,
    unscale, clip, and step only when every process's losses and the averaged gradient are finite: one collective
    decision, taken before any optimiser, LR or EMA update.
    Under fp16 each group's optimiser is stepped by ``scaler.step`` and the scale is updated **once**, after all of
    them: ``AcceleratedOptimizer.step`` updates the scale after each optimiser, which clears the scaler's record
    that the next optimiser's gradients were already unscaled, so they were unscaled twice (issue 25, item 1).
    Returns (unscaled gradient norm over all groups, applied)."""
    params = [p for ps, _, _ in groups for p in ps]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bad = torch.tensor([0.0 if all(math.isfinite(v) for v in stats.values()) else 1.0], device=acc.device)
    if acc.num_processes > 1:  # one flat all-reduce: gradients, the non-finite flag and the stats together
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], device=acc.device, dtype=params[0].grad.dtype)
        flat = acc.reduce(torch.cat([p.grad.flatten() for p in params] + [bad.to(values.dtype), values]),
                          reduction="mean")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        bad = flat[offset:offset + 1]
        stats.update(zip(keys, flat[offset + 1:].tolist()))  # the global batch's means, as one process would log
    scaler = acc.scaler
    if scaler is not None:  # fp16: unscale this decision's gradients before measuring or clipping them
        for _, opt, _ in groups:
            scaler.unscale_(opt.optimizer)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = float(norm)
    applied = bad.item() == 0 and math.isfinite(norm)
    if applied:
        for _, opt, sched in groups:
            if scaler is not None:
                scaler.step(opt.optimizer)  # steps the already-unscaled gradients (the record holds until update)
            else:
                opt.step()
            sched.step()
    if scaler is not None:
        scaler.update()  # once per decision; after an overflow it lowers the scale and nothing else moves
    for _, opt, _ in groups:
        opt.zero_grad(set_to_none=True)
    return norm, applied


def generator_turn(t) -> tuple[dict, bool, list]:
    """Returns (stats, applied, [(x, cond) per micro-batch]) for the fake turn to train on."""
    cfg, acc = t.cfg, t.acc
    n_acc = cfg.train.gradient_accumulation_steps
    t.draws.begin(t.step, t.attempt)
    stats: dict = {}
    samples = []
    scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0  # fp16: for the GAN gradient on x
    deferred = None
    gan_weight = 0.0
    if t.gan_on():
        gan_weight = t.gan_weight.for_generator()
        if t.gan_weight.adaptive and n_acc > 1:  # the weight is the global batch's: known after the last micro-batch
            gan_weight = deferred = Deferred(t.gan_weight, t.gen_params, n_acc, scale)
    for mb in t.draws.generator_batch(t.gan_on()).split(n_acc):
        with acc.autocast():
            loss, s, x, cond = generator_loss(t.model, mb, dm_weight=cfg.dmd.dm_weight,
                                              regression=t.reg_loss, regression_weight=cfg.regression.weight,
                                              timesteps=cfg.dmd.generator_timesteps, gan_weight=gan_weight,
                                              gan_features=cfg.gan.features, grad_scale=scale,
                                              divergence=t.divergence if t.divergence.active and t.gan_on() else None)
        acc.backward(loss / n_acc)  # the GAN term reaches only G: its gradient was taken on x alone
        add_mean(stats, s, n_acc)
        samples.append((x, cond))
    if deferred is not None:
        stats["gan_weight_generator"] = deferred.finish()
    div_stats = t.divergence.finish()  # the step's ratio statistics, over processes, for the next steps' weights
    stats.pop("gan_dm_grad_ratio", None)  # a micro-batch's: the global batch's is set below
    norm, applied = apply_gradients(t.acc, [(t.gen_params, t.opt_g, t.sched_g)], stats,
                                    t.cfg.optim.max_grad_norm)
    if "gan_grad_sq" in stats:  # the ratio over the global batch (the means' ratio: every sample counts once)
        raw = ratio(stats.pop("gan_grad_sq"), stats.pop("dm_grad_sq"))
        if math.isfinite(raw):
            stats["gan_dm_grad_ratio"] = stats["gan_weight_generator"] * raw
    if applied and t.ema is not None:
        t.ema.step(t.gen_params)
    stats.update(div_stats)  # already the global batch's: after the stats' mean over processes
    stats["grad_norm_generator"] = norm
    return stats, applied, samples


def fake_turn(t, samples: Optional[list] = None, turn: int = 0) -> tuple[dict, bool]:
    """Fake update ``turn`` of the step, on the generator turn's samples, or on fresh ones when ``samples`` is None."""
    cfg, m, acc = t.cfg, t.model, t.acc
    n_acc = cfg.train.gradient_accumulation_steps
    n = cfg.train.batch_size * n_acc
    if samples is None:
        prompts, z, k, sim_noise = t.draws.fresh_samples(n, turn)
        with acc.autocast():
            x, cond = generator_samples(m, z, prompts, cfg.dmd.generator_timesteps, k, sim_noise)
        samples = list(zip(split_batch(x, n_acc), split_batch(cond, n_acc)))
    gan = t.gan_on()
    batch = t.draws.critic_batch(n, gan, turn)
    stats: dict = {}
    for (x, cond), mb in zip(samples, batch.split(n_acc)):
        with acc.autocast():
            loss, s = critic_loss(m, x, cond, mb, cfg.dmd.fake_loss_weighting,
                                  gan_weight=t.gan_weight.discriminator_weight() if gan else 0.0,
                                  gan_features=cfg.gan.features, r1_weight=cfg.gan.r1_weight)
        acc.backward(loss / n_acc)
        add_mean(stats, s, n_acc)
    groups = [(t.fake_params, t.opt_f, t.sched_f)]
    if gan:  # the GAN head steps in the same decision as the fake score
        if t.sched_d.last_epoch != t.sched_f.last_epoch:  # switched on mid-run (gan.start_step): the head's schedule
            follow_schedule(t.opt_d, t.sched_d, t.sched_f, cfg.optim.lr_fake)  # takes the fake score's position
        groups.append((t.head_params, t.opt_d, t.sched_d))
    norm, applied = apply_gradients(t.acc, groups, stats, t.cfg.optim.max_grad_norm)
    stats["grad_norm_fake"] = norm
    return stats, applied


def train_step(t) -> tuple[dict, bool]:
    """A generator turn, then ``fake_updates_per_step`` fake turns (TTUR; the first reuses G's samples).

    Returns (stats, applied). A generator turn that is not finite on every process skips the whole step:
    nothing moves. A non-finite fake turn skips that fake update alone (counted in ``fake_updates_skipped``)."""
    stats, applied, samples = t.generator_turn()
    if not applied:
        return stats, False
    n = t.cfg.dmd.fake_updates_per_step
    stats.update(loss_fake=0.0, grad_norm_fake=0.0, fake_updates_skipped=0)
    for k in range(n):
        f, ok = t.fake_turn(samples if k == 0 else None, k)
        if ok:
            for key in ("loss_fake", "grad_norm_fake", "loss_gan_discriminator", "gan_d_real_acc", "gan_d_fake_acc",
                        "loss_gan_r1"):
                if key in f:
                    stats[key] = stats.get(key, 0.0) + f[key] / n
        else:
            stats["fake_updates_skipped"] += 1
    return stats, True
