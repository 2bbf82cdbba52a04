"""What a run writes besides checkpoints: validation grids, and ``final/`` (the generator LoRA in diffusers and
kohya form, its samples, the model card)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sd_dmd.models.lora import KOHYA_FILE, export_kohya, save_lora
from sd_dmd.models.shared_unet import GENERATOR
from sd_dmd.outputs.model_card import write_model_card


@torch.no_grad()
def validation_grid(t, tag: str) -> Optional[Path]:
    if not t.acc.is_main_process:
        return None
    from PIL import Image

    from sd_dmd.outputs.sample import labelled_grid

    lg = t.cfg.logging
    m = t.model
    rows = []
    for seed in lg.validation_seeds:
        cond = m.encode_prompts(lg.validation_prompts)
        z = torch.stack([torch.randn(t.latent_shape, generator=torch.Generator().manual_seed(seed * 1000 + i))
                         for i in range(len(lg.validation_prompts))]).to(t.acc.device)
        with t.acc.autocast():  # the few-step sampler's re-noising draws from a generator seeded per row
            x = m.sample(z, cond, t.cfg.dmd.generator_timesteps,
                         torch.Generator(t.acc.device).manual_seed(seed))
            img = m.decode(x)
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        rows.append([Image.fromarray(a) for a in arr])
    path = t.out / "validation" / f"{tag}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(t.cfg.dmd.generator_timesteps)  # one row per seed, one column per prompt, cells >= 96 px
    labels = [f"seed {seed} · student · {n} step{'s' if n > 1 else ''}" for seed in lg.validation_seeds]
    grid = labelled_grid(rows, labels, list(lg.validation_prompts))
    grid.save(path)
    if lg.tracker == "tensorboard":
        tb = t.acc.get_tracker("tensorboard", unwrap=True)
        tb.add_image("validation", np.asarray(grid), t.step, dataformats="HWC")
    return path


def export_final(t) -> Path:
    final = t.out / "final"
    if not t.acc.is_main_process:
        return final
    if t.ema is not None:
        t.ema.store(t.gen_params)
        t.ema.copy_to(t.gen_params)
    save_lora(t.model, final, GENERATOR)
    export_kohya(t.model, final / KOHYA_FILE, GENERATOR)
    grid = validation_grid(t, "final")
    if t.ema is not None:
        t.ema.restore(t.gen_params)
    if grid is not None:  # inside final/, so the folder can be copied or uploaded as it is
        shutil.copyfile(grid, final / "samples.png")
    write_model_card(t.cfg, final, t.history, grid is not None, t.model.family.pipeline)
    from sd_dmd.outputs.report import save_final_curves  # final/curves.png, final/history.json (sd_dmd.report)

    save_final_curves(final, t.history, t.log)
    return final
