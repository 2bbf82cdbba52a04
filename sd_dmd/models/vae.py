"""The VAE that turns real images into the latents DMD2's GAN reads: loading it, recognising it again (a store made
by one VAE is refused by a model with another), and its posterior sample with a per-item seed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sd_dmd.errors import LatentsError


# ----- the VAE ---------------------------------------------------------------------------------------------------
def load_vae(path: str, revision: Optional[str] = None, variant: Optional[str] = None,
             dtype: torch.dtype = torch.float32, root: bool = False):
    """``AutoencoderKL.from_pretrained(path, subfolder="vae")`` (or a VAE directory itself); ``root``: the VAE is at
    the top of ``path`` (a separately saved VAE, e.g. an fp16-safe SDXL VAE on the hub)."""
    from diffusers import AutoencoderKL

    p, sub = Path(path), None if root else "vae"
    if p.exists() and not root:
        if not (p / "vae").is_dir():
            if not (p / "config.json").is_file():
                raise LatentsError(f"{path}: no 'vae/' folder; expected a diffusers pipeline or a VAE directory")
            sub = None
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=sub, revision=revision, variant=variant, dtype=dtype)
    except Exception as e:  # offline hub id, corrupt weights...
        raise LatentsError(f"{path}: cannot load the VAE ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def vae_identity(vae) -> dict:
    """How a store recognises its VAE: a hash of its config and a probe of its weights (as pairs.teacher_identity:
    the first value of the first 64 tensors, compared with a tolerance, so fp32/fp16/bf16 copies match)."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    probe = [float(p.detach().flatten()[0].float()) for _, p in zip(range(64), vae.parameters())]
    return {"vae_config_sha256": sha, "vae_probe": probe}


def same_vae(a: dict, b: dict) -> bool:
    return a.get("vae_config_sha256") == b.get("vae_config_sha256") and np.allclose(
        a.get("vae_probe", []), b.get("vae_probe", []), rtol=1e-2, atol=1e-3)


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """SD-scaled fp32 latents (CPU) of images in [-1, 1]: ``(latent_dist.sample(gens) - shift) * scaling_factor``
    with one CPU generator per image seeded by ``seeds`` (the noise of ``randn_tensor`` for a list of CPU
    generators, drawn in fp32 whatever the VAE's dtype)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=torch.Generator("cpu").manual_seed(int(s)))
                       for s in seeds]).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean + std * eps - shift) * vae.config.scaling_factor).cpu()
