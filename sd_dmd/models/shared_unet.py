"""One frozen UNet, three roles (DESIGN.md, "The three networks on one UNet").

- real score (teacher): adapters disabled, CFG (uncond + cond in one batched forward), always no_grad;
- generator G: LoRA ``generator``, called at the conditioning timestep t* on pure noise;
- fake score: LoRA ``fake``, unguided.

All three are exposed as denoiser callables ``(x_t, t, cond) -> x0_hat`` for :mod:`sd_dmd.losses`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.utils.checkpoint

from sd_dmd.core.denoisers import CFGDenoiser, EpsDenoiser
from sd_dmd.core.schedule import NoiseSchedule
from sd_dmd.errors import ModelError

GENERATOR, FAKE = "generator", "fake"

# LCM-LoRA's target list: attention projections, transformer in/out projections, feed-forward, ResNet
# convolutions and time embeddings, and the down/up-samplers. One-step generation changes the UNet's
# behaviour at every resolution, not only its attention, so the convolutions are adapted too.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                        "time_emb_proj")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoraSpec:
    rank: int = 64  # LoRA rank r
    alpha: float = 64.0  # LoRA alpha; the update is scaled by alpha / r
    targets: tuple = field(default_factory=lambda: DEFAULT_LORA_TARGETS)  # module-name suffixes

    def to_peft(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise ModelError(f"LoRA rank must be >= 1, got {self.rank}")
        # init_lora_weights="gaussian": A ~ N(0, 1/r), B = 0, so the adapter starts as a zero update
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights="gaussian")


def check_model_dir(path: str) -> None:
    """Refuse a local directory that is not a diffusers SD pipeline, naming what is missing."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{path}: not a directory (expected a diffusers Stable Diffusion pipeline)")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (p / sub).is_dir():
                raise ModelError(f"{path}: no '{sub}/' folder; expected a diffusers Stable Diffusion pipeline")
    elif path.startswith((".", "/")) or path.count("/") > 1:
        raise ModelError(f"{path}: no such model directory")


def check_eps_prediction(scheduler_config, path: str) -> None:
    """Refuse a teacher that does not predict eps (v-prediction SD 2.x, ...)."""
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ModelError(f"{path}: scheduler prediction_type is '{pred}'; DMD here needs an epsilon-prediction "
                         "teacher (SD 1.x / 2.x-base), v-prediction models are not supported")


def load_components(path: str, revision: Optional[str] = None, variant: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None):
    """Load (unet, vae, text_encoder, tokenizer, scheduler) from a local diffusers dir or a hub id.

    ``dtype``: load the weights in this dtype (``dtype=``, as diffusers >= 0.36 and transformers >= 4.56 name
    it), rather than casting afterwards with ``.to(dtype)``, which diffusers warns about.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_dir(path)
    kw = dict(revision=revision)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    check_eps_prediction(scheduler.config, path)
    weights = dict(kw, variant=variant, dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    return unet, vae, text_encoder, tokenizer, scheduler


def _tuner_layers(module: torch.nn.Module) -> list:
    """peft's LoRA layers inside ``module`` (cached on the module: the block structure never changes)."""
    layers = getattr(module, "_sd_dmd_tuner_layers", None)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        object.__setattr__(module, "_sd_dmd_tuner_layers", layers)  # not a submodule: plain attribute
    return layers


@contextlib.contextmanager
def _adapter_state(state: list):
    """Route each LoRA layer as in ``state`` [(layer, active_adapter, disabled)], then restore.

    Sets what BaseTunerLayer.set_adapter / enable_adapters set, without their requires_grad side effects
    (which would drop the gradients of the graph being recomputed)."""
    before = [(layer, layer._active_adapter, layer._disable_adapters) for layer, _, _ in state]
    try:
        for layer, active, disabled in state:
            layer._active_adapter, layer._disable_adapters = active, disabled
        yield
    finally:
        for layer, active, disabled in before:
            layer._active_adapter, layer._disable_adapters = active, disabled


def checkpoint_pinning_adapters(module: torch.nn.Module, *args):
    """Gradient checkpointing for a UNet whose adapters switch between forward and backward.

    diffusers recomputes each checkpointed block during backward with whatever adapter is active *then*;
    on the shared UNet that is usually another role's (after the DM loss the ``fake`` adapter is active,
    so the generator's gradient would be recomputed through the fake LoRA). ``context_fn`` runs at
    forward time: it records the block's adapter routing and re-applies it around the recomputation."""
    layers = _tuner_layers(module)

    def context_fn():
        state = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
        return contextlib.nullcontext(), _adapter_state(state)

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)


