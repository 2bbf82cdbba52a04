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
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import ConfigError, save_config
from .export import KOHYA_FILE, export_kohya, load_adapter, save_lora
from .losses import dmd_loss, fake_score_loss, make_regression_loss
from .model import DTYPES, FAKE, GENERATOR, DMDModel, LoraSpec
from .pairs import PairsStore, teacher_identity
from .prompts import PromptFilter, read_prompts
from .schedule import sample_timesteps
from .train_config import Config


class TrainingError(RuntimeError):
    """The run cannot continue (message says why and what was kept)."""


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

    taesd = AutoencoderTiny.from_pretrained(r.tiny_vae).to(device, dtype=model.weight_dtype).requires_grad_(False)
    taesd.eval()
    if cfg.train.gradient_checkpointing:
        taesd.enable_gradient_checkpointing()
    # AutoencoderTiny works on SD's scaled latents (its scaling_factor is 1) and returns [-1, 1] images
    return lambda z: taesd.decode(z.to(taesd.dtype)).sample.float()


class Trainer:
    def __init__(self, cfg: Config, accelerator, log=print):
        self.cfg, self.acc, self.log = cfg, accelerator, log
        self.out = Path(cfg.output_dir)
        dev = accelerator.device
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
        self.store = None
        if cfg.regression.loss != "none":
            self.store = PairsStore(cfg.regression.pairs_dir)
            self.store.check_compatible(teacher_identity(m.unet), cfg.model.resolution)
            kw = {}
            if cfg.regression.loss == "lpips":
                kw = dict(net=cfg.regression.lpips_net, pretrained_backbone=cfg.regression.lpips_pretrained_backbone)
            self.reg_loss = make_regression_loss(cfg.regression.loss, _decoder(cfg, m, dev), **kw).to(dev)
        o = cfg.optim
        self.gen_params = m.adapter_parameters(GENERATOR)
        self.fake_params = m.adapter_parameters(FAKE)
        opt_g = _make_optimizer(self.gen_params, o.lr_generator, o)
        opt_f = _make_optimizer(self.fake_params, o.lr_fake, o)
        self.opt_g, self.opt_f = accelerator.prepare(opt_g, opt_f)  # (GradScaler handling under fp16)
        from diffusers.optimization import get_scheduler

        self.sched_g = get_scheduler(o.lr_scheduler, opt_g, num_warmup_steps=o.warmup_steps,
                                     num_training_steps=cfg.train.max_steps)
        self.sched_f = get_scheduler(o.lr_scheduler, opt_f, num_warmup_steps=o.warmup_steps,
                                     num_training_steps=cfg.train.max_steps * cfg.dmd.fake_updates_per_step)
        self.ema = None
        if cfg.train.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.gen_params, decay=cfg.train.ema_decay)
        # process r draws its prompts, noise, timesteps and pairs from (seed, r)
        self.rng = torch.Generator("cpu").manual_seed(
            int(np.random.SeedSequence([cfg.train.seed, accelerator.process_index]).generate_state(1)[0]))
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self.stop_requested = False

    # ----- sampling ---------------------------------------------------------------------------------
    def _randn(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=self.rng).to(self.acc.device)

    def _prompts(self, n: int) -> list[str]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=self.rng)
        return [self.prompts[i] for i in idx.tolist()]

    def _timesteps(self, n: int, lo: int, hi: int) -> torch.Tensor:
        return sample_timesteps(n, lo, hi, generator=self.rng, device=self.acc.device)

    # ----- gradient plumbing ----------------------------------------------------------------------
    def _sync_and_clip(self, params) -> tuple[float, bool]:
        """Average grads over processes (one flat all-reduce), clip; returns (norm, finite)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.acc.num_processes > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            flat = self.acc.reduce(flat, reduction="mean")
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm > 0:
            norm = self.acc.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        norm = float(norm)
        return norm, math.isfinite(norm)

    def _step(self, optimizer, scheduler, finite: bool) -> None:
        """Step when the gradients are finite. Under fp16 the GradScaler must see every step (it skips
        overflowing ones itself and lowers the scale), so the prepared optimiser always steps then."""
        if finite or self.acc.scaler is not None:
            optimizer.step()
            if finite:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # ----- the two turns ----------------------------------------------------------------------------
    def generator_turn(self) -> tuple[dict, torch.Tensor, torch.Tensor]:
        cfg, m, acc = self.cfg, self.model, self.acc
        n_acc = cfg.train.gradient_accumulation_steps
        stats: dict = {}
        real, fake = m.real_denoiser(), m.fake_denoiser()
        x_last = c_last = None
        for _ in range(n_acc):
            cond = m.encode_prompts(self._prompts(cfg.train.batch_size))
            with acc.autocast():
                x = m.generate(self._randn(cfg.train.batch_size), cond)
                t = self._timesteps(cfg.train.batch_size, cfg.dmd.t_min, cfg.dmd.t_max)
                loss_dm, s = dmd_loss(x, real, fake, t, self._randn(cfg.train.batch_size), m.schedule, cond)
                loss = cfg.dmd.dm_weight * loss_dm
                if self.store is not None:
                    rows = torch.randint(0, len(self.store), (cfg.regression.batch_size,), generator=self.rng).tolist()
                    z_ref, y_ref, p_ref = self.store.batch(rows, verify=cfg.regression.verify_noise)
                    x_ref = m.generate(z_ref.to(acc.device), m.encode_prompts(p_ref))
                    loss_reg, s_reg = self.reg_loss(x_ref, y_ref.to(acc.device))
                    loss = loss + cfg.regression.weight * loss_reg
                    s.update(s_reg)
            acc.backward(loss / n_acc)
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v / n_acc
            x_last, c_last = x.detach(), cond
        norm, finite = self._sync_and_clip(self.gen_params)
        stats["grad_norm_generator"] = norm
        self._step(self.opt_g, self.sched_g, finite)
        if finite and self.ema is not None:
            self.ema.step(self.gen_params)
        stats["_finite_g"] = finite
        return stats, x_last, c_last

    def fake_turn(self, x: Optional[torch.Tensor], cond: Optional[torch.Tensor]) -> dict:
        """One fake-score update; ``x``/``cond`` reuse the generator turn's samples when given."""
        cfg, m, acc = self.cfg, self.model, self.acc
        n_acc = cfg.train.gradient_accumulation_steps
        fake = m.fake_denoiser()
        total = 0.0
        for i in range(n_acc):
            if x is None or i > 0:
                cond = m.encode_prompts(self._prompts(cfg.train.batch_size))
                with torch.no_grad(), acc.autocast():
                    x = m.generate(self._randn(cfg.train.batch_size), cond)
            with acc.autocast():
                t = self._timesteps(x.shape[0], 0, m.schedule.num_train_timesteps - 1)
                loss, _ = fake_score_loss(fake, x, t, self._randn(x.shape[0]), m.schedule, cond)
            acc.backward(loss / n_acc)
            total += loss.item() / n_acc
        norm, finite = self._sync_and_clip(self.fake_params)
        self._step(self.opt_f, self.sched_f, finite)
        return {"loss_fake": total, "grad_norm_fake": norm, "_finite_f": finite}

    def train_step(self) -> dict:
        stats, x, cond = self.generator_turn()
        n = self.cfg.dmd.fake_updates_per_step
        stats.update(loss_fake=0.0, grad_norm_fake=0.0, _finite_f=True)
        for k in range(n):  # TTUR: n fake updates per generator update; the first reuses G's samples
            f = self.fake_turn(x if k == 0 else None, cond if k == 0 else None)
            stats["loss_fake"] += f["loss_fake"] / n
            stats["grad_norm_fake"] += f["grad_norm_fake"] / n
            stats["_finite_f"] &= f["_finite_f"]
        return stats

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
            save_lora(self.model, tmp / "generator", GENERATOR)
            save_lora(self.model, tmp / "fake", FAKE)
            ckpt.save_optimizer(self.opt_g.optimizer, tmp / "optimizer_generator")
            ckpt.save_optimizer(self.opt_f.optimizer, tmp / "optimizer_fake")
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file({f"{i}": p.contiguous() for i, p in enumerate(self.ema.shadow_params)},
                          str(tmp / "ema_generator.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "num_processes": acc.num_processes,
                     "nonfinite_total": self.nonfinite_total,
                     "sched_generator": self.sched_g.state_dict(), "sched_fake": self.sched_f.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None,
                     "history": self.history}
            ckpt.atomic_json(tmp / ckpt.STATE_FILE, json.loads(json.dumps(state, default=float)))
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            ckpt.rotate(self.out, self.cfg.checkpointing.keep_last)
            self.log(f"saved {final}")
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        if state["num_processes"] != self.acc.num_processes:
            raise TrainingError(f"{path}: saved with {state['num_processes']} processes, resuming with "
                                f"{self.acc.num_processes}; per-process RNG streams would not continue")
        load_adapter(self.model, GENERATOR, path / "generator")
        load_adapter(self.model, FAKE, path / "fake")
        ckpt.load_optimizer(self.opt_g.optimizer, path / "optimizer_generator")
        ckpt.load_optimizer(self.opt_f.optimizer, path / "optimizer_fake")
        self.sched_g.load_state_dict(state["sched_generator"])
        self.sched_f.load_state_dict(state["sched_fake"])
        if state.get("scaler") and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (path / "ema_generator.safetensors").exists():
            from safetensors.torch import load_file

            saved = load_file(str(path / "ema_generator.safetensors"))
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(saved[str(i)])
            self.ema.optimization_step = state["ema_optimization_step"]
        ckpt.load_rng(self.rng, path / f"rng-{self.acc.process_index}.safetensors")
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        self.history = state["history"]
        self.log(f"resumed from {path} at step {self.step}")

    # ----- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_grid(self, tag: str) -> Optional[Path]:
        if not self.acc.is_main_process:
            return None
        from PIL import Image

        from .sample import image_grid

        lg = self.cfg.logging
        m = self.model
        images = []
        for seed in lg.validation_seeds:
            cond = m.encode_prompts(lg.validation_prompts)
            z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed * 1000 + i))
                             for i in range(len(lg.validation_prompts))]).to(self.acc.device)
            with self.acc.autocast():
                img = m.decode(m.generate(z, cond))
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
        write_model_card(self.cfg, final, self.history, grid)
        return final

    # ----- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, acc = self.cfg, self.acc
        from tqdm.auto import tqdm

        signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="dmd",
                   dynamic_ncols=True)
        t_last, samples = time.time(), 0
        while self.step < cfg.train.max_steps:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            stats = self.train_step()
            finite = stats.pop("_finite_g") and stats.pop("_finite_f", True) and all(
                math.isfinite(v) for v in stats.values())
            if not finite:
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
                self.log(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                         f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)")
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    last = ckpt.list_checkpoints(self.out)
                    raise TrainingError(f"{self.nonfinite_in_a_row} consecutive non-finite steps; stopping. Last good "
                                        f"checkpoint: {last[-1][1] if last else 'none'}")
                continue
            self.nonfinite_in_a_row = 0
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
                self.history.append({"step": self.step, **{k: round(float(v), 6) for k, v in stats.items()}})
                acc.log(stats, step=self.step)
                if acc.is_main_process:
                    bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss_dm", "loss_reg", "loss_fake") if k in stats})
                    self.log(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
            if cfg.logging.validation_every and self.step % cfg.logging.validation_every == 0:
                self.validation_grid(f"step-{self.step:06d}")
            if cfg.checkpointing.every and self.step % cfg.checkpointing.every == 0:
                self.save_checkpoint()
            if self.stop_requested:
                self.log("SIGTERM received: writing a checkpoint and stopping")
                if not (cfg.checkpointing.every and self.step % cfg.checkpointing.every == 0):
                    self.save_checkpoint()
                bar.close()
                raise SystemExit(143)
        bar.close()
        acc.wait_for_everyone()
        return self.export_final()

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True


def write_model_card(cfg: Config, final: Path, history: list[dict], grid: Optional[Path]) -> None:
    """``final/README.md``: settings, curve summary and a copy-paste diffusers snippet."""
    keys = ("loss_dm", "loss_reg", "loss_fake", "grad_norm_generator")
    rows = []
    if history:
        pick = [history[0]] + history[max(1, len(history) // 2):max(1, len(history) // 2) + 1] + [history[-1]]
        seen = set()
        for h in pick:
            if h["step"] in seen:
                continue
            seen.add(h["step"])
            rows.append("| " + " | ".join([str(h["step"])] + [f"{h[k]:.4g}" if k in h else "-" for k in keys]) + " |")
    model = cfg.model.pretrained_model_name_or_path
    g = cfg.lora.generator
    text = f"""---
library_name: diffusers
base_model: {model}
tags: [lora, text-to-image, one-step, dmd, sd_dmd]
---
# One-step DMD LoRA for `{model}`

Distilled with [sd_dmd](https://example.invalid/sd_dmd) (Distribution Matching Distillation, Yin et al. 2023) into a
**one-step** generator: LoRA r={g.rank}, alpha={g.alpha}, on the frozen teacher UNet.

| setting | value |
|---|---|
| real-score guidance | {cfg.dmd.real_guidance_scale} |
| DM timesteps | [{cfg.dmd.t_min}, {cfg.dmd.t_max}], generator at t*={cfg.dmd.conditioning_timestep} |
| fake updates per step | {cfg.dmd.fake_updates_per_step} |
| regression | {cfg.regression.loss} (lambda={cfg.regression.weight}, decoder={cfg.regression.decoder}) |
| optimiser | {cfg.optim.optimizer}, lr G {cfg.optim.lr_generator} / fake {cfg.optim.lr_fake} |
| steps x batch | {cfg.train.max_steps} x {cfg.train.batch_size} per process |
| resolution | {cfg.model.resolution} |

## Training curve (summary)

| step | {' | '.join(keys)} |
|---|{'---|' * len(keys)}
{chr(10).join(rows) if rows else '| - |'}

## Use

```python
import torch
from diffusers import StableDiffusionPipeline, LCMScheduler

pipe = StableDiffusionPipeline.from_pretrained("{model}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{final}")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
image = pipe("a photo of a cat", num_inference_steps=1, timesteps=[{cfg.dmd.conditioning_timestep}],
             guidance_scale=0.0).images[0]
```

ComfyUI / A1111: use `{KOHYA_FILE}` (kohya key format) with an LCM sampler at 1 step, CFG 1.
{f"{chr(10)}![validation]({os.path.relpath(grid, final)})" if grid else ""}
"""
    (final / "README.md").write_text(text)


def prepare_output_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse to write into another run's directory unless resuming or overwriting."""
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise ConfigError(f"output_dir: {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to replace it")
        for _, p in ckpt.list_checkpoints(out):
            shutil.rmtree(p)
        shutil.rmtree(out / "final", ignore_errors=True)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> "Trainer":
    """Run (or resume) training; returns the Trainer, whose ``final`` is the exported LoRA directory."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    if resume and cfg.checkpointing.resume_from is None:
        cfg.checkpointing.resume_from = "latest"
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision,
                      log_with=None if cfg.logging.tracker == "none" else cfg.logging.tracker,
                      project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    if acc.is_main_process:
        prepare_output_dir(cfg, resume or cfg.checkpointing.resume_from is not None, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    set_seed(cfg.train.seed)  # identical LoRA initialisation on every process
    log = print if acc.is_main_process else (lambda *a, **k: None)
    trainer = Trainer(cfg, acc, log)
    log(trainer.model.describe())
    if cfg.logging.tracker != "none":
        acc.init_trackers("sd_dmd", config=_flat(asdict(cfg)))
    path = ckpt.resolve_resume(out, cfg.checkpointing.resume_from)
    if path is not None:
        trainer.load_checkpoint(path)
    elif cfg.checkpointing.resume_from is not None:
        log("no checkpoint to resume from; starting at step 0")
    trainer.final = trainer.fit()
    acc.end_training()
    log(f"done: generator LoRA at {trainer.final} (load with pipe.load_lora_weights('{trainer.final}'))")
    return trainer


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
