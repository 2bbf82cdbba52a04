"""DMD training of the generator and fake-score LoRAs on one shared UNet (DESIGN.md, paper Alg. 1).

Each step: a generator turn (distribution matching + lambda_reg * regression) and then
``fake_updates_per_step`` fake-score turns on detached generator samples.

Multi-process: the UNet is not wrapped in DDP. Only the adapter being stepped has gradients, and they
are averaged across processes by hand (one flat all-reduce) before clipping, which is exactly DDP's
mean-reduction without DDP's trouble with two alternating adapters on one module.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from sd_dmd.config import ConfigError, save_config
from sd_dmd.core.losses import make_regression_loss
from sd_dmd.core.step import critic_loss, generator_loss, generator_samples, split_batch
from sd_dmd.data.pairs import PairsStore
from sd_dmd.models.teacher import teacher_identity
from sd_dmd.data.prompts import PromptFilter, read_prompts
from sd_dmd.errors import TrainingError
from sd_dmd.models.lora import KOHYA_FILE, export_kohya, load_adapter, save_lora
from sd_dmd.models.shared_unet import DTYPES, FAKE, GENERATOR, DMDModel, LoraSpec
from sd_dmd.outputs.model_card import write_model_card
from sd_dmd.training import state as ckpt
from sd_dmd.training.config import Config, resolve_precision, resume_conflicts
from sd_dmd.training.draws import Draws
from sd_dmd.training.preflight import check_paths


def _make_optimizer(params, lr: float, o) -> torch.optim.Optimizer:
    kw = dict(lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _decoder(cfg: Config, model: DMDModel, device):
    r = cfg.regression
    if r.decoder == "none":
        return None
    if r.decoder == "vae":
        return model.decode
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(r.tiny_vae, dtype=model.weight_dtype).to(device).requires_grad_(False)
    taesd.eval()
    if cfg.train.gradient_checkpointing:
        taesd.enable_gradient_checkpointing()
    # AutoencoderTiny works on SD's scaled latents (its scaling_factor is 1) and returns [-1, 1] images
    return lambda z: taesd.decode(z.to(taesd.dtype)).sample.float()


def resume_seed(seed: int, step: int, rank: int) -> int:
    """Seed of process ``rank``'s streams after a resume at ``step`` on another process count: a function of
    (seed, step, rank) only, so every rank of every re-launch derives the same, distinct streams."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _add_mean(total: dict, stats: dict, n: int) -> None:
    """Accumulate one of ``n`` micro-batches' stats into their mean."""
    for k, v in stats.items():
        total[k] = total.get(k, 0.0) + v / n


def check_precision(cfg: Config, accelerator) -> None:
    """The autocast the accelerator runs is the one the config asks for, and the weights are safe under it."""
    resolve_precision(cfg, accelerator.mixed_precision)
    if cfg.train.mixed_precision != accelerator.mixed_precision:
        raise ConfigError(f"train.mixed_precision: the config says {cfg.train.mixed_precision!r} but the accelerator "
                          f"runs {accelerator.mixed_precision!r}")
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ConfigError(f"train.mixed_precision: fp16 needs a GPU; on {accelerator.device.type} accelerate silently "
                          "runs fp32 with no loss scaling (use bf16 or no)")


def check_pairs_guidance(cfg: Config, store: PairsStore) -> None:
    """Regression targets made with another teacher guidance pull G toward another distribution than the real
    score's (DESIGN.md: the pairs use the real score's guidance)."""
    made = float(store.manifest["guidance_scale"])
    if made != cfg.dmd.real_guidance_scale and not cfg.regression.allow_guidance_mismatch:
        raise ConfigError(f"regression.pairs_dir: {store.path} holds pairs made with teacher guidance {made:g}, but "
                          f"dmd.real_guidance_scale is {cfg.dmd.real_guidance_scale:g}; regenerate the pairs with "
                          f"--guidance_scale {cfg.dmd.real_guidance_scale:g}, or set "
                          "regression.allow_guidance_mismatch: true")


