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
from typing import Callable, Optional

import torch
import torch.utils.checkpoint

from sd_dmd.core.denoisers import CFGDenoiser, PredictionDenoiser
from sd_dmd.core.schedule import schedule_of
from sd_dmd.errors import ModelError
from sd_dmd.models import lora_calls
from sd_dmd.models.bottleneck import bottleneck, unet_bottleneck  # noqa: F401 (unet_bottleneck: re-exported)
from sd_dmd.models.family import SD, Components, Family, detect_family, model_index

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


def family_targets(spec: LoraSpec, family: Family) -> LoraSpec:
    """``spec`` with the family's default targets where it has the UNet default (``lora.*.targets`` unset): SD3's
    attention and MLP projections (family.SD3_LORA_TARGETS) instead of LCM-LoRA's UNet list."""
    if family.lora_targets and tuple(spec.targets) == DEFAULT_LORA_TARGETS:
        return LoraSpec(spec.rank, spec.alpha, tuple(family.lora_targets))
    return spec


def _tuner_layers(module: torch.nn.Module) -> list:
    """peft's LoRA layers inside ``module`` (cached on the module: the block structure never changes)."""
    layers = getattr(module, "_sd_dmd_tuner_layers", None)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        object.__setattr__(module, "_sd_dmd_tuner_layers", layers)  # not a submodule: plain attribute
    return layers


def _routing(layer) -> tuple:
    """What decides a LoRA layer's output: peft's active adapter and switch, and our row routing (lora_calls)."""
    return layer._active_adapter, layer._disable_adapters, getattr(layer, "_sd_dmd_rows", None)


@contextlib.contextmanager
def _adapter_state(state: list):
    """Route each LoRA layer as in ``state`` [(layer, (active_adapter, disabled, rows))], then restore.

    Sets what BaseTunerLayer.set_adapter / enable_adapters set, without their requires_grad side effects
    (which would drop the gradients of the graph being recomputed)."""
    before = [(layer, _routing(layer)) for layer, _ in state]
    try:
        for layer, (active, disabled, rows) in state:
            layer._active_adapter, layer._disable_adapters = active, disabled
            if rows is not None or hasattr(layer, "_sd_dmd_rows"):
                layer._sd_dmd_rows = rows
        yield
    finally:
        for layer, (active, disabled, rows) in before:
            layer._active_adapter, layer._disable_adapters = active, disabled
            if rows is not None or hasattr(layer, "_sd_dmd_rows"):
                layer._sd_dmd_rows = rows


class _Reentrant:
    """A context manager entered afresh each time: a block is recomputed once per backward through it, and a graph
    kept for a second backward (``retain_graph``: the adaptive GAN weight's accumulation path) recomputes it again,
    which a generator-based context manager (entered once only) refused."""

    def __init__(self, make):
        self.make, self.stack = make, []

    def __enter__(self):
        cm = self.make()
        self.stack.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)


def checkpoint_pinning_adapters(module: torch.nn.Module, *args):
    """Gradient checkpointing for a UNet whose adapters switch between forward and backward.

    diffusers recomputes each checkpointed block during backward with whatever adapter is active *then*;
    on the shared UNet that is usually another role's (after the DM loss the ``fake`` adapter is active,
    so the generator's gradient would be recomputed through the fake LoRA). ``context_fn`` runs at
    forward time: it records the block's adapter routing and re-applies it around each recomputation."""
    layers = _tuner_layers(module)

    def context_fn():
        state = [(layer, _routing(layer)) for layer in layers]
        return contextlib.nullcontext(), _Reentrant(lambda: _adapter_state(state))

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)


def _group_norm(channels: int) -> torch.nn.GroupNorm:
    """GroupNorm(32) as DMD2's head; with under 64 channels (tiny test models) groups of 2 channels at least, so that
    a 1x1 map at batch 1 still has more than one value per group."""
    import math

    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return torch.nn.GroupNorm(groups, channels)


