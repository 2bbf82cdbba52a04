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


def to_pil(images: torch.Tensor) -> list:
    """Images [N, 3, H, W] in [-1, 1] -> N PIL RGB images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def save_grid(images: torch.Tensor, path, nrow: int, row_labels: Optional[list[str]] = None,
              col_labels: Optional[list[str]] = None, min_cell: int = 96, **labelled) -> None:
    """``images`` [N, 3, H, W] in [-1, 1], ``nrow`` to a row. With ``row_labels`` (one per row; ``col_labels``, one
    per column, optional; ``labelled``: its other keywords): :func:`sd_dmd.outputs.sample.labelled_grid`, cells
    enlarged to ``min_cell`` px; without: the bare torchvision grid."""
    if row_labels is None:
        from torchvision.utils import save_image

        save_image((images + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=0.5)
        return
    from sd_dmd.outputs.sample import labelled_grid

    pil = to_pil(images)
    labelled_grid([pil[i:i + nrow] for i in range(0, len(pil), nrow)], row_labels, col_labels,
                  min_cell=min_cell, **labelled).save(str(path))
