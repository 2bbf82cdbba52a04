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
    """The teacher family's pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) set up for one-step
    sampling with the LoRA loaded (any :func:`resolve_lora` form).

    ``fuse`` merges the LoRA into the UNet weights (no LoRA branches at run time) and ``channels_last`` changes the
    UNet/VAE memory format: the two speed-ups that ``benchmarks/latency.py`` measured and kept (docs/BENCHMARKS.md).
    """
    from diffusers import DDIMScheduler, FlowMatchLCMScheduler, LCMScheduler

    from sd_dmd.models.family import detect_family

    family = detect_family(model, revision)
    pipe = family.load_pipeline(model, dtype, revision, variant)
    if lora is not None:
        load_lora(pipe, lora)
    if family.flow:  # SD3: x0 = x_t - sigma v, re-noised to the next sigma with fresh noise, as the trainer samples
        if scheduler != "lcm":
            raise ValueError(f"a flow-matching teacher samples with FlowMatchLCMScheduler ('lcm'), not '{scheduler}'")
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "lcm":
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
        from sd_dmd.models.teacher import network

        network(pipe).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def load_lora(pipe, lora: str | LoraSource) -> None:
    """Load ``lora`` (any :func:`resolve_lora` form) into ``pipe``'s UNet, as :meth:`LoraSource.load_into`."""
    (lora if isinstance(lora, LoraSource) else resolve_lora(lora)).load_into(pipe)


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
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    from sd_dmd.config import ConfigError

    timesteps = [int(t) for t in timesteps]
    if isinstance(pipe.scheduler, FlowMatchLCMScheduler):
        return dict(num_inference_steps=len(timesteps), sigmas=flow_sigmas(pipe.scheduler, timesteps),
                    guidance_scale=0.0)
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


def flow_sigmas(scheduler, timesteps: list[int]) -> list[float]:
    """The sigmas to give a flow-matching pipeline (``sigmas=``) so that it runs the trainer's indices ``timesteps``:
    the scheduler shifts what it is given, so it gets the unshifted (t + 1) / T, whose shift is the trainer's
    sigma_t (:class:`~sd_dmd.core.schedule.FlowMatchSchedule`)."""
    n = scheduler.config.num_train_timesteps
    return [(int(t) + 1) / n for t in timesteps]


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

    from diffusers import StableDiffusionXLPipeline

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(pipe, StableDiffusionXLPipeline) or getattr(pipe, "unet", None) is None:  # SDXL's added
        # conditions, SD3's three encoders: the pipeline's own call
        return pipe(prompts, latents=latents, generator=generator, output_type=output_type,
                    **one_step_call_kwargs(pipe, conditioning_timestep)).images
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
    out = unet(z, t, encoder_hidden_states=emb).sample
    x0 = NoiseSchedule.from_scheduler(pipe.scheduler).to_x0(
        z, out, t, pipe.scheduler.config.get("prediction_type", "epsilon")).to(z.dtype)
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


