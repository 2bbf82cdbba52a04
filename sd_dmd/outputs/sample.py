"""One-step (and few-step) sampling with a plain diffusers pipeline and the distilled LoRA.

    python -m sd_dmd.sample --model PATH_OR_ID --lora LORA --prompt "..." [--seed N] [--num_images K] \
        [--height H --width W] --out FILE.png

``--lora`` takes any of the layouts training writes (:func:`resolve_lora`): the run directory (its ``final/``),
``final/`` itself, a ``checkpoint-N/`` directory (its ``generator/``), or a ``.safetensors`` file such as
``final/lora_kohya.safetensors`` (kohya keys, which diffusers' ``load_lora_weights`` converts).
LCMScheduler with ``timesteps=[999]`` (or DDIM with trailing spacing) and ``guidance_scale=0`` give
exactly x = G(z); default DDIM/Euler spacing would run the UNet at t=1 (DESIGN.md, "Inference").
A few-step generator (``dmd.generator_timesteps``) samples with LCMScheduler at those timesteps; training writes
them beside the LoRA (``sd_dmd_sampling.json``), and ``--timesteps`` defaults to them.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.core.schedule import lcm_timesteps_error
from sd_dmd.models.lora import LoraSource, resolve_lora


def one_step_pipeline(model: str, lora: str | LoraSource | None = None, scheduler: str = "lcm", dtype=torch.float32,
                      device: str = "cpu", revision: str | None = None, variant: str | None = None,
                      fuse: bool = False, channels_last: bool = False):
    """A ``StableDiffusionPipeline`` set up for one-step sampling with the LoRA loaded (any :func:`resolve_lora` form).

    ``fuse`` merges the LoRA into the UNet weights (no LoRA branches at run time) and ``channels_last`` changes the
    UNet/VAE memory format: the two speed-ups that ``benchmarks/latency.py`` measured and kept (docs/BENCHMARKS.md).
    """
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, revision=revision, variant=variant,
                                                   safety_checker=None, requires_safety_checker=False)
    if lora is not None:
        (lora if isinstance(lora, LoraSource) else resolve_lora(lora)).load_into(pipe)
    if scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddim_trailing":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                                   set_alpha_to_one=True)
    else:
        raise ValueError(f"unknown scheduler '{scheduler}' (lcm or ddim_trailing)")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if fuse and lora is not None:
        pipe.fuse_lora()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def lcm_original_steps(timesteps, num_train_timesteps: int = 1000) -> Optional[int]:
    """``LCMScheduler``'s ``original_inference_steps`` whose grid (t = j * num_train_timesteps // n - 1) holds every
    one of ``timesteps``, or None when no grid does. With its default (50: 19, 39, ..., 999) the scheduler warns
    that [999, 749, 499, 249] leaves its grid; the timesteps it runs are the same either way."""
    step = math.gcd(*(int(t) + 1 for t in timesteps))
    return num_train_timesteps // step if num_train_timesteps % step == 0 else None


def fit_lcm_grid(scheduler, timesteps) -> None:
    """Set an ``LCMScheduler``'s ``original_inference_steps`` to :func:`lcm_original_steps` of ``timesteps``: only
    its off-grid warning depends on it. Other schedulers are left as they are."""
    from diffusers import LCMScheduler

    if isinstance(scheduler, LCMScheduler):
        n = lcm_original_steps(timesteps, scheduler.config.num_train_timesteps)
        if n is not None and n != scheduler.config.original_inference_steps:
            scheduler.register_to_config(original_inference_steps=n)


def call_kwargs(pipe, timesteps: list[int] = (999,)) -> dict:
    """Pipeline kwargs that run the generator at ``timesteps`` (LCMScheduler: x0 at each, re-noised to the next
    with fresh noise) with no CFG. DDIM with trailing spacing reaches t = 999 for one step only.

    Raises ConfigError (a ValueError) for LCM timesteps where the scheduler's sample is not the generator's x0
    (:func:`lcm_timesteps_error`)."""
    from diffusers import LCMScheduler

    from sd_dmd.config import ConfigError

    timesteps = [int(t) for t in timesteps]
    if isinstance(pipe.scheduler, LCMScheduler):
        err = lcm_timesteps_error(timesteps, pipe.scheduler.config.timestep_scaling)
        if err:
            raise ConfigError(f"timesteps: {err}")
        fit_lcm_grid(pipe.scheduler, timesteps)
        return dict(num_inference_steps=len(timesteps), timesteps=timesteps, guidance_scale=0.0)
    if len(timesteps) > 1:
        raise ValueError(f"a {len(timesteps)}-step generator samples with LCMScheduler (timesteps={timesteps}); "
                         "ddim_trailing runs one step only")
    return dict(num_inference_steps=1, guidance_scale=0.0)


def one_step_call_kwargs(pipe, conditioning_timestep: int = 999) -> dict:
    """Pipeline kwargs that run the UNet once at t* with no CFG."""
    return call_kwargs(pipe, [conditioning_timestep])


@torch.inference_mode()
def one_step_generate(pipe, prompt: str | list[str], *, latents: torch.Tensor | None = None, generator=None,
                      conditioning_timestep: int = 999, output_type: str = "pil"):
    """Images x = decode(G(z)) from the pipeline's components, without the pipeline's per-call machinery (input
    checks, scheduler set-up, the module walk of ``_execution_device``): the same images as
    ``pipe(prompt, **one_step_call_kwargs(pipe))`` (tests/test_model.py), 22-29% faster for the digits model on
    CPU (docs/BENCHMARKS.md, latency).

    ``latents`` (B, 4, h, w) or ``generator`` (one or a list, as in diffusers) give the noise z.
    """
    from diffusers.utils.torch_utils import randn_tensor

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    unet = pipe.unet
    # diffusers' ``_execution_device`` walks every module looking for offload hooks (7.8 ms per call for the
    # digits model with a LoRA, on CPU): ask the UNet unless accelerate's offloading hooks are in place
    device = pipe._execution_device if hasattr(unet, "_hf_hook") else unet.device
    emb, _ = pipe.encode_prompt(prompts, device, 1, False)
    if latents is None:
        side = unet.config.sample_size
        latents = randn_tensor((len(prompts), unet.config.in_channels, side, side), generator=generator,
                               device=device, dtype=emb.dtype)
    from sd_dmd.core.schedule import NoiseSchedule

    z = latents.to(device, emb.dtype)
    t = torch.full((z.shape[0],), conditioning_timestep, device=device)
    eps = unet(z, t, encoder_hidden_states=emb).sample
    x0 = NoiseSchedule.from_scheduler(pipe.scheduler).eps_to_x0(z, eps, t).to(z.dtype)
    if output_type == "latent":
        return x0
    image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type=output_type)


def image_grid(images, cols: int | None = None):
    """Paste PIL images into one grid image."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def main(argv=None):
    p = argparse.ArgumentParser(description="One-step text-to-image with a distilled DMD LoRA.")
    p.add_argument("--model", required=True, help="diffusers SD pipeline path or hub id (the teacher)")
    p.add_argument("--lora", default=None, help="run directory (uses final/), final/, checkpoint-N/ (uses "
                   "generator/) or a LoRA .safetensors file (diffusers or kohya keys)")
    p.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's, 512 for SD1.5)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--scheduler", default="lcm", choices=["lcm", "ddim_trailing"])
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="sampling timesteps (default: the ones training recorded beside the LoRA, else 999)")
    p.add_argument("--conditioning_timestep", type=int, default=None, help="one step at this t (= --timesteps T)")
    p.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--fast", action="store_true", help="fuse the LoRA into the UNet and use channels_last")
    p.add_argument("--out", required=True, type=Path, help="output PNG (a grid when several images)")
    args = p.parse_args(argv)
    for side in ("height", "width"):
        v = getattr(args, side)
        if v is not None and (v <= 0 or v % 8):
            p.error(f"--{side}: must be a positive multiple of 8, got {v}")
    from sd_dmd.cli import guarded
    from sd_dmd.models.shared_unet import DTYPES

    lora = guarded(resolve_lora, args.lora) if args.lora is not None else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = one_step_pipeline(args.model, lora, args.scheduler, DTYPES[args.dtype], device, fuse=args.fast,
                             channels_last=args.fast)
    timesteps = (args.timesteps or ([args.conditioning_timestep] if args.conditioning_timestep is not None else None)
                 or (lora.timesteps if lora is not None else None) or [999])
    if any(not 0 <= t <= 999 for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        p.error(f"--timesteps: need decreasing timesteps in [0, 999], got {timesteps}")
    lcm_err = args.scheduler == "lcm" and lcm_timesteps_error(timesteps, pipe.scheduler.config.timestep_scaling)
    if lcm_err:
        p.error(f"--timesteps: {lcm_err}")
    print(f"loaded LoRA {lora}" if lora is not None else "no LoRA: sampling the base model")
    print(f"sampling {len(timesteps)} step(s) at timesteps {timesteps}, guidance 0")
    images = []
    for i, prompt in enumerate(args.prompt):
        g = [torch.Generator("cpu").manual_seed(args.seed + i * args.num_images + k) for k in range(args.num_images)]
        images += pipe([prompt] * args.num_images, generator=g, height=args.height, width=args.width,
                       **guarded(call_kwargs, pipe, timesteps)).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images, cols=args.num_images)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
