"""Image sets for the digits metrics: the teacher at N steps, or a one-step (LoRA) generator."""
from __future__ import annotations

from typing import Optional

import torch

from sd_dmd.outputs.sample import fit_lcm_grid
from sd_dmd.data.digits import RESOLUTION, prompt_for


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed * 1_000_003 + i) for i in range(n)]


@torch.no_grad()
def sample_digits(pipe, n_per_class: int, seed: int, steps: int, guidance: float,
                  timesteps: Optional[list[int]] = None, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images per digit from ``pipe`` (any StableDiffusionPipeline set-up).

    Returns (images [N, 3, 32, 32] in [-1, 1], labels [N]); image i uses its own seeded generator.
    """
    labels = torch.arange(10).repeat_interleave(n_per_class)
    prompts = [prompt_for(int(k)) for k in labels]
    gens = _generators(len(prompts), seed)
    out = []
    for i in range(0, len(prompts), batch):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                  output_type="pt", generator=gens[i:i + batch])
        if timesteps is not None:
            fit_lcm_grid(pipe.scheduler, timesteps)
            kw["timesteps"] = timesteps
        out.append(pipe(prompts[i:i + batch], **kw).images * 2 - 1)
    return torch.cat(out).float().cpu(), labels


def teacher_pipeline(model_dir: str, scheduler: str = "pndm"):
    from sd_dmd.models.teacher import teacher_pipeline as tp

    return tp(str(model_dir), scheduler, torch.float32, "cpu")


def one_step(model_dir: str, lora: Optional[str]):
    from sd_dmd.outputs.sample import one_step_pipeline

    return one_step_pipeline(str(model_dir), lora)


def save_grid(images: torch.Tensor, path, nrow: int) -> None:
    from torchvision.utils import save_image

    save_image((images + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=0.5)
