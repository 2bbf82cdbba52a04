"""One-step sampling with a plain diffusers pipeline and the distilled LoRA.

    python -m sd_dmd.sample --model PATH_OR_ID --lora DIR --prompt "..." [--seed N] [--num_images K] --out FILE.png

LCMScheduler with ``timesteps=[999]`` (or DDIM with trailing spacing) and ``guidance_scale=0`` give
exactly x = G(z); default DDIM/Euler spacing would run the UNet at t=1 (DESIGN.md, "Inference").
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def one_step_pipeline(model: str, lora: str | None = None, scheduler: str = "lcm", dtype=torch.float32,
                      device: str = "cpu", revision: str | None = None, variant: str | None = None):
    """A ``StableDiffusionPipeline`` set up for one-step sampling with the LoRA loaded."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, revision=revision, variant=variant,
                                                   safety_checker=None, requires_safety_checker=False)
    if lora is not None:
        pipe.load_lora_weights(lora)
    if scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddim_trailing":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                                   set_alpha_to_one=True)
    else:
        raise ValueError(f"unknown scheduler '{scheduler}' (lcm or ddim_trailing)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def one_step_call_kwargs(pipe, conditioning_timestep: int = 999) -> dict:
    """Pipeline kwargs that run the UNet once at t* with no CFG."""
    from diffusers import LCMScheduler

    if isinstance(pipe.scheduler, LCMScheduler):
        return dict(num_inference_steps=1, timesteps=[conditioning_timestep], guidance_scale=0.0)
    return dict(num_inference_steps=1, guidance_scale=0.0)


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
    p.add_argument("--lora", default=None, help="directory with pytorch_lora_weights.safetensors")
    p.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--scheduler", default="lcm", choices=["lcm", "ddim_trailing"])
    p.add_argument("--conditioning_timestep", type=int, default=999)
    p.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out", required=True, type=Path, help="output PNG (a grid when several images)")
    args = p.parse_args(argv)
    from .model import DTYPES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = one_step_pipeline(args.model, args.lora, args.scheduler, DTYPES[args.dtype], device)
    images = []
    for i, prompt in enumerate(args.prompt):
        g = [torch.Generator("cpu").manual_seed(args.seed + i * args.num_images + k) for k in range(args.num_images)]
        images += pipe([prompt] * args.num_images, generator=g,
                       **one_step_call_kwargs(pipe, args.conditioning_timestep)).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images, cols=args.num_images)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
