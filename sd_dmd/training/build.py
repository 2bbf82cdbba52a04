"""Building a run: the shared UNet with its adapters, the prompts and stores it reads, its optimisers, LR schedules
and EMA. Each piece is a function of the config; the Trainer holds what they return."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sd_dmd.config import ConfigError
from sd_dmd.core.losses import make_regression_loss
from sd_dmd.data.latents import LatentStore
from sd_dmd.data.pairs import PairsStore
from sd_dmd.data.prompts import PromptFilter, read_prompts
from sd_dmd.models.shared_unet import DTYPES, FAKE, GENERATOR, DMDModel, LoraSpec, compile_unet
from sd_dmd.models.teacher import teacher_identity
from sd_dmd.models.vae import vae_identity
from sd_dmd.training.config import Config, resolve_precision


def make_optimizer(params, lr: float, o) -> torch.optim.Optimizer:
    kw = dict(lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def regression_decoder(cfg: Config, model: DMDModel, device):
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


def load_model(cfg: Config, device) -> tuple[DMDModel, tuple[int, int, int]]:
    """The shared UNet with its ``generator`` and ``fake`` adapters, and the latent shape at ``model.resolution``."""
    m = DMDModel.from_pretrained(
        cfg.model.pretrained_model_name_or_path, revision=cfg.model.revision, variant=cfg.model.variant,
        weight_dtype=DTYPES[cfg.model.weight_dtype], device=device,
        generator_lora=LoraSpec(cfg.lora.generator.rank, cfg.lora.generator.alpha, tuple(cfg.lora.generator.targets)),
        fake_lora=LoraSpec(cfg.lora.fake.rank, cfg.lora.fake.alpha, tuple(cfg.lora.fake.targets)),
        conditioning_timestep=cfg.dmd.conditioning_timestep, real_guidance_scale=cfg.dmd.real_guidance_scale,
        gradient_checkpointing=cfg.train.gradient_checkpointing, resolution=cfg.model.resolution, vae=cfg.model.vae,
        text_encoders=cfg.data.text_cache is None)
    if cfg.data.text_cache is not None:  # prompts from the cache, the encoders never loaded
        from sd_dmd.data.text_cache import CachedText, TextCache

        cache = TextCache(cfg.data.text_cache)
        cache.check_compatible(m.family.name, None, m.resolution)
        m.text = CachedText(cache, m.text, m.device, m.weight_dtype)
    m.generator_timesteps = list(cfg.dmd.generator_timesteps)
    m.one_call_roles = cfg.train.one_call_roles
    m.fake_guidance, m.fake_conditioning = cfg.dmd.fake_guidance, cfg.dmd.fake_conditioning
    m.set_lora_merge(cfg.train.lora_merge)
    if cfg.train.compile:
        compile_unet(m, cfg.train.compile_backend)
    vae_factor = m.vae_factor
    if cfg.model.resolution % vae_factor:
        raise ConfigError(f"model.resolution: {cfg.model.resolution} is not a multiple of the VAE factor {vae_factor}")
    side = cfg.model.resolution // vae_factor
    return m, (m.unet.config.in_channels, side, side)


@dataclass
class Data:
    prompts: list[str]
    store: Optional[PairsStore]  # regression pairs (DMD), or None
    reg_loss: Optional[torch.nn.Module]  # the regression loss on decoded pairs, or None
    real_store: Optional[object]  # real latents (DMD2's GAN): a LatentStore, or None


def load_data(cfg: Config, m: DMDModel, device, log) -> Data:
    """Prompts; the pairs store and regression loss (checked against the teacher); the real latents (checked against
    the VAE), which also put the GAN head on the fake score's bottleneck."""
    d = cfg.data
    prompts, pstats = read_prompts(d.prompts, d.caption_column,
                                   PromptFilter(d.min_aesthetic, d.max_punsafe, d.max_pwatermark, d.dedupe))
    log(pstats.summary())
    store = reg_loss = real_store = None
    if cfg.regression.loss != "none":
        store = PairsStore(cfg.regression.pairs_dir)
        store.check_compatible(teacher_identity(m.unet), cfg.model.resolution)
        check_pairs_guidance(cfg, store)
        kw = {}
        if cfg.regression.loss == "lpips":
            kw = dict(net=cfg.regression.lpips_net, pretrained_backbone=cfg.regression.lpips_pretrained_backbone)
        reg_loss = make_regression_loss(cfg.regression.loss, regression_decoder(cfg, m, device), **kw).to(device)
    if cfg.gan.real_latents:  # DMD2's GAN: real latents, and a head on the fake score's bottleneck
        real_store = LatentStore(cfg.gan.real_latents)
        real_store.check_compatible(vae_identity(m.vae), cfg.model.resolution)
        m.add_gan_head(cfg.model.resolution)
    for s in (store, real_store):  # reads check row digests; an old store has none
        if s is not None and s.verification_note():
            log(s.verification_note())
    if cfg.data.text_cache is not None:
        check_text_cache(m.text.cache, prompts, cfg.logging.validation_prompts, real_store)
    return Data(prompts, store, reg_loss, real_store)


