"""The teacher as a plain diffusers pipeline: the 50-step sampler of the regression pairs and of evaluation."""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager

import numpy as np
import torch

from sd_dmd.errors import PairsError


def resolve_scheduler(family, scheduler: str, path: str) -> str:
    """``auto``: PNDM (the paper's) for DDPM families, ``euler`` (the pipeline's own FlowMatchEulerDiscreteScheduler)
    for flow-matching ones; a DDPM sampler for a flow teacher, or Euler for a DDPM one, is refused."""
    if scheduler == "auto":
        return "euler" if family.flow else "pndm"
    if family.flow != (scheduler == "euler"):
        raise PairsError(f"{path}: a {family.pipeline} samples with --scheduler "
                         f"{'euler' if family.flow else 'pndm or ddim'}, not {scheduler}")
    return scheduler


def network(pipe):
    """The pipeline's denoising network: its UNet, or its transformer (SD3)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def teacher_pipeline(path: str, scheduler: str, dtype: torch.dtype, device, revision=None, variant=None):
    """The plain diffusers pipeline of the teacher's family (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline``) used as the 50-step teacher: PNDM as in the paper, or DDIM, epsilon or
    v-prediction; SD3 with its own flow-matching Euler (:func:`resolve_scheduler`). The sampler used is
    ``pipe.sd_dmd_scheduler``."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from sd_dmd.models.family import detect_family

    family = detect_family(path, revision)
    scheduler = resolve_scheduler(family, scheduler, path)
    pipe = family.load_pipeline(path, dtype, revision, variant)
    family.prediction_type(pipe.scheduler.config, path)
    pipe.sd_dmd_scheduler = scheduler
    if scheduler == "euler":
        pass  # the pipeline's own FlowMatchEulerDiscreteScheduler, with its shift
    elif scheduler == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    else:
        raise PairsError(f"unknown scheduler '{scheduler}' (auto, pndm, ddim or euler)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def teacher_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
                    resolution: int) -> torch.Tensor:
    """The teacher's final latents from the given noise: exactly ``pipe(..., output_type="latent")``."""
    return pipe(prompts, latents=noise.to(pipe.device, network(pipe).dtype), num_inference_steps=steps,
                guidance_scale=guidance, height=resolution, width=resolution, output_type="latent").images


@contextmanager
def quiet_truncation_warning(pipe):
    """Drop diffusers' per-call "The following part of your input was truncated ..." warning (it prints the whole
    cut-off text, KBs of <|endoftext|> per long LAION caption) and transformers' "Token indices sequence length is
    longer ... will result in indexing errors" (false here: the pipeline truncates); truncations are counted in the
    summary instead. Only these two messages, from these two loggers, while pairs are generated."""

    class _Drop(logging.Filter):
        def __init__(self, prefix):
            super().__init__()
            self.prefix = prefix

        def filter(self, record):
            return not str(record.msg).startswith(self.prefix)

    from transformers import PreTrainedTokenizerBase  # its module's logger warns about long sequences

    drops = [(logging.getLogger(type(pipe).__module__), _Drop("The following part of your input was truncated")),
             (logging.getLogger(PreTrainedTokenizerBase.__module__),
              _Drop("Token indices sequence length is longer than the specified maximum"))]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)


def count_truncated(tokenizer, prompts: list[str]) -> int:
    """Prompts longer than the text encoder's context (77 tokens with BOS/EOS), which SD truncates."""
    n = tokenizer.model_max_length
    return sum(len(ids) > n for ids in tokenizer(prompts, truncation=True, max_length=n + 1).input_ids)


def teacher_identity(unet) -> dict:
    """How a store recognises its teacher (or a text cache its text encoders): a hash of the network's config (a
    diffusers one, or a transformers one without its dtype and version) and a probe of base weights.

    The probe (first weight value of the first 64 base tensors) is compared with a tolerance, so the
    same teacher held in fp32, fp16 or bf16 matches while another checkpoint does not.
    """
    config = unet.config.to_dict() if hasattr(unet.config, "to_dict") else dict(unet.config)
    cfg = {k: v for k, v in config.items()
           if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    probe = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            continue
        probe.append(float(p.detach().flatten()[0].float()))
        if len(probe) == 64:
            break
    return {"teacher_config_sha256": sha, "teacher_probe": probe}


def same_teacher(a: dict, b: dict) -> bool:
    return a["teacher_config_sha256"] == b["teacher_config_sha256"] and np.allclose(
        a["teacher_probe"], b["teacher_probe"], rtol=1e-2, atol=1e-3)
