"""Config of ``train_text2image.py``: nested groups, defaults < YAML < ``--group.key value``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from sd_dmd.config import ConfigError, field
from sd_dmd.core.schedule import lcm_timesteps_error
from sd_dmd.models.shared_unet import DEFAULT_LORA_TARGETS


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = field("runwayml/stable-diffusion-v1-5", "teacher: diffusers dir or hub id")
    revision: Optional[str] = field(None, "hub revision")
    variant: Optional[str] = field(None, "weight variant, e.g. fp16")
    weight_dtype: Literal["auto", "fp32", "fp16", "bf16"] = field(
        "auto", "dtype of the frozen base weights (LoRA stays fp32); auto: the autocast dtype, fp32 without autocast. "
                "Half-precision weights need autocast (train.mixed_precision)")
    resolution: int = field(512, "training resolution in pixels (latents are resolution / VAE factor; SDXL: 1024, "
                                 "also its time ids' sizes)")
    vae: Optional[str] = field(None, "a separately saved VAE instead of the model's vae/ (e.g. an fp16-safe SDXL VAE; "
                                     "the real-latent store must be encoded with the same one: encode_images --vae)")


@dataclass
class LoraConfig:
    rank: int = field(64, "LoRA rank r")
    alpha: float = field(64.0, "LoRA alpha (update scaled by alpha / r)")
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                               help="module-name suffixes to adapt (default: LCM-LoRA's list, attention + FF + convs)")


@dataclass
class LorasConfig:
    generator: LoraConfig = field(default_factory=LoraConfig, help="the one-step generator's LoRA")
    fake: LoraConfig = field(default_factory=LoraConfig, help="the fake score's LoRA")


@dataclass
class DMDConfig:
    real_guidance_scale: float = field(3.0, "CFG scale of the real score (DMD: 3, DMD2: 1.75)")
    t_min: int = field(20, "lowest timestep of the distribution-matching loss (0.02 T)")
    t_max: int = field(980, "highest timestep of the distribution-matching loss (0.98 T)")
    conditioning_timestep: int = field(999, "timestep t* at which the one-step generator is called (the first of "
                                            "generator_timesteps when those are given)")
    generator_timesteps: list[int] = field(default_factory=lambda: [999], help=(
        "the generator's sampling timesteps, decreasing: [999] one step; e.g. 999 749 499 249 for DMD2's 4-step "
        "generator, trained by backward simulation; each >= 7, where diffusers' LCMScheduler samples the generator's "
        "x0 (below, its boundary condition mixes in x_t)"))
    fake_updates_per_step: int = field(1, "fake-score updates per generator update (DMD: 1, DMD2 TTUR: 5-10)")
    dm_weight: float = field(1.0, "weight of the distribution-matching loss")
    fake_guidance: float = field(0.0, "guidance w of the fake score in the DM loss: cond + w (cond - uncond); 0 = "
                                      "conditional (DMD); < 0 = Anti-CFG. Its own training is unchanged")
    fake_conditioning: Literal["text", "none"] = field(
        "text", "the fake score's condition in the DM loss: text, or none (unconditional: Zero-CFG's fake score, "
                "with dmd.real_guidance_scale 1)")
    divergence: Literal["reverse_kl", "js", "forward_kl", "softened_rkl", "squared_hellinger", "jeffreys"] = field(
        "reverse_kl", "f-divergence the DM gradient minimises (f-distill): each sample's gradient is weighted by "
                      "h(r), r = exp(GAN logit) ~ p_real / p_fake; reverse_kl (h = 1) is DMD. Needs the GAN head")
    ratio_clip: list[float] = field(default_factory=lambda: [0.1, 20.0], help="f-distill: the density ratio r is "
                                    "clipped to [low, high] (FastGen)")
    ratio_bins: int = field(10, "f-distill: timestep bins in which r is normalised by its mean (FastGen)")
    ratio_ema: float = field(0.5, "f-distill: EMA decay of the per-bin mean ratio and of the mean weight, over "
                                  "steps (the weights use the steps before; FastGen ImageNet-64: 0.5)")
    fake_loss_weighting: Literal["auto", "eps", "snr+1", "v", "flow"] = field(
        "auto", "fake-score loss: auto = the teacher's own (eps-MSE for eps teachers, SD's and DMD's; v-MSE for "
                "v-prediction ones; the velocity MSE for flow-matching ones), eps, snr+1 = v (v-MSE: weights high noise "
                "more, learns it), or flow (1 / sigma^2, the velocity MSE of a flow-matching teacher)")


@dataclass
class RegressionConfig:
    loss: Literal["lpips", "l2", "l1", "none"] = field("lpips", "regression loss; none switches regression off")
    pairs_dir: Optional[str] = field(None, "pairs store made by generate_pairs.py")
    weight: float = field(0.25, "lambda_reg (paper: 0.25)")
    batch_size: int = field(1, "regression pairs per generator step, per process")
    decoder: Literal["taesd", "vae", "none"] = field("taesd", "decoder before the loss: TAESD, the full VAE, or none "
                                                               "(l1/l2 on latents)")
    tiny_vae: str = field("madebyollin/taesd", "AutoencoderTiny path or hub id when decoder = taesd")
    lpips_net: Literal["vgg", "alex"] = field("vgg", "LPIPS backbone (paper: VGG)")
    lpips_pretrained_backbone: bool = field(True, "load the ImageNet backbone (false: random, for offline tests)")
    verify_noise: bool = field(False, "check regenerated pair noise against the stored digests")
    allow_guidance_mismatch: bool = field(
        False, "train on pairs made with a teacher guidance other than dmd.real_guidance_scale")


@dataclass
class GANConfig:
    real_latents: Optional[str] = field(None, "real-latent store (python -m sd_dmd.encode_images); set = GAN on")
    generator_weight: float = field(1e-3, "weight of the generator's GAN term (DMD2: 1e-3 SD1.5, 5e-3 SDXL)")
    discriminator_weight: float = field(1e-2, "weight of the discriminator loss in the fake turn (DMD2: 1e-2)")
    start_step: int = field(0, "switch the GAN on at this generator step (0: from the start; or resume a finished "
                               "run with a larger max_steps, a GAN store and a lower lr: DMD2's second stage)")
    batch_size: int = field(0, "real latents per fake update, per process (0: train.batch_size)")
    weight_mode: Literal["fixed", "adaptive"] = field(
        "fixed", "fixed: the two weights as given (DMD2's published numbers); adaptive: the generator's GAN weight "
                 "set every step so that ||GAN grad on x|| / ||DM grad on x|| = target_ratio (EMA of the measured "
                 "ratio); the discriminator weight stays discriminator_weight unless adaptive_discriminator")
    adaptive_discriminator: bool = field(
        False, "adaptive mode: scale the discriminator weight with the generator's (keeping discriminator_weight / "
               "generator_weight, DMD2's 10x); false: keep discriminator_weight")
    target_ratio: float = field(0.0, "adaptive mode: the wanted GAN/DM gradient-norm ratio on G's sample (> 0)")
    ratio_ema_decay: float = field(0.9, "adaptive mode: EMA decay of the measured ratio, in [0, 1)")
    max_weight: float = field(1e4, "adaptive mode: upper bound of the generator's GAN weight")
    features: Literal["fake", "teacher"] = field(
        "fake", "discriminator features: the fake score's bottleneck (DMD2) or the frozen teacher's (FastGen)")
    r1_weight: float = field(0.0, "approximate R1 (FastGen, APT) on the real side: weight inside the discriminator "
                                  "loss (0 = off)")
    r1_alpha: float = field(0.1, "approximate R1: std of the perturbation added to the real latents")


@dataclass
class DataConfig:
    prompts: list[str] = field(default_factory=list, help="caption files (parquet/txt/jsonl, globs, dirs)")
    caption_column: Optional[str] = field(None, "caption column; auto-detected when absent")
    min_aesthetic: Optional[float] = field(None, "keep rows with aesthetic score >= this")
    max_punsafe: Optional[float] = field(None, "keep rows with punsafe <= this")
    max_pwatermark: Optional[float] = field(None, "keep rows with pwatermark <= this")
    dedupe: bool = field(False, "drop duplicate captions")
    text_cache: Optional[str] = field(None, "prompt conditionings made by python -m sd_dmd.cache_text: no text "
                                            "encoder is loaded (SD3.5's T5-XXL is 4.7 B parameters); it must hold "
                                            "every prompt, validation prompt and real-latent caption of the run")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit"] = field("adamw", "AdamW, or bitsandbytes' 8-bit AdamW")
    lr_generator: float = field(1e-5, "generator LoRA learning rate")
    lr_fake: float = field(1e-5, "fake-score LoRA learning rate")
    weight_decay: float = field(0.01, "AdamW weight decay")
    beta1: float = field(0.9, "Adam beta1")
    beta2: float = field(0.999, "Adam beta2")
    eps: float = field(1e-8, "Adam epsilon")
    warmup_steps: int = field(500, "linear warm-up steps")
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "step_down"] = field(
        "constant_with_warmup", "LR schedule; step_down: constant after the warm-up, times step_down_factor from "
                                "step_down_at of the run on (DMD2's second stage in one run)")
    step_down_at: float = field(2 / 3, "step_down: the fraction of the run's updates after which the lr steps down")
    step_down_factor: float = field(1 / 3, "step_down: the lr's factor after it")
    max_grad_norm: float = field(10.0, "gradient clipping (paper: 10); 0 disables")


@dataclass
class TrainConfig:
    batch_size: int = field(1, "distribution-matching batch per process")
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step")
    max_steps: int = field(20000, "generator updates")
    seed: int = field(0, "seed; process r draws prompts/noise from (seed, r)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        "auto", "autocast dtype for the forward passes; auto: what accelerate was configured/launched with")
    gradient_checkpointing: bool = field(
        False, "recompute activations in backward (UNet, and the VAE/TAESD decoder of LPIPS regression)")
    ema_decay: float = field(0.0, "EMA of the generator LoRA (0 = off); final/ gets the EMA weights")
    one_call_roles: bool = field(
        True, "the DM loss's real score (CFG's two rows, adapters off) and fake score (LoRA fake) in one UNet call "
              "of 3B rows, each row routed to its adapter; false: separate calls (the same numbers to float rounding)")
    compile: bool = field(
        False, "torch.compile the UNet (and the GAN head's half-UNet): one graph per role, grad mode and batch shape, "
               "compiled in the first steps, none after (docs/BENCHMARKS.md: its compile time and steady gain)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = field(
        "inductor", "train.compile's backend (aot_eager / eager: for debugging, they trace but do not generate code)")
    lora_merge: bool = field(
        True, "on the CPU in fp32, each LoRA layer takes the cheaper of two exact forms per call: the branch "
              "B(A(x)), or one convolution with W + s B A (sd_dmd/models/lora_calls.py); false: the branch always")
    max_nonfinite_steps: int = field(20, "stop after this many consecutive non-finite steps")


@dataclass
class LoggingConfig:
    tracker: Literal["tensorboard", "wandb", "none"] = field("tensorboard", "experiment tracker")
    every: int = field(10, "print/log every N steps")
    validation_every: int = field(500, "render the validation grid every N steps (0 = only at the end)")
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a photo of an astronaut riding a horse on mars", "a close-up portrait of an old fisherman, 85mm",
        "a bowl of ramen, studio lighting", "a watercolor painting of a lighthouse at dawn"],
        help="fixed validation prompts")
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1], help="fixed seeds, one image each per prompt")


@dataclass
class CheckpointConfig:
    every: int = field(500, "save a checkpoint every N steps (0 = off)")
    keep_last: int = field(3, "keep only the last K checkpoints")
    resume_from: Optional[str] = field(None, "'latest' or a checkpoint directory")


@dataclass
class HubConfig:
    push: bool = field(False, "upload final/ (LoRA, kohya file, card, samples, curves) to the Hub at the end")
    model_id: Optional[str] = field(None, "Hub repository, 'owner/name' (created if missing)")
    private: bool = field(False, "create the repository private")
    token: Optional[str] = field(None, "Hub token (else HF_TOKEN or `hf auth login`); never saved or logged",
                                 secret=True)
    every_checkpoint: bool = field(False, "also push each checkpoint's generator LoRA, to branch step-N")

    def validate(self) -> None:
        if (self.push or self.every_checkpoint) and not self.model_id:
            raise ConfigError("hub.model_id: required with hub.push or hub.every_checkpoint (e.g. you/sd15-dmd)")
        if self.model_id:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.model_id)
            except HFValidationError as e:
                raise ConfigError(f"hub.model_id: {self.model_id!r} is not a Hub repository id ({e})") from None


@dataclass
class Config:
    output_dir: str = field("runs/dmd", "run directory")
    model: ModelConfig = field(default_factory=ModelConfig, help="teacher and dtypes")
    lora: LorasConfig = field(default_factory=LorasConfig, help="adapters")
    dmd: DMDConfig = field(default_factory=DMDConfig, help="distribution matching")
    regression: RegressionConfig = field(default_factory=RegressionConfig, help="regression stabiliser")
    gan: GANConfig = field(default_factory=GANConfig, help="DMD2's GAN head on the fake score, against real latents")
    data: DataConfig = field(default_factory=DataConfig, help="prompts")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimisers")
    train: TrainConfig = field(default_factory=TrainConfig, help="loop")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="logs and validation images")
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig, help="checkpoints and resume")
    hub: HubConfig = field(default_factory=HubConfig, help="publishing to the Hugging Face Hub")

    def validate(self) -> None:
        d = self.dmd
        if not 0 <= d.t_min < d.t_max <= 999:
            raise ConfigError(f"dmd.t_min/dmd.t_max: need 0 <= t_min < t_max <= 999, got {d.t_min} and {d.t_max}")
        if not 0 <= d.conditioning_timestep <= 999:
            raise ConfigError(f"dmd.conditioning_timestep: must be in [0, 999], got {d.conditioning_timestep}")
        ts = list(d.generator_timesteps)
        if not ts or any(not 0 <= t <= 999 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"dmd.generator_timesteps: need decreasing timesteps in [0, 999], got {ts}")
        if ts == [999] and d.conditioning_timestep != 999:  # a one-step config that only sets t*
            d.generator_timesteps = [d.conditioning_timestep]
        d.conditioning_timestep = d.generator_timesteps[0]
        lcm_err = lcm_timesteps_error(d.generator_timesteps)  # diffusers' LCMScheduler samples the LoRA
        if lcm_err:
            via = " (from dmd.conditioning_timestep)" if ts == [999] else ""
            raise ConfigError(f"dmd.generator_timesteps{via}: {lcm_err}")
        g = self.gan
        if g.generator_weight < 0 or g.discriminator_weight < 0 or g.start_step < 0 or g.batch_size < 0:
            raise ConfigError("gan.generator_weight, gan.discriminator_weight, gan.start_step, gan.batch_size: "
                              "must be >= 0")
        self._validate_gan()
        self._validate_divergence()
        if d.real_guidance_scale < 0:
            raise ConfigError(f"dmd.real_guidance_scale: must be >= 0, got {d.real_guidance_scale}")
        if d.fake_updates_per_step < 1:
            raise ConfigError("dmd.fake_updates_per_step: must be >= 1")
        o = self.optim
        if not (0 < o.step_down_at < 1 and 0 < o.step_down_factor <= 1):
            raise ConfigError(f"optim.step_down_at / optim.step_down_factor: need 0 < at < 1 and 0 < factor <= 1, got "
                              f"{o.step_down_at} and {o.step_down_factor}")
        if self.model.resolution <= 0 or self.model.resolution % 8:
            raise ConfigError(f"model.resolution: must be a positive multiple of 8, got {self.model.resolution}")
        for name in ("generator", "fake"):
            if getattr(self.lora, name).rank < 1:
                raise ConfigError(f"lora.{name}.rank: must be >= 1, got {getattr(self.lora, name).rank}")
        r = self.regression
        if r.loss != "none":
            if not r.pairs_dir:
                raise ConfigError("regression.pairs_dir: required unless regression.loss is none")
            if r.loss == "lpips" and r.decoder == "none":
                raise ConfigError("regression.decoder: lpips compares images, choose taesd or vae")
        for k in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self.train, k) < 1:
                raise ConfigError(f"train.{k}: must be >= 1")
        if self.train.compile and self.train.gradient_checkpointing:
            raise ConfigError("train.compile: not supported with train.gradient_checkpointing yet (the checkpointed "
                              "blocks pin adapters from Python at recompute time); switch one of them off")
        if not 0 <= self.train.ema_decay < 1:
            raise ConfigError("train.ema_decay: must be in [0, 1)")
        if not self.data.prompts:
            raise ConfigError("data.prompts: at least one prompt file is required")
        self.hub.validate()

    def _validate_divergence(self) -> None:
        d, g = self.dmd, self.gan
        if d.fake_guidance != 0 and d.fake_conditioning == "none":
            raise ConfigError("dmd.fake_guidance: needs dmd.fake_conditioning text (an unconditional fake score has "
                              "no guidance)")
        if d.divergence == "reverse_kl":
            return
        if not g.real_latents or g.generator_weight == 0 and g.weight_mode == "fixed":
            raise ConfigError(f"dmd.divergence: {d.divergence} reads the density ratio from the GAN head; set "
                              "gan.real_latents (and a gan.generator_weight > 0), or dmd.divergence reverse_kl")
        lo_hi = list(d.ratio_clip)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
            raise ConfigError(f"dmd.ratio_clip: need 0 < low < high, got {lo_hi}")
        if d.ratio_bins < 1 or not 0 <= d.ratio_ema < 1:
            raise ConfigError(f"dmd.ratio_bins / dmd.ratio_ema: need >= 1 and in [0, 1), got {d.ratio_bins} and "
                              f"{d.ratio_ema}")

    def _validate_gan(self) -> None:
        g = self.gan
        if g.r1_weight < 0 or g.r1_alpha < 0:
            raise ConfigError(f"gan.r1_weight, gan.r1_alpha: must be >= 0, got {g.r1_weight} and {g.r1_alpha}")
        if not 0 <= g.ratio_ema_decay < 1:
            raise ConfigError(f"gan.ratio_ema_decay: must be in [0, 1), got {g.ratio_ema_decay}")
        if g.weight_mode != "adaptive":
            return
        if not g.target_ratio > 0:
            raise ConfigError(f"gan.target_ratio: adaptive mode needs a ratio > 0, got {g.target_ratio}")
        if not g.generator_weight > 0:
            raise ConfigError("gan.generator_weight: adaptive mode keeps discriminator_weight / generator_weight, "
                              f"so it must be > 0, got {g.generator_weight}")
        if not self.dmd.dm_weight > 0:
            raise ConfigError(f"dmd.dm_weight: adaptive GAN weighting measures against the DM gradient, so it must "
                              f"be > 0, got {self.dmd.dm_weight}")
        if not g.max_weight > 0:
            raise ConfigError(f"gan.max_weight: must be > 0, got {g.max_weight}")


# Keys a resume may not change: they define what the adapters in the checkpoint are (docs/RELIABILITY.md).
# Every other key (max_steps, learning rates, logging, checkpointing, batch sizes, ...) may change on resume.
FIXED_ON_RESUME = ("model.pretrained_model_name_or_path", "model.revision", "model.variant", "model.resolution",
                   "lora.generator.rank", "lora.generator.alpha", "lora.generator.targets",
                   "lora.fake.rank", "lora.fake.alpha", "lora.fake.targets", "dmd.conditioning_timestep",
                   "dmd.generator_timesteps")
# what a checkpoint written before a key existed meant by it
RESUME_DEFAULTS = {"dmd.generator_timesteps": lambda saved: [_get(saved, "dmd.conditioning_timestep")]}


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def resume_conflicts(saved: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each key of FIXED_ON_RESUME that differs between two config trees."""
    out = []
    for key in FIXED_ON_RESUME:
        old, cur = _get(saved, key), _get(new, key)
        if old is None and key in RESUME_DEFAULTS:
            old = RESUME_DEFAULTS[key](saved)
        if key == "dmd.generator_timesteps":
            same = [int(v) for v in old] == [int(v) for v in cur]
        elif isinstance(old, list) and isinstance(cur, list):
            same = sorted(map(str, old)) == sorted(map(str, cur))
        else:
            same = old == cur
        if not same:
            out.append(f"{key}: {old!r} -> {cur!r}")
    return out


