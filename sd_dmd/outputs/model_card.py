"""``final/README.md``: what a user needs to load and sample the distilled LoRA, and how it was made."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sd_dmd.models.lora import KOHYA_FILE
from sd_dmd.outputs.sample import lcm_original_steps

if TYPE_CHECKING:  # the card reads a training run's config; outputs sit below training
    from sd_dmd.training.config import Config


# The licenses of the base models this distils, as their own model cards state them (`license:`), by hub id in
# lower case (the hub's ids are case-insensitive). A base model not named here gets no `license:` in our card.
KNOWN_LICENSES = {
    **{f"compvis/stable-diffusion-v1-{i}": "creativeml-openrail-m" for i in (1, 2, 3, 4)},
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",  # the hub's copy of runwayml's
    **{f"stabilityai/stable-diffusion-2{v}": "openrail++" for v in ("", "-base", "-1", "-1-base")},
    # SD3 and SD3.5: Stability AI's Community License ("license: other" with its name and link)
    **{f"stabilityai/{m}": {"license": "other", "license_name": "stabilityai-ai-community",
                            "license_link": f"https://huggingface.co/stabilityai/{m}/blob/main/LICENSE.md"}
       for m in ("stable-diffusion-3-medium-diffusers", "stable-diffusion-3.5-medium", "stable-diffusion-3.5-large",
                 "stable-diffusion-3.5-large-turbo")},
}


def _valid_id(value: str) -> Optional[str]:
    """``value`` when the hub would take it as a repository id, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _hub_id(value: str, owner_required: bool = True) -> Optional[str]:
    """``value`` when it is shaped as a hub model id ("owner/name", or "name" without ``owner_required``) and names
    no local path, else None."""
    slashes = value.count("/")
    if slashes > 1 or (owner_required and slashes == 0) or Path(value).expanduser().exists():
        return None
    return _valid_id(value)


def _cached_hub_id(path: str) -> Optional[str]:
    """The hub id of a path inside the Hugging Face cache (``.../models--owner--name/snapshots/REV/...``), else None.
    diffusers records such paths as a component's ``_name_or_path`` when the pipeline was loaded by hub id."""
    parts = Path(path).parts
    for folder, nxt in zip(parts, parts[1:]):
        if folder.startswith("models--") and nxt == "snapshots":
            owner_name = folder.removeprefix("models--").split("--")  # the hub allows no "--" in either
            return _valid_id("/".join(owner_name)) if len(owner_name) == 2 else None
    return None


def _recorded_name(config: Path) -> Optional[str]:
    """The ``_name_or_path`` a diffusers config file records (where the component was loaded from when saved)."""
    try:
        value = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def base_model_id(model: str) -> Optional[str]:
    """The card's ``base_model``: the hub id the teacher was loaded by, or for a local teacher the hub id it records,
    else None. Never a local path: the card is published, and the hub only takes model ids there.

    A local teacher's id, first found first: the folder itself inside the Hugging Face cache; the ``_name_or_path``
    of its ``model_index.json`` (diffusers writes the id a pipeline was loaded by when it saves it) or of its
    ``unet/config.json`` (for a pipeline loaded by id, a path in the cache), as a hub id or a cache path."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return _hub_id(model, owner_required=False)  # training loaded the teacher by this id
    for value in (str(p.resolve()), _recorded_name(p / "model_index.json"), _recorded_name(p / "unet" / "config.json")):
        found = value and (_cached_hub_id(value) or _hub_id(value))
        if found:
            return found
    return None


def base_license(model: str, base: Optional[str]) -> dict:
    """The card's ``license`` (with ``license_name``/``license_link`` for "other"): the one a local teacher's own
    ``README.md`` states, else the known license of the base model's hub id (:data:`KNOWN_LICENSES`), else none."""
    readme = Path(model).expanduser() / "README.md"
    if Path(model).expanduser().is_dir() and readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data
        except Exception:  # a README without (valid) card metadata states no license
            data = None
        if data is not None and isinstance(data.license, str) and data.license:
            extra = {k: getattr(data, k, None) for k in ("license_name", "license_link")}
            return {"license": data.license, **{k: v for k, v in extra.items() if isinstance(v, str) and v}}
    lic = KNOWN_LICENSES.get((base or "").lower())
    return dict(lic) if isinstance(lic, dict) else {"license": lic} if lic else {}


def card_metadata(model: str, base: Optional[str], steps: int, pipeline: str = "StableDiffusionPipeline") -> str:
    """The card's YAML block (between the ``---`` lines): base model (:func:`base_model_id`), license, library and
    pipeline, tags."""
    from huggingface_hub import ModelCardData

    family = ("stable-diffusion-xl" if "XL" in pipeline else "stable-diffusion-3" if "3" in pipeline
              else "stable-diffusion")
    tags = ["lora", "text-to-image", "diffusers", family, "one-step" if steps == 1 else "few-step", "dmd", "sd_dmd"]
    return ModelCardData(base_model=base, library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         **base_license(model, base)).to_yaml()