class GANHead(torch.nn.Module):
    """DMD2's classifier on the fake score's bottleneck: (Conv4x4 s2 -> GN -> SiLU) until 4x4 is left, then
    Conv4x4 s4 -> GN -> SiLU -> Conv1x1 -> one logit per sample. At SD1.5's 8x8 mid block (512 px) that is exactly
    DMD2's SD1.5 head (8 -> 4 -> 1), at SDXL's 32x32 (1024 px) exactly its SDXL head (32 -> 16 -> 8 -> 4 -> 1,
    main/sd_guidance.py). A bottleneck under 4x4 (the digits UNet's) keeps the layers, with the second conv's kernel
    and stride cut to what is left so it still ends at 1x1."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        layers, left = [], size
        if size < 4:
            layers += [torch.nn.Conv2d(channels, channels, 3, 1, 1), _group_norm(channels), torch.nn.SiLU()]
        while left >= 4 and (left > 4 or not layers):  # DMD2: one stride-2 conv at least (SD1.5: 8 -> 4)
            layers += [torch.nn.Conv2d(channels, channels, 4, 2, 1), _group_norm(channels), torch.nn.SiLU()]
            left //= 2
        k = min(4, left)
        self.net = torch.nn.Sequential(
            *layers, torch.nn.Conv2d(channels, channels, k, k, 0), _group_norm(channels), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1),  # 1x1 already at SD1.5's and SDXL's shapes; averages what is left elsewhere
            torch.nn.Conv2d(channels, 1, 1, 1, 0))
        self.channels, self.size = channels, size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float()).flatten(1).squeeze(1)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def describe(m: "DMDModel") -> str:
    """The teacher, the frozen base and the two adapters, with their sizes (printed at the start of a run)."""
    lines = [f"teacher: {m.family.pipeline} ({m.prediction_type}), {m.resolution} px, "
             f"{len(m.text_encoders)} text encoder{'s' if len(m.text_encoders) != 1 else ''}"
             + (" (prompts from the text cache)" if getattr(m.text, "cache", None) is not None else ""),
             f"base {m.family.network[1]} (frozen, {str(m.weight_dtype).replace('torch.', '')}): "
             f"{m.base_params / 1e6:.1f}M params, {m.base_bytes / 2**20:.1f} MiB"]
    for name, spec in m.lora_specs.items():
        ps = m.adapter_parameters(name)
        lines.append(f"LoRA '{name}' (fp32, r={spec.rank}, alpha={spec.alpha}): "
                     f"{sum(p.numel() for p in ps) / 1e6:.2f}M params, {_nbytes(ps) / 2**20:.1f} MiB")
    return "\n".join(lines)


def unet_predictor(m: "DMDModel", adapter: Optional[str], rows: Optional[list] = None):
    """The UNet's raw output (eps or v) through ``adapter`` (None: adapters off), or with ``rows`` routed to their
    adapters ((name or None, count), ...) in one call."""
    def predict(x_t, t, cond):
        if rows is not None:
            routing = lora_calls.routed(_tuner_layers(m.unet), rows)
        elif adapter is None:
            routing = _adapter_state([(layer, (layer._active_adapter, True, None)) for layer in _tuner_layers(m.unet)])
        else:
            m._activate(adapter)
            routing = contextlib.nullcontext()
        with routing:
            out = m.unet(x_t if torch.is_autocast_enabled(x_t.device.type) else x_t.to(m.unet.dtype),
                         timestep=m.schedule.model_timestep(t), **m.text.unet_kwargs(cond)).sample
        return out.float()

    return predict


def dm_fake_rows(m: "DMDModel", cond: torch.Tensor) -> tuple[list, Callable]:
    """The DM loss's fake score (issue 36): the conditions of its rows and how their x0s combine. Default
    (``fake_conditioning`` text, ``fake_guidance`` 0): one conditional row, today's fake score. ``none``: the
    unconditional embedding (Zero-CFG's fake score). ``fake_guidance`` w != 0: cond + w (cond - uncond), CFG at
    scale 1 + w (w < 0: Anti-CFG). Only the DM loss reads it: the fake score still trains on the text condition."""
    u = m.uncond_embedding.to(cond).expand(cond.shape[0], *cond.shape[1:])
    if m.fake_conditioning == "none":
        return [u], lambda outs: outs[0]
    if m.fake_guidance == 0:
        return [cond], lambda outs: outs[0]
    w = m.fake_guidance
    return [u, cond], lambda outs: outs[1] + w * (outs[1] - outs[0])


def dm_fake_denoiser(m: "DMDModel"):
    """The fake score as the DM loss reads it (:func:`dm_fake_rows`), its rows in one call (the DM loss calls it
    under no_grad)."""
    fake = m.fake_denoiser()

    def dm_fake(x_t, t, cond):
        conds, combine = dm_fake_rows(m, cond)
        k = len(conds)
        if k == 1:
            return combine([fake(x_t, t, conds[0])])
        return combine(fake(torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(conds)).chunk(k))

    return dm_fake


def one_call_denoisers(m: "DMDModel"):
    """The DM loss's (real, fake) denoisers, evaluated together: real's call (the one
    :func:`sd_dmd.core.losses.dmd_loss` makes first) runs the UNet once on all rows, CFG's unconditional and
    conditional rows with adapters off and the fake score's (:func:`dm_fake_rows`) through LoRA ``fake``, and keeps
    the fake x0 for fake's call on the same (x_t, t, cond). A fake call on other inputs runs on its own."""
    scale, held = m.real_guidance_scale, {}

    def real(x_t, t, cond):
        b = x_t.shape[0]
        conds = [cond] if scale == 1.0 else [m.uncond_embedding.to(cond).expand(b, *cond.shape[1:]), cond]
        fake_conds, combine = dm_fake_rows(m, cond)
        k, kf = len(conds), len(fake_conds)
        joint = PredictionDenoiser(m._predict(None, [(None, k * b), (FAKE, kf * b)]), m.schedule, m.prediction_type)
        with torch.no_grad():
            x0 = joint(torch.cat([x_t] * (k + kf)), torch.cat([t] * (k + kf)), torch.cat(conds + fake_conds))
        held.update(inputs=(x_t, t, cond), fake=combine(x0[k * b:].chunk(kf)))
        if k == 1:
            return x0[:b]
        x0_u, x0_c = x0[:b], x0[b:2 * b]
        return x0_u + scale * (x0_c - x0_u)

    def fake(x_t, t, cond):
        inputs, x0 = held.pop("inputs", None), held.pop("fake", None)
        if inputs is not None and all(a is b for a, b in zip(inputs, (x_t, t, cond))):
            return x0
        return dm_fake_denoiser(m)(x_t, t, cond)

    return real, fake


def compile_unet(m: "DMDModel", backend: str = "inductor") -> None:
    """torch.compile the UNet's forward and the GAN head's half-UNet (train.compile). Dynamo guards on each LoRA
    layer's routing, on grad mode and on the batch shape, so a run compiles one graph per combination it meets (roles
    x grad on/off x batch sizes: a handful, all in its first steps) and none after; the recompile limit is raised so
    that these never fall back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
    m.unet.compile(backend=backend)
    m._bottleneck = torch.compile(bottleneck, backend=backend)


class DMDModel:
    """The shared UNet with its two adapters, the frozen VAE/text encoder(s), and the schedule, for a teacher of any
    family (:mod:`sd_dmd.models.family`: how prompts become conditioning and how the UNet is called with it)."""

    def __init__(self, components: Components, family: Family = SD, *, weight_dtype: torch.dtype = torch.float32,
                 generator_lora: LoraSpec = LoraSpec(), fake_lora: LoraSpec = LoraSpec(),
                 conditioning_timestep: int = 999, real_guidance_scale: float = 3.0,
                 gradient_checkpointing: bool = False, device: torch.device | str = "cpu",
                 resolution: Optional[int] = None, force_zeros_for_empty_prompt: bool = True):
        unet, vae, scheduler = components.unet, components.vae, components.scheduler
        self.family = family
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype  # dtype of the frozen base weights
        self.conditioning_timestep = conditioning_timestep  # t* at which G is called
        self.generator_timesteps = [conditioning_timestep]  # the few-step sampler's timesteps (training sets them)
        self.real_guidance_scale = real_guidance_scale  # CFG scale of the real score
        self.scheduler = scheduler
        self.prediction_type = family.prediction_type(scheduler.config, "the teacher")  # epsilon, v_prediction, flow
        self.schedule = schedule_of(scheduler)  # DDPM, or flow matching (core/schedule.py)
        if not 0 <= conditioning_timestep < self.schedule.num_train_timesteps:
            raise ModelError(f"conditioning_timestep must be in [0, {self.schedule.num_train_timesteps - 1}]")
        self.tokenizer = components.tokenizers[0]
        self.text_encoders = components.text_encoders
        for m in (unet, vae, *self.text_encoders):
            m.requires_grad_(False).eval()
            if m.dtype != weight_dtype:  # loaded in another dtype (from_pretrained loads in weight_dtype)
                m.to(dtype=weight_dtype)
            m.to(self.device)
        self.unet, self.vae, self.text_encoder = unet, vae, (self.text_encoders or [None])[0]
        self.resolution = resolution or int(unet.config.sample_size) * self.vae_factor
        self.text = family.conditioner(components, self.resolution, force_zeros_for_empty_prompt)
        self.base_params = sum(p.numel() for p in unet.parameters())
        self.base_bytes = _nbytes(unet.parameters())
        self.lora_specs = {k: family_targets(spec, family) for k, spec in ((GENERATOR, generator_lora), (FAKE, fake_lora))}
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
        lora_calls.install(_tuner_layers(unet))  # our call path: rows routed to adapters, the merged form on CPU
        self.one_call_roles = True  # the DM loss's real and fake scores in one UNet call (train.one_call_roles)
        self.fake_guidance, self.fake_conditioning = 0.0, "text"  # the DM loss's fake score (dm_fake_rows)
        self._activate(GENERATOR)
        if gradient_checkpointing:  # the VAE too: LPIPS regression backpropagates through its decoder
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_pinning_adapters)
            vae.enable_gradient_checkpointing()
        if family.network[0] == "unet":  # SDPA (SD3's joint attention uses SDPA already)
            from diffusers.models.attention_processor import AttnProcessor2_0
            unet.set_attn_processor(AttnProcessor2_0())
        self._uncond = None
        self._bottleneck = bottleneck  # compiled by compile()

    @classmethod
    def from_pretrained(cls, path: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                        vae: Optional[str] = None, text_encoders: bool = True, **kw):
        """Load a teacher of any supported family (refused in one line otherwise); ``vae``: a separately saved VAE
        (e.g. an fp16-safe SDXL VAE) instead of the pipeline's."""
        index = model_index(path, revision)  # once: the family, and SDXL's force_zeros_for_empty_prompt
        family = detect_family(path, revision, index)
        comps = family.load_components(path, revision, variant, kw.get("weight_dtype", torch.float32), vae,
                                       text_encoders)
        return cls(comps, family, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True), **kw)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _activate(self, name: str) -> None:
        """Route the UNet through adapter ``name``. peft's set_adapter also turns requires_grad off for the
        other adapter, which would silently drop gradients of a graph built before the switch; we keep
        every LoRA parameter trainable and let each turn's optimiser decide what moves."""
        self.unet.enable_adapters()
        self.unet.set_adapter(name)
        for p in self._lora_params:
            p.requires_grad_(True)

    def set_lora_merge(self, on: bool) -> None:
        """train.lora_merge: let each LoRA layer take the merged form where it is exact and cheaper (lora_calls)."""
        lora_calls.set_merge(_tuner_layers(self.unet), on)

    # ----- parameters ---------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n]

    def adapter_named_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n}

    def describe(self) -> str:
        return describe(self)

    # ----- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The conditioning of ``prompts``, one tensor per sample, as the family's pipeline encodes them (SD: CLIP's
        last hidden state; SDXL: both encoders, the pooled embedding and time ids packed in)."""
        return self.text.encode(prompts)

    @property
    def uncond_embedding(self) -> torch.Tensor:
        """CFG's unconditional conditioning, as the family's pipeline makes it without a negative prompt, computed
        once."""
        if self._uncond is None:
            self._uncond = self.text.uncond()
        return self._uncond

    # ----- the three denoisers ------------------------------------------------------------------
    def _predict(self, adapter: Optional[str], rows: Optional[list] = None):
        return unet_predictor(self, adapter, rows)

    def real_denoiser(self, guidance_scale: Optional[float] = None):
        """Teacher x0 with CFG; runs under no_grad always."""
        scale = self.real_guidance_scale if guidance_scale is None else guidance_scale
        cfg = CFGDenoiser(self._denoiser(None), scale, self.uncond_embedding)

        def real(x_t, t, cond):
            with torch.no_grad():
                return cfg(x_t, t, cond)

        return real

    def _denoiser(self, adapter: Optional[str]) -> PredictionDenoiser:
        return PredictionDenoiser(self._predict(adapter), self.schedule, self.prediction_type)

    def fake_denoiser(self):
        return self._denoiser(FAKE)

    def dm_denoisers(self):
        """The DM loss's (real, fake) denoisers: in one UNet call with ``one_call_roles`` (:func:`one_call_denoisers`)."""
        return one_call_denoisers(self) if self.one_call_roles else (self.real_denoiser(), dm_fake_denoiser(self))

    def generator_denoiser(self):
        return self._denoiser(GENERATOR)

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
        side = resolution // self.vae_factor
        probe = torch.zeros(1, self.unet.config.in_channels, side, side, device=self.device, dtype=self.unet.dtype)
        with torch.no_grad():
            t = self.schedule.model_timestep(torch.zeros(1, device=self.device, dtype=torch.long))
            h = bottleneck(self.unet, probe, t, **self.text.unet_kwargs(self.uncond_embedding))
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
            off = [(layer, (layer._active_adapter, True, None)) for layer in _tuner_layers(self.unet)]
            routing = _adapter_state(off) if features == "teacher" else contextlib.nullcontext()
            with routing, torch.set_grad_enabled(features_grad and torch.is_grad_enabled()):
                h = self._bottleneck(self.unet, x, self.schedule.model_timestep(t), **self.text.unet_kwargs(cond))
            return head(h)

        return disc

    # ----- decoding -----------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] with the full VAE (differentiable): latents / scaling_factor + shift_factor."""
        sf, shift = self.vae.config.scaling_factor, getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode((latents / sf + shift).to(self.vae.dtype)).sample.float()