def resolve_precision(cfg: Config, launched_with: Optional[str] = None) -> None:
    """Settle ``train.mixed_precision`` and ``model.weight_dtype`` in place, refusing unsafe or conflicting pairs.

    ``launched_with`` is accelerate's setting (``accelerate launch --mixed_precision`` or its config file,
    passed to us as ACCELERATE_MIXED_PRECISION); read from the environment when None."""
    if launched_with is None:
        launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION")
    t, m = cfg.train, cfg.model
    if t.mixed_precision == "auto":
        t.mixed_precision = launched_with or "no"
    elif launched_with not in (None, "no", t.mixed_precision):
        raise ConfigError(f"train.mixed_precision: the config says {t.mixed_precision!r} but accelerate was launched "
                          f"with --mixed_precision {launched_with!r}; make them agree (or set "
                          "train.mixed_precision: auto to follow accelerate)")
    if m.weight_dtype == "auto":
        m.weight_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[t.mixed_precision]
    elif m.weight_dtype in ("fp16", "bf16") and t.mixed_precision == "no":
        raise ConfigError(f"model.weight_dtype: {m.weight_dtype} weights without autocast run the whole UNet forward "
                          "and backward in half precision with no loss scaling (LoRA gradients lose up to 99% "
                          f"in fp16); set train.mixed_precision to {m.weight_dtype} or model.weight_dtype to "
                          "fp32 (or auto)")