def curve_rows(history: list[dict], keys) -> list[str]:
    """Table rows of the first, middle and last logged steps."""
    if not history:
        return []
    mid = max(1, len(history) // 2)
    pick = {h["step"]: h for h in [history[0]] + history[mid:mid + 1] + [history[-1]]}
    return ["| " + " | ".join([str(step)] + [f"{h[k]:.4g}" if k in h else "-" for k in keys]) + " |"
            for step, h in pick.items()]


CARD_CURVE_KEYS = ("loss_dm", "loss_reg", "loss_fake", "grad_norm_generator")  # the card's curve-summary columns


def gan_summary(cfg: Config) -> str:
    """The card's GAN row: when it is on, its weights and its real latents (by folder name); or "off"."""
    g = cfg.gan
    return (f"on from step {g.start_step}, weights G {g.generator_weight} / D {g.discriminator_weight}, real latents "
            f"`{Path(g.real_latents).name}`" if g.real_latents else "off")


_ABSOLUTE = re.compile(r"(?<![\w:/.~-])(?:~|/)[^\s`'\")\]]*")


def without_paths(text: str) -> str:
    """``text`` with every absolute path (``/a/b/c``, ``~/c``) cut to its last part: a card travels."""
    return _ABSOLUTE.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def teacher_reference(model: str, base: Optional[str]) -> tuple[str, bool]:
    """How the card names the teacher: its hub id where one is known, else its folder's name, which a reader must
    replace (second value True)."""
    if base is not None:
        return base, False
    return Path(model).expanduser().name, True


def use_snippet(pipeline: str, teacher: str, lora: str, prompt: str, steps: int, ts: list[int]) -> str:
    """The card's Python: load the teacher and the LoRA, sample ``steps`` step(s) with LCMScheduler (SD3:
    FlowMatchLCMScheduler at the trainer's sigmas); CUDA in fp16 (SD3: bf16) where there is one, else the CPU in
    fp32."""
    if pipeline == "StableDiffusion3Pipeline":
        sigmas = [(t + 1) / 1000 for t in ts]  # sample.flow_sigmas: the scheduler applies SD3's shift to these
        seed = ("torch.manual_seed(0)  # SD3's pipeline re-noises between steps from torch's global RNG\n"
                if steps > 1 else "")
        return f"""import torch
from diffusers import {pipeline}, FlowMatchLCMScheduler

device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
pipe = {pipeline}.from_pretrained({json.dumps(teacher)}, dtype=dtype).to(device)
pipe.load_lora_weights({json.dumps(lora)})
pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
{seed}image = pipe({json.dumps(prompt)}, num_inference_steps={steps}, sigmas={sigmas}, guidance_scale=0.0).images[0]
"""
    grid = lcm_original_steps(ts)  # silences LCMScheduler's "not on the original schedule" warning for several steps
    lcm_kw = f", original_inference_steps={grid}" if steps > 1 and grid is not None else ""
    return f"""import torch
from diffusers import {pipeline}, LCMScheduler

device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
pipe = {pipeline}.from_pretrained({json.dumps(teacher)}, dtype=dtype).to(device)
pipe.load_lora_weights({json.dumps(lora)})
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config{lcm_kw})
image = pipe({json.dumps(prompt)}, num_inference_steps={steps}, timesteps={ts}, guidance_scale=0.0).images[0]
"""


def _settings_table(cfg: Config, teacher: str) -> str:
    g = cfg.lora.generator
    ts = list(cfg.dmd.generator_timesteps)
    how = "one step from pure noise" if len(ts) == 1 else f"{len(ts)} steps, LCM re-noising between them"
    return f"""| setting | value |
|---|---|
| teacher | `{teacher}`{f" (revision {cfg.model.revision})" if cfg.model.revision else ""} |
| LoRA | r={g.rank}, alpha={g.alpha} |
| sampling timesteps | {ts} ({how}; guidance 0) |
| real-score guidance | {cfg.dmd.real_guidance_scale} |
| DM timesteps | [{cfg.dmd.t_min}, {cfg.dmd.t_max}] |
| fake updates per step | {cfg.dmd.fake_updates_per_step} |
| GAN (DMD2) | {gan_summary(cfg)} |
| regression | {cfg.regression.loss} (lambda={cfg.regression.weight}, decoder={cfg.regression.decoder}) |
| optimiser | {cfg.optim.optimizer}, lr G {cfg.optim.lr_generator} / fake {cfg.optim.lr_fake} |
| steps x batch | {cfg.train.max_steps} x {cfg.train.batch_size} per process |
| precision | autocast {cfg.train.mixed_precision}, base weights {cfg.model.weight_dtype} |
| resolution | {cfg.model.resolution} |"""


def _curves_section(history: list[dict]) -> str:
    keys = CARD_CURVE_KEYS
    notes = [without_paths(str(h["note"])) for h in history if "note" in h]
    rows = curve_rows([h for h in history if "note" not in h], keys)
    return f"""| step | {' | '.join(keys)} |
|---|{'---|' * len(keys)}
{chr(10).join(rows) if rows else '| - |'}
{"".join(f"{chr(10)}Note: {n}{chr(10)}" for n in notes)}"""


def _comfy_section(cfg: Config, teacher: str, steps: int, ts: list[int], sd3: bool) -> str:
    s = "s" if steps > 1 else ""
    if sd3:  # ComfyUI maps lora_transformer_* to SD3's weights (comfy/lora.py, "OneTrainer lora")
        sampler = ("the euler sampler, one step (sigma 1 to 0 is x0 itself)" if steps == 1 else
                   f"the lcm sampler, scheduler \"simple\", {steps} steps (its sigmas are SD3's shifted "
                   f"{', '.join(f'{(t + 1) / 1000:g}' for t in ts)}: the trainer's)")
        return f"""ComfyUI: `{KOHYA_FILE}` holds the same LoRA with ComfyUI's SD3 key names (`lora_transformer_*`, `lora_down`/
`lora_up`, `.alpha` = {cfg.lora.generator.alpha}); ComfyUI also reads `pytorch_lora_weights.safetensors`, but without its alpha. Load it
with the teacher `{teacher}` as a normal LoRA at strength 1.0 and sample with {sampler}, CFG 1."""
    return f"""ComfyUI / A1111 / kohya: `{KOHYA_FILE}` holds the same LoRA in kohya's key format (`lora_unet_*`, `lora_down`/
`lora_up`, `.alpha` = {cfg.lora.generator.alpha}). Load it with the teacher `{teacher}` as a normal LoRA at strength 1.0 and sample
**{steps} step{s}** with the LCM sampler at timestep{s} {", ".join(map(str, ts))} (scheduler "sgm_uniform"/"simple" in
ComfyUI{"; with several steps check that the sampler's timesteps are these" if steps > 1 else ""}), CFG 1."""


def write_model_card(cfg: Config, final: Path, history: list[dict], has_samples: bool,
                     pipeline: str = "StableDiffusionPipeline", repo_id: Optional[str] = None) -> None:
    """``final/README.md``: teacher, timesteps, settings, curves, and how to load both LoRA files in ``pipeline``.
    No local path appears in it. The snippet loads the LoRA from ``repo_id`` when the run is pushed there."""
    model = cfg.model.pretrained_model_name_or_path
    base = base_model_id(model)
    sd3 = pipeline == "StableDiffusion3Pipeline"
    teacher, placeholder = teacher_reference(model, base)
    ts = list(cfg.dmd.generator_timesteps)
    steps = len(ts)
    prompts = list(cfg.logging.validation_prompts)
    code = use_snippet(pipeline, teacher, repo_id or "path/to/this/folder", prompts[0] if prompts else "a photo",
                       steps, ts)
    replace = (f"\n`{teacher}` is the name of the folder the teacher was trained from, not a Hub id: replace it with "
               "that folder's path or the Hub id of the same model.\n" if placeholder else "")
    text = f"""---
{card_metadata(model, base, steps, pipeline)}
---
# {"One-step" if steps == 1 else f"{steps}-step"} DMD LoRA for `{teacher}`

Distilled with sd_dmd (Distribution Matching Distillation, Yin et al. 2023, arXiv:2311.18828) into a
**{"one-step" if steps == 1 else f"{steps}-step"}** generator: LoRA r={cfg.lora.generator.rank}, alpha={cfg.lora.generator.alpha}, on the frozen teacher {"transformer" if sd3 else "UNet"}.

{_settings_table(cfg, teacher)}

## Training curve (summary)

{_curves_section(history)}
## Use

diffusers ({"the repository" if repo_id else "this folder"} holds `pytorch_lora_weights.safetensors` with its adapter metadata):

```python
{code}```
{replace}
{_comfy_section(cfg, teacher, steps, ts, sd3)}
{f"{chr(10)}Samples from the final generator (fixed validation prompts and seeds):{chr(10)}{chr(10)}![samples](samples.png)" if has_samples else ""}
"""
    (final / "README.md").write_text(text)