def _label_font(size: int):
    """PIL's default font at ``size`` px: Pillow >= 10.1 with FreeType scales it (Aileron); older Pillow, or one
    without FreeType, gives the fixed bitmap font. No font files are read or downloaded."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _fit(text: str, font, width: float) -> str:
    """``text``, cut with an ellipsis until it fits ``width`` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text.rstrip() + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…" if text else ""


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``width`` px: broken at its newlines, then at " · " (the parts of a row label),
    then at spaces; past ``max_lines`` (at least 1) the last line ends in an ellipsis."""
    lines: list[str] = []
    for sep in ("\n", " · ", " "):
        todo, lines = lines or [text], []
        for line in todo:
            if font.getlength(line) <= width and sep != "\n":
                lines.append(line)
                continue
            cur = None
            for part in line.split(sep):
                trial = part if cur is None else f"{cur}{sep}{part}"
                if cur is not None and (sep == "\n" or font.getlength(trial) > width):
                    lines.append(cur)
                    cur = part
                else:
                    cur = trial
            lines.append(cur or "")
    max_lines = max(1, max_lines)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " …", font, width)
    return [_fit(line, font, width) for line in lines]


def _common_prefix_words(labels: list[str]) -> str:
    """The words every label starts with when there are two or more of them and every label has words left after
    them ("a handwritten digit" of "a handwritten digit zero", "... one"), else ""."""
    words = [label.split() for label in labels]
    if len(labels) < 2:
        return ""
    n = 0
    while all(len(w) > n + 1 for w in words) and len({w[n] for w in words}) == 1:
        n += 1
    return " ".join(words[0][:n]) if n >= 2 else ""


def _label_lines(font, row_labels, col_labels, corner, cell_w: int, cell_h: int, line_h: int, pad: int):
    """:func:`labelled_grid`'s labels wrapped into lines: (row lines, column lines, corner lines, the row band's
    width). Column labels that share two or more first words lose them to the corner (unless ``corner`` is given)."""
    col_labels = [str(c) for c in col_labels] if col_labels is not None else None
    if col_labels is not None and corner is None:
        prefix = _common_prefix_words(col_labels)
        if prefix:
            corner = prefix + " …"
            col_labels = [c.split(None, len(prefix.split()))[-1] for c in col_labels]
    # row labels: a band as wide as the longest label, up to max(2.5 cells, 260 px), wrapped to the cell height
    row_max_w = max(2.5 * cell_w, 260)
    row_lines = [_wrap(str(lab), font, row_max_w, (cell_h - 4) // line_h) for lab in row_labels]
    row_w = max([font.getlength(line) for lines in row_lines for line in lines] + [0])
    if corner:
        row_w = max(row_w, min(font.getlength(corner), row_max_w))
    band_w = math.ceil(row_w + 2.5 * pad) if row_w else 0  # text from x = 2 pad; 1.5 pad before the cells
    col_lines = [_wrap(c, font, cell_w - pad, 3) for c in col_labels] if col_labels is not None else []
    corner_lines = _wrap(corner, font, row_w, 3) if corner and band_w else []
    return row_lines, col_lines, corner_lines, band_w


def labelled_grid(images_by_row, row_labels, col_labels=None, min_cell: int = 96, corner: str | None = None,
                  group: int = 0):
    """One PIL image of ``images_by_row`` (rows of PIL images, drawn in the order given) with each row's label at
    its left and each column's label above it. Returns an RGB ``PIL.Image``.

    Small images are enlarged by a whole factor with nearest-neighbour until both sides of a cell are at least
    ``min_cell`` px (8 px -> x12, 16 px -> x6, 32 px -> x3; 512 px stays as it is): every cell pixel is a copy of a
    source pixel. Labels are wrapped (a row label at " · ", a column label at spaces) and cut with an ellipsis to
    fit; the words that every column label starts with (two or more, e.g. "a handwritten digit") go once into the
    top-left ``corner`` unless ``corner`` is given. ``col_labels=None``: no column band. ``group=n``: a wider gap
    after every n rows (pairs of rows to compare, say).
    """
    from PIL import Image, ImageDraw

    rows = [list(r) for r in images_by_row]
    if not rows or not any(rows):
        raise ValueError("labelled_grid: no images")
    if len(row_labels) != len(rows):
        raise ValueError(f"labelled_grid: {len(rows)} rows but {len(row_labels)} row labels")
    n_cols = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"labelled_grid: {n_cols} columns but {len(col_labels)} column labels")
    w = max(im.size[0] for r in rows for im in r)
    h = max(im.size[1] for r in rows for im in r)
    k = max(1, math.ceil(min_cell / min(w, h)))
    cell_w, cell_h = w * k, h * k
    font = _label_font(max(14, min(40, min(cell_w, cell_h) // 6)))
    size = getattr(font, "size", 11)
    pad, gap = max(6, size // 2), max(2, min(cell_w, cell_h) // 48)
    line_h = size + max(3, size // 4)

    row_lines, col_lines, corner_lines, band_w = _label_lines(font, row_labels, col_labels, corner, cell_w, cell_h,
                                                              line_h, pad)
    n_top = max([len(c) for c in col_lines] + [len(corner_lines)] + [0])
    band_h = n_top * line_h + 2 * pad if n_top else 0

    x0, y0 = pad + band_w, pad + band_h
    row_y = [y0 + r * (cell_h + gap) + (r // group * pad if group > 0 else 0) for r in range(len(rows))]
    grid = Image.new("RGB", (x0 + n_cols * cell_w + (n_cols - 1) * gap + pad, row_y[-1] + cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    ink = (20, 20, 20)
    for r, (row, lines) in enumerate(zip(rows, row_lines)):
        y = row_y[r]
        for c, im in enumerate(row):
            im = im.convert("RGB")
            big = im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST) if k > 1 else im
            x = x0 + c * (cell_w + gap)
            grid.paste(big, (x + (cell_w - big.size[0]) // 2, y + (cell_h - big.size[1]) // 2))
        ty = y + (cell_h - len(lines) * line_h) // 2 + (line_h - size) // 2
        for i, line in enumerate(lines):  # left-aligned, centred on the row
            draw.text((2 * pad, ty + i * line_h), line, fill=ink, font=font)
    for c, lines in enumerate(col_lines):  # centred on the column, bottom line just above the cells
        cx = x0 + c * (cell_w + gap) + cell_w / 2
        ty = y0 - pad - len(lines) * line_h + (line_h - size) // 2
        for i, line in enumerate(lines):
            draw.text((cx - font.getlength(line) / 2, ty + i * line_h), line, fill=ink, font=font)
    ty = y0 - pad - len(corner_lines) * line_h + (line_h - size) // 2
    for i, line in enumerate(corner_lines):
        draw.text((2 * pad, ty + i * line_h), line, fill=(110, 110, 110), font=font)
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
    lcm_err = "timestep_scaling" in pipe.scheduler.config and lcm_timesteps_error(
        timesteps, pipe.scheduler.config.timestep_scaling)  # LCMScheduler's boundary condition (not SD3's)
    if lcm_err:
        p.error(f"--timesteps: {lcm_err}")
    print(f"loaded LoRA {lora}" if lora is not None else "no LoRA: sampling the base model")
    print(f"sampling {len(timesteps)} step(s) at timesteps {timesteps}, guidance 0")
    images = []
    for i, prompt in enumerate(args.prompt):
        g = [torch.Generator("cpu").manual_seed(args.seed + i * args.num_images + k) for k in range(args.num_images)]
        torch.manual_seed(args.seed + i * args.num_images)  # SD3's few-step re-noising draws without the generator
        images += pipe([prompt] * args.num_images, generator=g, height=args.height, width=args.width,
                       **guarded(call_kwargs, pipe, timesteps)).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images, cols=args.num_images)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