def unet_bottleneck(unet, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """The UNet's forward up to and including the mid block (conv_in, time embedding, down blocks, mid block):
    what DMD2's discriminator reads ("cls_on_clean_image"). The same calls, in the same order, as
    ``UNet2DConditionModel.forward`` for SD-style UNets (no class or added embeddings)."""
    cfg = unet.config
    if cfg.get("class_embed_type") or cfg.get("addition_embed_type"):
        raise ModelError("the GAN head supports SD-style UNets only (no class or added embeddings); this UNet has "
                         f"class_embed_type={cfg.get('class_embed_type')}, "
                         f"addition_embed_type={cfg.get('addition_embed_type')}")
    if unet.mid_block is None:
        raise ModelError("the GAN head reads the UNet's mid block, and this UNet has none")
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    return unet.mid_block(h, emb)


def _group_norm(channels: int) -> torch.nn.GroupNorm:
    import math

    return torch.nn.GroupNorm(math.gcd(32, channels), channels)


class GANHead(torch.nn.Module):
    """DMD2's classifier on the fake score's bottleneck: Conv4x4 s2 -> GN -> SiLU -> Conv4x4 s4 -> GN -> SiLU ->
    Conv1x1 -> one logit per sample. At SD1.5's 8x8 mid block (512 px) that is exactly DMD2's head (8 -> 4 -> 1);
    a smaller bottleneck (the digits UNet's) keeps the layers, with the second conv's kernel and stride cut to what
    is left so it still ends at 1x1."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        first = torch.nn.Conv2d(channels, channels, 4, 2, 1) if size >= 4 else torch.nn.Conv2d(channels, channels, 3, 1, 1)
        left = size // 2 if size >= 4 else size
        k = min(4, left)
        self.net = torch.nn.Sequential(
            first, _group_norm(channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, k, k, 0), _group_norm(channels), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1),  # 1x1 already at SD1.5's shape; averages what is left elsewhere
            torch.nn.Conv2d(channels, 1, 1, 1, 0))
        self.channels, self.size = channels, size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float()).flatten(1).squeeze(1)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class DMDModel:
    """The shared UNet with its two adapters, the frozen VAE/text encoder, and the schedule."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, weight_dtype: torch.dtype = torch.float32,
                 generator_lora: LoraSpec = LoraSpec(), fake_lora: LoraSpec = LoraSpec(),
                 conditioning_timestep: int = 999, real_guidance_scale: float = 3.0,
                 gradient_checkpointing: bool = False, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype  # dtype of the frozen base weights
        self.conditioning_timestep = conditioning_timestep  # t* at which G is called
        self.generator_timesteps = [conditioning_timestep]  # the few-step sampler's timesteps (training sets them)
        self.real_guidance_scale = real_guidance_scale  # CFG scale of the real score
        self.scheduler = scheduler
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        if not 0 <= conditioning_timestep < self.schedule.num_train_timesteps:
            raise ModelError(f"conditioning_timestep must be in [0, {self.schedule.num_train_timesteps - 1}]")
        self.tokenizer = tokenizer
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval()
            if m.dtype != weight_dtype:  # loaded in another dtype (from_pretrained loads in weight_dtype)
                m.to(dtype=weight_dtype)
            m.to(self.device)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.base_params = sum(p.numel() for p in unet.parameters())
        self.base_bytes = _nbytes(unet.parameters())
        self.lora_specs = {GENERATOR: generator_lora, FAKE: fake_lora}
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first ("Already found a `peft_config`"): two adapters
            # on one UNet is the design here, so that one warning is dropped, at this call only
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            for name, spec in self.lora_specs.items():
                unet.add_adapter(spec.to_peft(), adapter_name=name)
        for n, p in unet.named_parameters():  # LoRA weights train in fp32 whatever the base dtype
            if "lora_" in n:
                p.data = p.data.float()
        self._lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        self._activate(GENERATOR)
        if gradient_checkpointing:  # the VAE too: LPIPS regression backpropagates through its decoder
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_pinning_adapters)
            vae.enable_gradient_checkpointing()
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # SDPA
        self._uncond = None

    @classmethod
    def from_pretrained(cls, path: str, *, revision: Optional[str] = None, variant: Optional[str] = None, **kw):
        return cls(*load_components(path, revision, variant, kw.get("weight_dtype", torch.float32)), **kw)

    def _activate(self, name: str) -> None:
        """Route the UNet through adapter ``name``. peft's set_adapter also turns requires_grad off for the
        other adapter, which would silently drop gradients of a graph built before the switch; we keep
        every LoRA parameter trainable and let each turn's optimiser decide what moves."""
        self.unet.enable_adapters()
        self.unet.set_adapter(name)
        for p in self._lora_params:
            p.requires_grad_(True)

    # ----- parameters ---------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n]

    def adapter_named_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n}

    def describe(self) -> str:
        lines = [f"base UNet (frozen, {str(self.weight_dtype).replace('torch.', '')}): "
                 f"{self.base_params / 1e6:.1f}M params, {self.base_bytes / 2**20:.1f} MiB"]
        for name, spec in self.lora_specs.items():
            ps = self.adapter_parameters(name)
            lines.append(f"LoRA '{name}' (fp32, r={spec.rank}, alpha={spec.alpha}): "
                         f"{sum(p.numel() for p in ps) / 1e6:.2f}M params, {_nbytes(ps) / 2**20:.1f} MiB")
        return "\n".join(lines)

    # ----- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden state, as StableDiffusionPipeline.encode_prompt (truncated to 77 tokens)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @property
    def uncond_embedding(self) -> torch.Tensor:
        """The empty-prompt embedding used by CFG, computed once."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    # ----- the three denoisers ------------------------------------------------------------------
    def _eps(self, adapter: Optional[str]):
        def eps_fn(x_t, t, cond):
            if adapter is None:
                self.unet.disable_adapters()
            else:
                self._activate(adapter)
            try:
                out = self.unet(x_t if torch.is_autocast_enabled(x_t.device.type) else x_t.to(self.unet.dtype), t,
                                encoder_hidden_states=cond).sample
            finally:
                if adapter is None:
                    self.unet.enable_adapters()
            return out.float()

        return eps_fn

    def real_denoiser(self, guidance_scale: Optional[float] = None):
        """Teacher x0 with CFG; runs under no_grad always."""
        scale = self.real_guidance_scale if guidance_scale is None else guidance_scale
        cfg = CFGDenoiser(EpsDenoiser(self._eps(None), self.schedule), scale, self.uncond_embedding)

        def real(x_t, t, cond):
            with torch.no_grad():
                return cfg(x_t, t, cond)

        return real

    def fake_denoiser(self):
        return EpsDenoiser(self._eps(FAKE), self.schedule)

    def generator_denoiser(self):
        return EpsDenoiser(self._eps(GENERATOR), self.schedule)

    def generate(self, z: torch.Tensor, cond: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """x = G(z) = (z - sigma_t eps_gen(z, t, c)) / alpha_t at t = ``timestep`` (default t*): what
        LCMScheduler(timesteps=[999]) gives from pure noise, and one step of a few-step sampler otherwise."""
        t = torch.full((z.shape[0],), self.conditioning_timestep if timestep is None else timestep, device=z.device,
                       dtype=torch.long)
        return self.generator_denoiser()(z, t, cond)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cond: torch.Tensor, timesteps: list[int],
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The few-step generator's sample, exactly as ``LCMScheduler`` with ``timesteps=timesteps`` and guidance 0
        runs it: x0 = G(x_t, t_i); x_{t_(i+1)} = alpha x0 + sigma * fresh noise drawn from ``generator`` (the
        pipeline draws it with ``randn_tensor`` after every step but the last)."""
        from diffusers.utils.torch_utils import randn_tensor

        x_t = z
        for i, t in enumerate(timesteps):
            x0 = self.generate(x_t, cond, t)
            if i + 1 == len(timesteps):
                return x0
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.schedule.add_noise(x0, noise, torch.full((x0.shape[0],), timesteps[i + 1], device=x0.device))
        return x_t

    # ----- the GAN head (DMD2) ------------------------------------------------------------------
    def add_gan_head(self, resolution: int) -> GANHead:
        """Create the discriminator head on the fake score's bottleneck (fp32, on the model's device), sized by a
        probe of the mid block at this latent resolution."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = resolution // vae_factor
        probe = torch.zeros(1, self.unet.config.in_channels, side, side, device=self.device, dtype=self.unet.dtype)
        with torch.no_grad():
            h = unet_bottleneck(self.unet, probe, torch.zeros(1, device=self.device, dtype=torch.long),
                                torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=self.device,
                                            dtype=self.unet.dtype))
        self.gan_head = GANHead(h.shape[1], h.shape[-1]).to(self.device)
        return self.gan_head

    def discriminator(self, features: str = "fake"):
        """(x_t, t, cond) -> realism logits: the UNet's bottleneck, then the GAN head. ``features``: "fake" reads the
        fake-LoRA UNet (DMD2), "teacher" the frozen teacher, adapters off (FastGen's DMD2): only the head learns.
        ``features_grad=False`` computes the bottleneck without gradient (the head still gets one)."""
        head = getattr(self, "gan_head", None)
        if head is None:
            raise ModelError("no GAN head: call add_gan_head first")
        if features not in ("fake", "teacher"):
            raise ModelError(f"unknown discriminator features '{features}' (choose from fake, teacher)")

        def disc(x_t, t, cond, features_grad: bool = True):
            self._activate(FAKE)
            x = x_t if torch.is_autocast_enabled(x_t.device.type) else x_t.to(self.unet.dtype)
            off = [(layer, layer._active_adapter, True) for layer in _tuner_layers(self.unet)]
            routing = _adapter_state(off) if features == "teacher" else contextlib.nullcontext()
            with routing, torch.set_grad_enabled(features_grad and torch.is_grad_enabled()):
                h = unet_bottleneck(self.unet, x, t, cond)
            return head(h)

        return disc

    # ----- decoding -----------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] with the full VAE (differentiable)."""
        sf = self.vae.config.scaling_factor
        return self.vae.decode((latents / sf).to(self.vae.dtype)).sample.float()