def check_text_cache(cache, prompts: list[str], validation: list[str], real_store) -> None:
    """Before the first step: every prompt the run will encode is in ``data.text_cache`` (the DM prompts, the
    validation prompts, the real latents' captions); the first missing ones are named. (The pairs' prompts are
    looked up as their batches come.)"""
    wanted = {"data.prompts": prompts, "logging.validation_prompts": validation}
    if real_store is not None:
        wanted["gan.real_latents captions"] = real_store.column_values("caption")
    for key, texts in wanted.items():
        miss = cache.missing(texts)
        if miss:
            raise ConfigError(f"data.text_cache: {cache.path} lacks {len(miss)} of the {key} (e.g. {miss[0]!r}); make "
                              "a cache that holds them (python -m sd_dmd.cache_text --prompts ... --extra_prompts ...)")


@dataclass
class Optimisation:
    """The trained parameters, their optimisers (prepared by accelerate: GradScaler handling under fp16), LR schedules
    and the generator's EMA. The GAN head has its own optimiser (the fake score's settings), stepped in the fake turn,
    so that switching the GAN on when resuming a run without it leaves the saved optimisers as they were."""
    gen_params: list
    fake_params: list
    head_params: list
    opt_g: torch.optim.Optimizer
    opt_f: torch.optim.Optimizer
    opt_d: Optional[torch.optim.Optimizer]
    sched_g: object
    sched_f: object
    sched_d: object
    ema: object


def step_down_schedule(opt, warmup: int, at: int, factor: float):
    """diffusers' constant_with_warmup (lr * s / warmup during the warm-up), then lr * ``factor`` from update ``at``
    on: DMD2's second stage (a finished run resumed at a lower lr) within one run."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(opt, lambda s: (s / max(1, warmup) if s < warmup else 1.0) * (factor if s >= at else 1.0))


def make_optimisation(cfg: Config, m: DMDModel, accelerator, gan: bool) -> Optimisation:
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    gen, fake = m.adapter_parameters(GENERATOR), m.adapter_parameters(FAKE)
    head = list(m.gan_head.parameters()) if gan else []
    fake_steps = cfg.train.max_steps * cfg.dmd.fake_updates_per_step

    def optimise(params, lr, steps):
        opt = make_optimizer(params, lr, o)
        sched = (step_down_schedule(opt, o.warmup_steps, int(o.step_down_at * steps), o.step_down_factor)
                 if o.lr_scheduler == "step_down" else
                 get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=steps))
        return accelerator.prepare(opt), sched

    opt_g, sched_g = optimise(gen, o.lr_generator, cfg.train.max_steps)
    opt_f, sched_f = optimise(fake, o.lr_fake, fake_steps)
    opt_d, sched_d = optimise(head, o.lr_fake, fake_steps) if head else (None, None)
    ema = None
    if cfg.train.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(gen, decay=cfg.train.ema_decay)
    return Optimisation(gen, fake, head, opt_g, opt_f, opt_d, sched_g, sched_f, sched_d, ema)
