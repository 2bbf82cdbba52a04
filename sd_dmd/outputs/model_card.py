"""``final/README.md``: what a user needs to load and sample the distilled LoRA, and how it was made."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sd_dmd.models.lora import KOHYA_FILE
from sd_dmd.outputs.sample import lcm_original_steps

if TYPE_CHECKING:  # the card reads a training run's config; outputs sit below training
    from sd_dmd.training.config import Config


def curve_rows(history: list[dict], keys) -> list[str]:
    """Table rows of the first, middle and last logged steps."""
    if not history:
        return []
    mid = max(1, len(history) // 2)
    pick = {h["step"]: h for h in [history[0]] + history[mid:mid + 1] + [history[-1]]}
    return ["| " + " | ".join([str(step)] + [f"{h[k]:.4g}" if k in h else "-" for k in keys]) + " |"
            for step, h in pick.items()]


def write_model_card(cfg: Config, final: Path, history: list[dict], has_samples: bool) -> None:
    """``final/README.md``: teacher, timesteps, settings, curve summary, and how to load both LoRA files."""
    keys = ("loss_dm", "loss_reg", "loss_fake", "grad_norm_generator")
    notes = [h["note"] for h in history if "note" in h]
    rows = curve_rows([h for h in history if "note" not in h], keys)
    model = cfg.model.pretrained_model_name_or_path
    g = cfg.lora.generator
    ts = list(cfg.dmd.generator_timesteps)
    steps = len(ts)
    grid = lcm_original_steps(ts)  # silences LCMScheduler's "not on the original schedule" warning for several steps
    lcm_kw = f", original_inference_steps={grid}" if steps > 1 and grid is not None else ""
    how = "one step from pure noise" if steps == 1 else f"{steps} steps, LCM re-noising between them"
    gan = (f"on from step {cfg.gan.start_step}, weights G {cfg.gan.generator_weight} / D {cfg.gan.discriminator_weight}, "
           f"real latents `{cfg.gan.real_latents}`" if cfg.gan.real_latents else "off")
    text = f"""---
library_name: diffusers
base_model: {model}
tags: [lora, text-to-image, one-step, dmd, sd_dmd]
---
# One-step DMD LoRA for `{model}`

Distilled with sd_dmd (Distribution Matching Distillation, Yin et al. 2023, arXiv:2311.18828) into a
**one-step** generator: LoRA r={g.rank}, alpha={g.alpha}, on the frozen teacher UNet.

| setting | value |
|---|---|
| teacher | `{model}`{f" (revision {cfg.model.revision})" if cfg.model.revision else ""} |
| sampling timesteps | {ts} ({how}; guidance 0) |
| real-score guidance | {cfg.dmd.real_guidance_scale} |
| DM timesteps | [{cfg.dmd.t_min}, {cfg.dmd.t_max}] |
| fake updates per step | {cfg.dmd.fake_updates_per_step} |
| GAN (DMD2) | {gan} |
| regression | {cfg.regression.loss} (lambda={cfg.regression.weight}, decoder={cfg.regression.decoder}) |
| optimiser | {cfg.optim.optimizer}, lr G {cfg.optim.lr_generator} / fake {cfg.optim.lr_fake} |
| steps x batch | {cfg.train.max_steps} x {cfg.train.batch_size} per process |
| precision | autocast {cfg.train.mixed_precision}, base weights {cfg.model.weight_dtype} |
| resolution | {cfg.model.resolution} |

## Training curve (summary)

| step | {' | '.join(keys)} |
|---|{'---|' * len(keys)}
{chr(10).join(rows) if rows else '| - |'}
{"".join(f"{chr(10)}Note: {n}{chr(10)}" for n in notes)}
## Use

diffusers (this folder holds `pytorch_lora_weights.safetensors` with its adapter metadata):

```python
import torch
from diffusers import StableDiffusionPipeline, LCMScheduler

pipe = StableDiffusionPipeline.from_pretrained("{model}", dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config{lcm_kw})
image = pipe("a photo of a cat", num_inference_steps={steps}, timesteps={ts}, guidance_scale=0.0).images[0]
```

ComfyUI / A1111 / kohya: `{KOHYA_FILE}` holds the same LoRA in kohya's key format (`lora_unet_*`, `lora_down`/
`lora_up`, `.alpha` = {g.alpha}). Load it with the teacher `{model}` as a normal LoRA at strength 1.0 and sample
**{steps} step{"s" if steps > 1 else ""}** with the LCM sampler at timestep{"s" if steps > 1 else ""} {", ".join(map(str, ts))} (scheduler "sgm_uniform"/"simple" in
ComfyUI{"; with several steps check that the sampler's timesteps are these" if steps > 1 else ""}), CFG 1.
{f"{chr(10)}Samples from the final generator (fixed validation prompts and seeds):{chr(10)}{chr(10)}![samples](samples.png)" if has_samples else ""}
"""
    (final / "README.md").write_text(text)
