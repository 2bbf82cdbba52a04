"""What a run writes besides checkpoints: validation grids, and ``final/`` (the generator LoRA in diffusers and
kohya form, its samples, the model card)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.models.lora import KOHYA_FILE, export_kohya, save_lora
from sd_dmd.models.shared_unet import GENERATOR
from sd_dmd.outputs.hub import try_push
from sd_dmd.outputs.model_card import write_model_card
from sd_dmd.training.tracking import log_image, log_text


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
    # the labelled grid; the final one (final/samples.png) under its own name: W&B keeps one value per key and step
    log_image(t.acc, "samples" if tag == "final" else "validation", grid, t.step, t.log)
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
    hub = t.cfg.hub
    write_model_card(t.cfg, final, t.history, grid is not None, t.model.family.pipeline,
                     repo_id=hub.model_id if hub.push else None)
    _final_report(t, final)
    if hub.push:  # last, with every file on disk: an upload that fails loses nothing
        try_push(final, hub.model_id, t.log, private=hub.private, token=hub.token)
    return final


def _final_report(t, final: Path) -> None:
    """final/curves.png and final/history.json (sd_dmd.report), and both the picture and the health report in the
    tracker."""
    from PIL import Image

    from sd_dmd.outputs.report import check_health, format_report, save_final_curves, split_history

    curves = save_final_curves(final, t.history, t.log)
    if t.cfg.logging.tracker == "none":
        return
    if curves is not None:
        with Image.open(curves) as im:
            log_image(t.acc, "curves", im.copy(), t.step, t.log)
    entries, _ = split_history(t.history)
    if entries:
        log_text(t.acc, "health", format_report(check_health(t.history), final.parent.name, len(entries)), t.step,
                 t.log)