def apply_gradients(acc, groups, stats: dict, max_norm: float) -> tuple[float, bool]:
    """One update decision over ``groups``, a list of (params, prepared optimizer, scheduler).

    Average the gradients over processes, unscale, clip, and step only when every process's losses and the
    averaged gradient are finite: one collective decision, taken before any optimiser, LR or EMA update.
    Under fp16 each group's optimiser is stepped by ``scaler.step`` and the scale is updated **once**, after all of
    them: ``AcceleratedOptimizer.step`` updates the scale after each optimiser, which clears the scaler's record
    that the next optimiser's gradients were already unscaled, so they were unscaled twice (issue 25, item 1).
    Returns (unscaled gradient norm over all groups, applied)."""
    params = [p for ps, _, _ in groups for p in ps]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bad = torch.tensor([0.0 if all(math.isfinite(v) for v in stats.values()) else 1.0], device=acc.device)
    if acc.num_processes > 1:  # one flat all-reduce: gradients and the non-finite flag together
        flat = acc.reduce(torch.cat([p.grad.flatten() for p in params] + [bad]), reduction="mean")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        bad = flat[-1:]
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


class Trainer:
    def __init__(self, cfg: Config, accelerator, log=print):
        self.cfg, self.acc, self.log = cfg, accelerator, log
        self.out = Path(cfg.output_dir)
        dev = accelerator.device
        check_precision(cfg, accelerator)
        self.model = DMDModel.from_pretrained(
            cfg.model.pretrained_model_name_or_path, revision=cfg.model.revision, variant=cfg.model.variant,
            weight_dtype=DTYPES[cfg.model.weight_dtype], device=dev,
            generator_lora=LoraSpec(cfg.lora.generator.rank, cfg.lora.generator.alpha, tuple(cfg.lora.generator.targets)),
            fake_lora=LoraSpec(cfg.lora.fake.rank, cfg.lora.fake.alpha, tuple(cfg.lora.fake.targets)),
            conditioning_timestep=cfg.dmd.conditioning_timestep, real_guidance_scale=cfg.dmd.real_guidance_scale,
            gradient_checkpointing=cfg.train.gradient_checkpointing)
        m = self.model
        vae_factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
        if cfg.model.resolution % vae_factor:
            raise ConfigError(f"model.resolution: {cfg.model.resolution} is not a multiple of the VAE factor {vae_factor}")
        side = cfg.model.resolution // vae_factor
        self.latent_shape = (m.unet.config.in_channels, side, side)
        d = cfg.data
        self.prompts, pstats = read_prompts(d.prompts, d.caption_column,
                                            PromptFilter(d.min_aesthetic, d.max_punsafe, d.max_pwatermark, d.dedupe))
        log(pstats.summary())
        self.store = self.reg_loss = None
        if cfg.regression.loss != "none":
            self.store = PairsStore(cfg.regression.pairs_dir)
            self.store.check_compatible(teacher_identity(m.unet), cfg.model.resolution)
            check_pairs_guidance(cfg, self.store)
            kw = {}
            if cfg.regression.loss == "lpips":
                kw = dict(net=cfg.regression.lpips_net, pretrained_backbone=cfg.regression.lpips_pretrained_backbone)
            self.reg_loss = make_regression_loss(cfg.regression.loss, _decoder(cfg, m, dev), **kw).to(dev)
        m.generator_timesteps = list(cfg.dmd.generator_timesteps)
        self.real_store = None
        if cfg.gan.real_latents:  # DMD2's GAN: real latents, and a head on the fake score's bottleneck
            from sd_dmd.data.latents import LatentStore
            from sd_dmd.models.vae import vae_identity

            self.real_store = LatentStore(cfg.gan.real_latents)
            self.real_store.check_compatible(vae_identity(m.vae), cfg.model.resolution)
            m.add_gan_head(cfg.model.resolution)
        for store in (self.store, self.real_store):  # reads check row digests; an old store has none
            if store is not None and store.verification_note():
                log(store.verification_note())
        o = cfg.optim
        self.gen_params = m.adapter_parameters(GENERATOR)
        self.fake_params = m.adapter_parameters(FAKE)
        self.head_params = list(m.gan_head.parameters()) if self.real_store is not None else []
        opt_g = _make_optimizer(self.gen_params, o.lr_generator, o)
        opt_f = _make_optimizer(self.fake_params, o.lr_fake, o)
        self.opt_g, self.opt_f = accelerator.prepare(opt_g, opt_f)  # (GradScaler handling under fp16)
        from diffusers.optimization import get_scheduler

        self.sched_g = get_scheduler(o.lr_scheduler, opt_g, num_warmup_steps=o.warmup_steps,
                                     num_training_steps=cfg.train.max_steps)
        fake_steps = cfg.train.max_steps * cfg.dmd.fake_updates_per_step
        self.sched_f = get_scheduler(o.lr_scheduler, opt_f, num_warmup_steps=o.warmup_steps,
                                     num_training_steps=fake_steps)
        self.opt_d = self.sched_d = None
        if self.head_params:  # its own optimiser (same settings as the fake score's), stepped in the fake turn,
            # so that switching the GAN on when resuming a run without it leaves the saved optimisers as they were
            opt_d = _make_optimizer(self.head_params, o.lr_fake, o)
            self.opt_d = accelerator.prepare(opt_d)
            self.sched_d = get_scheduler(o.lr_scheduler, opt_d, num_warmup_steps=o.warmup_steps,
                                         num_training_steps=fake_steps)
        self.ema = None
        if cfg.train.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.gen_params, decay=cfg.train.ema_decay)
        self.draws = Draws(cfg, self.prompts, self.latent_shape, m.schedule.num_train_timesteps, dev,
                           accelerator.process_index, self.store, self.real_store)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self.saved_step = None  # step of the last checkpoint written
        self.stop_signal = None  # set by the SIGTERM/SIGINT handler

    def _samples_per_step_per_process(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps

    # ----- what a step reads ---------------------------------------------------------------------------
    @property
    def rng(self) -> torch.Generator:
        return self.draws.rng

    def gan_on(self) -> bool:
        return self.real_store is not None and self.step >= self.cfg.gan.start_step

    # ----- gradient plumbing ----------------------------------------------------------------------
    def _any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.item() > 0

    # ----- the two turns ----------------------------------------------------------------------------
    def generator_turn(self) -> tuple[dict, bool, list]:
        """Returns (stats, applied, [(x, cond) per micro-batch]) for the fake turn to train on."""
        cfg, acc = self.cfg, self.acc
        n_acc = cfg.train.gradient_accumulation_steps
        stats: dict = {}
        samples = []
        for mb in self.draws.generator_batch(self.step, self.gan_on()).split(n_acc):
            with acc.autocast():
                loss, s, x, cond = generator_loss(self.model, mb, dm_weight=cfg.dmd.dm_weight,
                                                  regression=self.reg_loss, regression_weight=cfg.regression.weight,
                                                  timesteps=cfg.dmd.generator_timesteps,
                                                  gan_weight=cfg.gan.generator_weight if self.gan_on() else 0.0)
            acc.backward(loss / n_acc)
            _add_mean(stats, s, n_acc)
            samples.append((x, cond))
        for p in self.fake_params + self.head_params:  # the GAN term's backward passed through them: not theirs
            p.grad = None
        norm, applied = apply_gradients(self.acc, [(self.gen_params, self.opt_g, self.sched_g)], stats,
                                        self.cfg.optim.max_grad_norm)
        if applied and self.ema is not None:
            self.ema.step(self.gen_params)
        stats["grad_norm_generator"] = norm
        return stats, applied, samples

    def fake_turn(self, samples: Optional[list] = None) -> tuple[dict, bool]:
        """One fake-score update on the generator turn's samples, or on fresh ones when ``samples`` is None."""
        cfg, m, acc = self.cfg, self.model, self.acc
        n_acc = cfg.train.gradient_accumulation_steps
        n = cfg.train.batch_size * n_acc
        if samples is None:
            prompts, z, k, sim_noise = self.draws.fresh_samples(n)
            with acc.autocast():
                x, cond = generator_samples(m, z, prompts, cfg.dmd.generator_timesteps, k, sim_noise)
            samples = list(zip(split_batch(x, n_acc), split_batch(cond, n_acc)))
        gan = self.gan_on()
        batch = self.draws.critic_batch(n, gan)
        stats: dict = {}
        for (x, cond), mb in zip(samples, batch.split(n_acc)):
            with acc.autocast():
                loss, s = critic_loss(m, x, cond, mb, cfg.dmd.fake_loss_weighting,
                                      gan_weight=cfg.gan.discriminator_weight if gan else 0.0)
            acc.backward(loss / n_acc)
            _add_mean(stats, s, n_acc)
        groups = [(self.fake_params, self.opt_f, self.sched_f)]
        if gan:  # the GAN head steps in the same decision as the fake score
            groups.append((self.head_params, self.opt_d, self.sched_d))
        norm, applied = apply_gradients(self.acc, groups, stats, self.cfg.optim.max_grad_norm)
        stats["grad_norm_fake"] = norm
        return stats, applied

    def train_step(self) -> tuple[dict, bool]:
        """A generator turn, then ``fake_updates_per_step`` fake turns (TTUR; the first reuses G's samples).

        Returns (stats, applied). A generator turn that is not finite on every process skips the whole step:
        nothing moves. A non-finite fake turn skips that fake update alone (counted in ``fake_updates_skipped``)."""
        stats, applied, samples = self.generator_turn()
        if not applied:
            return stats, False
        n = self.cfg.dmd.fake_updates_per_step
        stats.update(loss_fake=0.0, grad_norm_fake=0.0, fake_updates_skipped=0)
        for k in range(n):
            f, ok = self.fake_turn(samples if k == 0 else None)
            if ok:
                for key in ("loss_fake", "grad_norm_fake", "loss_gan_discriminator", "gan_d_real_acc", "gan_d_fake_acc"):
                    if key in f:
                        stats[key] = stats.get(key, 0.0) + f[key] / n
            else:
                stats["fake_updates_skipped"] += 1
        return stats, True

    # ----- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc = self.acc
        final = self.out / f"checkpoint-{self.step}"
        tmp = self.out / f"checkpoint-{self.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.save_rng(self.rng, tmp / f"rng-{acc.process_index}.safetensors")
        if acc.is_main_process:
            save_config(self.cfg, tmp / "config.yaml")  # what a resume must stay compatible with
            save_lora(self.model, tmp / "generator", GENERATOR)
            save_lora(self.model, tmp / "fake", FAKE)
            ckpt.save_optimizer(self.opt_g.optimizer, tmp / "optimizer_generator")
            ckpt.save_optimizer(self.opt_f.optimizer, tmp / "optimizer_fake")
            if self.head_params:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in self.model.gan_head.state_dict().items()},
                          str(tmp / "gan_head.safetensors"))
                ckpt.save_optimizer(self.opt_d.optimizer, tmp / "optimizer_discriminator")
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file({f"{i}": p.contiguous() for i, p in enumerate(self.ema.shadow_params)},
                          str(tmp / "ema_generator.safetensors"))
                self.ema.store(self.gen_params)  # the EMA weights as a LoRA diffusers loads (what final/ gets)
                self.ema.copy_to(self.gen_params)
                save_lora(self.model, tmp / "generator_ema", GENERATOR)
                self.ema.restore(self.gen_params)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "num_processes": acc.num_processes,
                     "nonfinite_total": self.nonfinite_total,
                     "sched_generator": self.sched_g.state_dict(), "sched_fake": self.sched_f.state_dict(),
                     "sched_discriminator": self.sched_d.state_dict() if self.sched_d is not None else None,
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None,
                     "history": self.history}
            ckpt.atomic_json(tmp / ckpt.STATE_FILE, json.loads(json.dumps(state, default=float)))
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            ckpt.rotate(self.out, self.cfg.checkpointing.keep_last)
            self.log(f"saved {final}")
        acc.wait_for_everyone()
        self.saved_step = self.step
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        load_adapter(self.model, GENERATOR, path / "generator")
        load_adapter(self.model, FAKE, path / "fake")
        ckpt.load_optimizer(self.opt_g.optimizer, path / "optimizer_generator")
        ckpt.load_optimizer(self.opt_f.optimizer, path / "optimizer_fake")
        self.sched_g.load_state_dict(state["sched_generator"])
        self.sched_f.load_state_dict(state["sched_fake"])
        if self.head_params and (path / "gan_head.safetensors").exists():
            from safetensors.torch import load_file

            self.model.gan_head.load_state_dict(load_file(str(path / "gan_head.safetensors")))
            ckpt.load_optimizer(self.opt_d.optimizer, path / "optimizer_discriminator")
            self.sched_d.load_state_dict(state["sched_discriminator"])
            self._set_base_lr(self.opt_d, self.sched_d, self.cfg.optim.lr_fake)
        notes = []
        if self.head_params and not (path / "gan_head.safetensors").exists():
            # DMD2's second stage: the GAN switched on when resuming a run made without it. The fresh head's
            # schedule (built at step 0) takes the fake score's position, so that their learning rates stay equal
            self.sched_d.last_epoch = state["sched_fake"]["last_epoch"]
            self._set_base_lr(self.opt_d, self.sched_d, self.cfg.optim.lr_fake)
            notes.append(f"GAN on from step {max(state['step'], self.cfg.gan.start_step)}: the discriminator head "
                         "starts fresh")
        lr_changes = [f"{name} {old:g} -> {new:g}" for name, old, new in (
            ("optim.lr_generator", *self._set_base_lr(self.opt_g, self.sched_g, self.cfg.optim.lr_generator)),
            ("optim.lr_fake", *self._set_base_lr(self.opt_f, self.sched_f, self.cfg.optim.lr_fake))) if old != new]
        if state.get("scaler") and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / "ema_generator.safetensors").exists():
            from safetensors.torch import load_file

            saved = load_file(str(path / "ema_generator.safetensors"))
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(saved[str(i)])
            self.ema.optimization_step = state["ema_optimization_step"]
        elif self.ema is not None:  # EMA switched on at resume: it was built from the untrained (B = 0) adapter
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.gen_params, decay=self.cfg.train.ema_decay)
            notes.append(f"EMA on from step {state['step']}: it starts from the resumed generator (the checkpoint "
                         "has none)")
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        self.history = state["history"]
        if lr_changes:  # DMD2's second stage: the same run, resumed at a lower learning rate
            notes.append(f"resumed at step {self.step} with {', '.join(lr_changes)} (the schedule continues from there)")
        for note in notes:
            self.history.append({"step": self.step, "note": note})
            self.log(note)
        saved_n, n = state["num_processes"], self.acc.num_processes
        if saved_n == n:  # the same streams continue: bit-exact with a run that was never stopped
            ckpt.load_rng(self.rng, path / f"rng-{self.acc.process_index}.safetensors")
            self.log(f"resumed from {path} at step {self.step}")
        else:  # a preempted cluster came back with another GPU count: fresh streams, derived, never reused
            seed = resume_seed(self.cfg.train.seed, self.step, self.acc.process_index)
            self.rng.manual_seed(seed)
            torch.manual_seed(seed)
            note = (f"resumed at step {self.step} on {n} process(es), saved with {saved_n}: per-process RNG streams "
                    f"re-seeded from (seed {self.cfg.train.seed}, step {self.step}, rank); global batch "
                    f"{saved_n * self._samples_per_step_per_process()} -> {n * self._samples_per_step_per_process()}")
            self.history.append({"step": self.step, "note": note})
            self.log(f"resumed from {path}; {note}")

    @staticmethod
    def _set_base_lr(optimizer, scheduler, lr: float) -> tuple[float, float]:
        """Make the configured ``lr`` the schedule's base after a resume; returns (saved base, new base).

        The optimiser's and the scheduler's state dicts both carry the saved run's lr (``initial_lr``,
        ``base_lrs``), so without this a resume at another learning rate silently kept the old one. The
        schedule's shape (warm-up, decay) is the new config's, evaluated at the step reached."""
        saved = float(scheduler.base_lrs[0])
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return saved, lr

    # ----- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_grid(self, tag: str) -> Optional[Path]:
        if not self.acc.is_main_process:
            return None
        from PIL import Image

        from sd_dmd.outputs.sample import image_grid

        lg = self.cfg.logging
        m = self.model
        images = []
        for seed in lg.validation_seeds:
            cond = m.encode_prompts(lg.validation_prompts)
            z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed * 1000 + i))
                             for i in range(len(lg.validation_prompts))]).to(self.acc.device)
            with self.acc.autocast():  # the few-step sampler's re-noising draws from a generator seeded per row
                x = m.sample(z, cond, self.cfg.dmd.generator_timesteps,
                             torch.Generator(self.acc.device).manual_seed(seed))
                img = m.decode(x)
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(a) for a in arr]
        path = self.out / "validation" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, cols=len(lg.validation_prompts))
        grid.save(path)
        if lg.tracker == "tensorboard":
            tb = self.acc.get_tracker("tensorboard", unwrap=True)
            tb.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        return path

    # ----- final export -----------------------------------------------------------------------------
    def export_final(self) -> Path:
        final = self.out / "final"
        if not self.acc.is_main_process:
            return final
        if self.ema is not None:
            self.ema.store(self.gen_params)
            self.ema.copy_to(self.gen_params)
        save_lora(self.model, final, GENERATOR)
        export_kohya(self.model, final / KOHYA_FILE, GENERATOR)
        grid = self.validation_grid("final")
        if self.ema is not None:
            self.ema.restore(self.gen_params)
        if grid is not None:  # inside final/, so the folder can be copied or uploaded as it is
            shutil.copyfile(grid, final / "samples.png")
        write_model_card(self.cfg, final, self.history, grid is not None)
        return final

    # ----- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, acc = self.cfg, self.acc
        from tqdm.auto import tqdm

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="dmd",
                   dynamic_ncols=True)
        t_last, samples = time.time(), 0
        while self.step < cfg.train.max_steps:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            stats, applied = self.train_step()
            self._count_nonfinite(stats, applied)
            if applied:
                self.step += 1
                samples += cfg.train.batch_size * cfg.train.gradient_accumulation_steps * acc.num_processes
                bar.update(1)
                if self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps:
                    dt = time.time() - t_last
                    stats.update(samples_per_s=samples / max(dt, 1e-9), lr_generator=self.sched_g.get_last_lr()[0],
                                 nonfinite_total=self.nonfinite_total)
                    if torch.cuda.is_available():
                        stats["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    t_last, samples = time.time(), 0
                    self._log_stats(stats, bar)
                if cfg.logging.validation_every and self.step % cfg.logging.validation_every == 0:
                    self.validation_grid(f"step-{self.step:06d}")
                if cfg.checkpointing.every and self.step % cfg.checkpointing.every == 0:
                    self.save_checkpoint()
            if self._any_process(self.stop_signal is not None):  # every process stops at the same step
                self._stop(bar)
        bar.close()
        acc.wait_for_everyone()
        return self.export_final()

    def _count_nonfinite(self, stats: dict, applied: bool) -> None:
        skipped_fake = stats.get("fake_updates_skipped", 0)
        if applied and not skipped_fake:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        what = (f"step {self.step + 1}: non-finite loss or gradient on some process; step skipped, nothing updated"
                if not applied else f"step {self.step}: {skipped_fake} non-finite fake-score update(s) skipped")
        if self.acc.scaler is not None:
            what += f" (fp16 loss scale now {self.acc.scaler.get_scale():g})"
        self.log(f"{what} ({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)")
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            last = ckpt.list_checkpoints(self.out)
            raise TrainingError(f"{self.nonfinite_in_a_row} consecutive non-finite steps; stopping. Last good "
                                f"checkpoint: {last[-1][1] if last else 'none'}")

    def _log_stats(self, stats: dict, bar) -> None:
        self.history.append({"step": self.step, **{k: round(float(v), 6) for k, v in stats.items()}})
        self.acc.log(stats, step=self.step)
        if self.acc.is_main_process:
            bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss_dm", "loss_reg", "loss_fake") if k in stats})
            self.log(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def _stop(self, bar) -> None:
        """SIGTERM/SIGINT reached some process: all of them write one checkpoint and exit (143 / 130)."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a stop signal on another process"
        self.log(f"{name} received: writing a checkpoint and stopping")
        if self.saved_step != self.step:  # decided from state every process shares: no process waits alone
            self.save_checkpoint()
        bar.close()
        raise SystemExit(130 if self.stop_signal == signal.SIGINT else 143)

    def _on_stop_signal(self, signum, frame):
        self.stop_signal = signum


# What a run directory holds; --overwrite deletes these and refuses a directory holding anything else.
RUN_ARTEFACTS = ("config.yaml", "final", "logs", "validation")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse another run's directory unless resuming or overwriting (writes nothing)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if not out.exists() or not any(out.iterdir()) or resume:
        return
    if not overwrite:
        raise ConfigError(f"output_dir: {out} already holds a run; pass --resume to continue it or "
                          "--overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in RUN_ARTEFACTS and not ckpt.CKPT_RE.match(p.name.removesuffix(".tmp")))
    if foreign:
        raise ConfigError(f"output_dir: {out} holds {', '.join(foreign[:5])}, which no run writes; --overwrite "
                          "only replaces a run directory (move those away or choose another output_dir)")


def clear_output_dir(out: Path) -> None:
    """--overwrite: nothing of the old run stays (checkpoints, final/, TensorBoard events, validation images)."""
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_resume_config(cfg: Config, checkpoint: Path) -> None:
    """A resume may not change what the saved adapters are (train_config.FIXED_ON_RESUME): one error naming
    every changed key, raised before anything is written."""
    saved_path = checkpoint / "config.yaml"
    if not saved_path.is_file():
        saved_path = checkpoint.parent / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    changed = resume_conflicts(saved, asdict(cfg))
    if changed:
        raise ConfigError(f"--resume from {checkpoint} with settings that differ from the saved run: "
                          f"{'; '.join(changed)} (start a new output_dir, or drop these overrides)")


def check_start(cfg: Config, resume: bool = False, overwrite: bool = False) -> Optional[Path]:
    """Every check that needs no model (``--dry-run`` runs these): output directory, paths, precision, tracker,
    resume compatibility. Settles ``cfg``'s auto values; returns the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    if resume and cfg.checkpointing.resume_from is None:
        cfg.checkpointing.resume_from = "latest"
    check_output_dir(out, cfg.checkpointing.resume_from is not None, overwrite)
    check_paths(cfg)
    resolve_precision(cfg)
    check_tracker(cfg.logging.tracker)
    path = ckpt.resolve_resume(out, cfg.checkpointing.resume_from)
    if path is not None:
        check_resume_config(cfg, path)
    return path


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> "Trainer":
    """Run (or resume) training; returns the Trainer, whose ``final`` is the exported LoRA directory.

    Every check (config, precision, resume compatibility, model, prompts, pairs) runs before the output
    directory is touched, so a failed start leaves it as it was."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    path = check_start(cfg, resume, overwrite)
    resuming = cfg.checkpointing.resume_from is not None
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision,
                      log_with=None if cfg.logging.tracker == "none" else cfg.logging.tracker,
                      project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    set_seed(cfg.train.seed)  # identical LoRA initialisation on every process
    log = print if acc.is_main_process else (lambda *a, **k: None)
    trainer = Trainer(cfg, acc, log)  # loads and checks the model, prompts and pairs
    acc.wait_for_everyone()
    if acc.is_main_process:
        if overwrite and out.exists():
            clear_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    log(trainer.model.describe())
    if cfg.logging.tracker != "none":
        acc.init_trackers("sd_dmd", config=_flat(asdict(cfg)))
    if path is not None:
        trainer.load_checkpoint(path)
    elif resuming:
        log("no checkpoint to resume from; starting at step 0")
    trainer.final = trainer.fit()
    acc.end_training()
    log(f"done: generator LoRA at {trainer.final} (load with pipe.load_lora_weights('{trainer.final}'))")
    return trainer


def check_tracker(tracker: str) -> None:
    if tracker == "none":
        return
    import importlib.util

    if importlib.util.find_spec(tracker) is None:
        raise ConfigError(f"logging.tracker: {tracker} is not installed (pip install {tracker}, or "
                          "--logging.tracker none)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
