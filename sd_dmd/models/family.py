"""Teacher families: what differs between SD 1.x/2.x and SDXL teachers, in one small object each.

A family says how a teacher is loaded (its pipeline class and components), how prompts become conditioning, how the
UNet is called with it, and which pipeline pairs, sampling, evaluation and export use. Everything else (the losses,
the training step, the store) is the same for every family: the losses take denoiser callables, and the conditioning
travels between them as **one tensor per sample** (:class:`SDXLText` packs SDXL's pooled embedding and time ids into
extra rows after the text tokens, so batching, CFG's concatenation and micro-batch splits need no family code).

The prediction type (epsilon or v) is not a family: both SD 1.x/2.x and SDXL teachers can have either, and
:class:`~sd_dmd.core.denoisers.PredictionDenoiser` converts each to x0.

Families: ``sd`` (``StableDiffusionPipeline``: SD 1.x, SD 2.x base and 768-v), ``sdxl``
(``StableDiffusionXLPipeline``) and ``sd3`` (``StableDiffusion3Pipeline``: SD3 and SD3.5, a flow-matching MMDiT; its
prediction type is ``flow`` and its schedule :class:`~sd_dmd.core.schedule.FlowMatchSchedule`). Anything else is
refused before anything is written (:func:`detect_family`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.errors import ModelError

SUPPORTED = ("SD 1.x/2.x (StableDiffusionPipeline, epsilon or v-prediction), SDXL (StableDiffusionXLPipeline, "
             "epsilon or v-prediction) and SD3/SD3.5 (StableDiffusion3Pipeline, flow matching)")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """A teacher's parts, as its pipeline holds them."""

    unet: object  # the denoising network: a UNet (SD, SDXL) or a transformer (SD3), shared by the three roles
    vae: object
    text_encoders: list  # one (SD) or two (SDXL), in the pipeline's order
    tokenizers: list
    scheduler: object


# ----- conditioning: prompts -> one tensor per sample, and back to the UNet's keyword arguments --------------------
def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's context (77), as both pipelines' ``encode_prompt``."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class SDText:
    """SD 1.x/2.x: the text encoder's last hidden state, as ``StableDiffusionPipeline.encode_prompt`` (77 tokens);
    CFG's unconditional branch is the encoding of ""."""

    def __init__(self, text_encoders: list, tokenizers: list):
        self.text_encoder, self.tokenizer = text_encoders[0], tokenizers[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(_token_ids(self.tokenizer, prompts, self.text_encoder.device))[0]

    def uncond(self) -> torch.Tensor:
        return self.encode([""])

    @staticmethod
    def unet_kwargs(cond: torch.Tensor) -> dict:
        return {"encoder_hidden_states": cond}


def _time_ids(resolution: int) -> list[float]:
    """SDXL's micro-conditioning for a square ``resolution`` image with no crop: original size + crop's top-left +
    target size, as ``StableDiffusionXLPipeline._get_add_time_ids`` with its defaults (height, width, (0, 0))."""
    return [resolution, resolution, 0, 0, resolution, resolution]


def pack_rows(embeds: torch.Tensor, extra: torch.Tensor, rows: int) -> torch.Tensor:
    """``embeds`` (B, L, D) with ``extra`` (B, n) zero-padded into ``rows`` more rows of width D after them."""
    b, width = embeds.shape[0], embeds.shape[-1]
    extra = torch.nn.functional.pad(extra.to(embeds.dtype), (0, rows * width - extra.shape[1]))
    return torch.cat([embeds, extra.view(b, rows, width)], dim=1)


def unpack_rows(cond: torch.Tensor, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_rows` undone: (the tokens, the first ``n`` values of the extra rows)."""
    return cond[:, :-rows], cond[:, -rows:].reshape(cond.shape[0], -1)[:, :n]


class SDXLText:
    """SDXL: both encoders' penultimate hidden states concatenated, ``text_encoder_2``'s pooled (projected) output and
    the six ``time_ids``, exactly as ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` build them.

    The unconditional branch is what the pipeline uses without a negative prompt: zeros for the embeddings and the
    pooled embedding when ``force_zeros_for_empty_prompt`` (SDXL base), else the encoding of "", with the same
    time ids. The three travel as one tensor (B, 77 + k, D): the text tokens, then ``k`` rows holding the pooled
    embedding and the time ids (zero-padded), so every batch operation of the trainer works on it unchanged."""

    def __init__(self, text_encoders: list, tokenizers: list, resolution: int, force_zeros: bool = True,
                 unet=None):
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.time_ids = _time_ids(resolution)
        self.force_zeros = force_zeros
        if text_encoders:
            self.pooled_dim = text_encoders[-1].config.projection_dim
            self.width = sum(te.config.hidden_size for te in text_encoders)
        else:  # no encoders loaded (data.text_cache): the same sizes, as the UNet takes them
            self.pooled_dim = (unet.config.projection_class_embeddings_input_dim
                               - len(self.time_ids) * unet.config.addition_time_embed_dim)
            self.width = unet.config.cross_attention_dim
        self.extra_rows = math.ceil((self.pooled_dim + len(self.time_ids)) / self.width)

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.time_ids, dtype=embeds.dtype, device=embeds.device).expand(embeds.shape[0], -1)
        return pack_rows(embeds, torch.cat([pooled.to(embeds.dtype), ids], dim=1), self.extra_rows)

    def unet_kwargs(self, cond: torch.Tensor) -> dict:
        tokens, extra = unpack_rows(cond, self.extra_rows, self.pooled_dim + len(self.time_ids))
        added = {"text_embeds": extra[:, :self.pooled_dim], "time_ids": extra[:, self.pooled_dim:]}
        return {"encoder_hidden_states": tokens, "added_cond_kwargs": added}

    @torch.no_grad()
    def _encode(self, prompts: list[str]):
        hidden, pooled = [], None
        for tok, te in zip(self.tokenizers, self.text_encoders):
            out = te(_token_ids(tok, prompts, te.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output of CLIPTextModelWithProjection
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.pack(*self._encode(prompts))

    def uncond(self) -> torch.Tensor:
        embeds, pooled = self._encode([""])
        if self.force_zeros:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return self.pack(embeds, pooled)


class SD3Text:
    """SD3/SD3.5: CLIP-L's and CLIP-G's penultimate hidden states concatenated and zero-padded to T5's width, then
    T5's tokens (``max_sequence_length``, 256), and the pooled embedding: both CLIPs' projected outputs
    concatenated. Computed by ``StableDiffusion3Pipeline.encode_prompt`` itself (a pipeline object over the same
    components: nothing copied), so it is the pipeline's conditioning by construction, T5-less pipelines (zeros)
    included. The unconditional branch is the encoding of "", as the pipeline makes it without a negative prompt.
    The pooled embedding travels in ``extra_rows`` zero-padded rows after the tokens, as :class:`SDXLText` packs."""

    max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def __init__(self, components: "Components"):
        from diffusers import StableDiffusion3Pipeline

        te = components.text_encoders + [None] * (3 - len(components.text_encoders))
        tok = components.tokenizers + [None] * (3 - len(components.tokenizers))
        self.pipe = StableDiffusion3Pipeline(transformer=components.unet, scheduler=components.scheduler,
                                             vae=components.vae, text_encoder=te[0], tokenizer=tok[0],
                                             text_encoder_2=te[1], tokenizer_2=tok[1], text_encoder_3=te[2],
                                             tokenizer_3=tok[2])
        self.pipe.set_progress_bar_config(disable=True)
        self.pooled_dim = components.unet.config.pooled_projection_dim  # CLIP-L's + CLIP-G's projections
        self.width = components.unet.config.joint_attention_dim
        self.extra_rows = math.ceil(self.pooled_dim / self.width)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return pack_rows(embeds, pooled, self.extra_rows)

    def uncond(self) -> torch.Tensor:
        return self.encode([""])

    def unet_kwargs(self, cond: torch.Tensor) -> dict:
        tokens, pooled = unpack_rows(cond, self.extra_rows, self.pooled_dim)
        return {"encoder_hidden_states": tokens, "pooled_projections": pooled}


# ----- the families ------------------------------------------------------------------------------------------------
# SD3's LoRA targets: every attention projection of the joint blocks (image and text streams, and SD3.5-Medium's
# second image attention `attn2`) and both streams' MLPs; the names diffusers' SD3 LoRA training script adapts, with
# the MLPs, all of which StableDiffusion3Pipeline.load_lora_weights loads
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


@dataclass(frozen=True)
class Family:
    name: str  # "sd", "sdxl" or "sd3"
    pipeline: str  # the diffusers pipeline class
    text_encoders: tuple  # (folder, transformers class) per text encoder, in the pipeline's order
    tokenizers: tuple  # (folder, transformers class) per tokenizer
    network: tuple = ("unet", "UNet2DConditionModel")  # the denoising network's folder and diffusers class
    scheduler: str = "DDPMScheduler"  # the training scheduler built from the pipeline's scheduler config
    lora_targets: Optional[tuple] = None  # the family's default LoRA targets (None: LCM-LoRA's UNet list)

    @property
    def flow(self) -> bool:
        return self.scheduler.startswith("FlowMatch")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def from_pretrained_kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments of the family's pipeline (no safety checker for SD)."""
        return {"safety_checker": None, "requires_safety_checker": False} if self.name == "sd" else {}

    def load_pipeline(self, path: str, dtype=None, revision=None, variant=None, **kw):
        """The family's plain pipeline; components it was saved without (:meth:`absent`) passed as None, as diffusers
        asks."""
        kw = {**{k: None for k in self.absent(path, revision)}, **kw}
        return self.pipeline_class().from_pretrained(path, dtype=dtype, revision=revision, variant=variant,
                                                     **self.from_pretrained_kwargs(), **kw)

    def load_components(self, path: str, revision=None, variant=None, dtype=None, vae: Optional[str] = None,
                        text_encoders: bool = True):
        """The network (UNet or transformer), VAE, text encoder(s), tokenizer(s) and the training scheduler with the
        teacher's schedule (DDPM, or flow matching with its shift), each in ``dtype`` as loaded (``dtype=``, not a
        cast afterwards); ``vae``: a separately saved VAE (at its root); ``text_encoders=False``: none loaded (training
        from ``data.text_cache``: T5-XXL alone is 4.7 B parameters)."""
        from sd_dmd.models.vae import load_vae

        import diffusers

        kw = dict(revision=revision)
        weights = dict(kw, variant=variant, dtype=dtype)
        scheduler = getattr(diffusers, self.scheduler).from_pretrained(path, subfolder="scheduler", **kw)
        self.prediction_type(scheduler.config, path)
        folder, cls = self.network
        unet = getattr(diffusers, cls).from_pretrained(path, subfolder=folder, **weights)
        vae = (load_vae(vae, dtype=dtype, root=True) if vae else
               diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **weights))
        encoders, tokenizers = self._load_text(path, revision, variant, dtype, text_encoders)
        return Components(unet, vae, encoders, tokenizers, scheduler)

    def _load_text(self, path: str, revision, variant, dtype, encoders: bool = True) -> tuple[list, list]:
        """The text encoders (none with ``encoders=False``) and tokenizers, without those the pipeline was saved
        without (:meth:`absent`)."""
        import transformers

        absent = self.absent(path, revision)
        kw = dict(revision=revision)
        loaded = [getattr(transformers, c).from_pretrained(path, subfolder=sub, **kw, variant=variant, dtype=dtype)
                  for sub, c in self.text_encoders if sub not in absent] if encoders else []
        tokenizers = [getattr(transformers, c).from_pretrained(path, subfolder=sub, **kw)
                      for sub, c in self.tokenizers if sub not in absent]
        return loaded, tokenizers

    def absent(self, path: str, revision=None, index: Optional[dict] = None) -> set:
        """The optional components the pipeline was saved without (``[null, null]`` in its ``model_index.json``):
        SD3's T5 (``text_encoder_3``, ``tokenizer_3``), whose tokens the pipeline then makes zeros."""
        if self.name != "sd3":
            return set()
        index = model_index(path, revision) if index is None else index
        return {k for k in ("text_encoder_3", "tokenizer_3") if k in index and not any(index[k])}

    def load_text_components(self, path: str, revision=None, variant=None, dtype=None) -> Components:
        """What encoding prompts needs: the text encoders and tokenizers, the scheduler, and the network built from
        its config on the meta device (its sizes only: no weights read or allocated); no VAE."""
        import diffusers
        from accelerate import init_empty_weights

        kw = dict(revision=revision)
        folder, cls = self.network
        net_cls = getattr(diffusers, cls)
        with init_empty_weights():
            net = net_cls.from_config(net_cls.load_config(path, subfolder=folder, **kw))
        encoders, tokenizers = self._load_text(path, revision, variant, dtype)
        scheduler = getattr(diffusers, self.scheduler).from_pretrained(path, subfolder="scheduler", **kw)
        return Components(net, None, encoders, tokenizers, scheduler)

    def prediction_type(self, scheduler_config, path: str) -> str:
        """What the network predicts: ``flow`` (the velocity) for a flow-matching family, else the scheduler's
        epsilon or v_prediction (:func:`check_prediction_type`)."""
        return "flow" if self.flow else check_prediction_type(scheduler_config, path)

    def conditioner(self, components: Components, resolution: int, force_zeros: bool = True):
        if self.name == "sd3":
            return SD3Text(components)
        if self.name == "sdxl":
            return SDXLText(components.text_encoders, components.tokenizers, resolution, force_zeros, components.unet)
        return SDText(components.text_encoders, components.tokenizers)

    def folders(self) -> tuple:
        return (self.network[0], "vae", "scheduler") + tuple(s for s, _ in self.text_encoders + self.tokenizers)


SD = Family("sd", "StableDiffusionPipeline", (("text_encoder", "CLIPTextModel"),), (("tokenizer", "CLIPTokenizer"),))
SDXL = Family("sdxl", "StableDiffusionXLPipeline",
              (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
              (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer")))
SD3 = Family("sd3", "StableDiffusion3Pipeline",
             (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
              ("text_encoder_3", "T5EncoderModel")),
             (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer"), ("tokenizer_3", "T5TokenizerFast")),
             network=("transformer", "SD3Transformer2DModel"), scheduler="FlowMatchEulerDiscreteScheduler",
             lora_targets=SD3_LORA_TARGETS)
FAMILIES = {SD.pipeline: SD, SDXL.pipeline: SDXL, SD3.pipeline: SD3}


def model_index(path: str, revision: Optional[str] = None) -> dict:
    p = Path(path)
    if p.is_dir():
        f = p / "model_index.json"
        if not f.is_file():
            missing = [s for s in SD.folders() if not (p / s).is_dir()]
            raise ModelError(f"{path}: " + (f"missing {'/, '.join(missing)}/ and " if missing else "") +
                             "no model_index.json (not a diffusers pipeline)")
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{f}: not valid JSON ({e})") from None
    if p.exists():
        raise ModelError(f"{path}: not a directory (expected a diffusers pipeline)")
    if path.startswith((".", "/")) or path.count("/") > 1:
        raise ModelError(f"{path}: no such model directory")
    try:  # a hub id: its model_index.json only (cached, or fetched when online)
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())
    except Exception as e:  # offline and not cached, no such repo...
        raise ModelError(f"{path}: cannot read its model_index.json ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None


def detect_family(path: str, revision: Optional[str] = None, index: Optional[dict] = None) -> Family:
    """The family of the pipeline at ``path`` (a directory or hub id), from its ``model_index.json`` (read here
    unless ``index`` is given); another pipeline (SD3, Flux, PixArt, a DiT...) or a missing folder is refused in one
    line naming its classes."""
    index = model_index(path, revision) if index is None else index
    cls = index.get("_class_name", "?")
    family = FAMILIES.get(cls)
    if family is None:
        net = next((f"{k}: {v[1]}" for k in ("unet", "transformer", "prior") if isinstance(v := index.get(k), list)
                    and len(v) > 1), "no UNet")
        raise ModelError(f"{path}: a {cls} ({net}) is not supported; supported teacher families: {SUPPORTED}")
    if Path(path).is_dir():
        absent = family.absent(path, revision, index)
        missing = [s for s in family.folders() if s not in absent and not (Path(path) / s).is_dir()]
        if missing:
            raise ModelError(f"{path}: missing {'/, '.join(missing)}/ (a {cls} needs {'/, '.join(family.folders())}/)")
    return family


def check_prediction_type(scheduler_config, path: str) -> str:
    """The teacher's prediction type (epsilon or v_prediction); another (``sample``...) is refused."""
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ModelError(f"{path}: scheduler prediction_type is '{pred}'; supported: {', '.join(PREDICTION_TYPES)}")
    return pred

