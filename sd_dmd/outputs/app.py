"""The side-by-side app: the teacher (its steps, its guidance) and the distilled student (its recorded timesteps) on
the same prompt and the same seeds, each with its measured time.

:class:`Comparison` and :func:`make_generate` are plain Python (tested without gradio or a browser);
:func:`build_ui` imports gradio (>= 6), an optional extra (``pip install .[app]``), and only it does.
The command is ``python -m sd_dmd.app`` (:mod:`sd_dmd.app`).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.models.lora import LoraSource, resolve_lora

DEFAULT_GUIDANCE = 7.5  # diffusers' default CFG scale: the teacher's guidance when the LoRA's run records none
DISPLAY_PX = 192  # small images (32 px digits) are enlarged, nearest-neighbour, to about this side
NUM_IMAGES = 4  # one click: seeds seed, seed+1, ..., seed+3


def recorded_guidance(lora: LoraSource) -> Optional[float]:
    """The real score's CFG scale (``dmd.real_guidance_scale``) of the run that wrote the LoRA: its ``config.yaml``
    beside ``final/`` (or ``checkpoint-N/``), or None (a LoRA file on its own, a hub id)."""
    import yaml

    f = lora.file
    if f is None:
        return None
    for d in (f.parent.parent, f.parent.parent.parent):  # run/final/x.safetensors, run/checkpoint-N/generator/x
        cfg = d / "config.yaml"
        if cfg.is_file():
            try:
                return float(yaml.safe_load(cfg.read_text())["dmd"]["real_guidance_scale"])
            except (KeyError, TypeError, ValueError, yaml.YAMLError):
                return None
    return None


def enlarge(image, display_px: int = DISPLAY_PX):
    """``image`` scaled up by a whole factor (nearest-neighbour: the pixels stay sharp) to about ``display_px``."""
    from PIL import Image

    k = max(1, display_px // max(image.size))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def grid(images, gap: int = 4, display_px: int = DISPLAY_PX):
    """The images, enlarged, in a near-square grid with a white gap between them (2 x 2 for 4)."""
    from PIL import Image

    images = [enlarge(im.convert("RGB"), display_px) for im in images]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return out


@dataclass
class Side:
    """One model's images of one click and the time they took."""

    images: list  # PIL images, one per seed
    ms: float  # wall time of the whole batch, milliseconds

    @property
    def ms_per_image(self) -> float:
        return self.ms / len(self.images)


@dataclass
class Comparison:
    """A teacher pipeline and a student (one-step or few-step LoRA) pipeline, sampled on the same noise."""

    teacher: object  # StableDiffusionPipeline, PNDM (or DDIM)
    student: object  # StableDiffusionPipeline with the LoRA loaded, LCMScheduler
    timesteps: list[int]  # the student's sampling timesteps (recorded beside the LoRA)
    teacher_steps: int = 50
    guidance: float = DEFAULT_GUIDANCE
    lora: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, model: str, lora: str | LoraSource, *, teacher_steps: int = 50, guidance: Optional[float] = None,
             scheduler: str = "pndm", timesteps: Optional[list[int]] = None, dtype=torch.float32,
             device: str = "cpu", warm_up: bool = True) -> "Comparison":
        """Both pipelines from ``model`` (a diffusers SD pipeline) and ``lora`` (any :func:`resolve_lora` form).

        ``guidance``: the teacher's CFG scale, by default the one the LoRA's run trained with (its real score's),
        else :data:`DEFAULT_GUIDANCE`. ``timesteps``: the student's, by default those recorded beside the LoRA,
        else [999]. ``warm_up`` runs each pipeline once at one step, so the first click's times are not those of
        the first call's set-up."""
        from sd_dmd.models.teacher import teacher_pipeline
        from sd_dmd.outputs.sample import call_kwargs, one_step_pipeline

        source = lora if isinstance(lora, LoraSource) else resolve_lora(lora)
        teacher = teacher_pipeline(str(model), scheduler, dtype, device)
        student = one_step_pipeline(str(model), source, "lcm", dtype, device)
        ts = list(timesteps or source.timesteps or [999])
        call_kwargs(student, ts)  # a ConfigError now, not at the first click, for timesteps LCM cannot run
        if guidance is None:
            guidance = recorded_guidance(source)
        comp = cls(teacher, student, ts, teacher_steps, DEFAULT_GUIDANCE if guidance is None else float(guidance),
                   str(source))
        if warm_up:
            comp._run(comp.teacher, [""], 0, dict(num_inference_steps=1, guidance_scale=comp.guidance))
            comp._run(comp.student, [""], 0, call_kwargs(comp.student, comp.timesteps))
        return comp

    @property
    def teacher_label(self) -> str:
        name = type(self.teacher.scheduler).__name__.removesuffix("Scheduler")
        return f"Teacher: {self.teacher_steps} {name} steps, CFG {self.guidance:g}"

    @property
    def student_label(self) -> str:
        n = len(self.timesteps)
        return f"Student (DMD LoRA): {n} step{'s' if n > 1 else ''} at t = {', '.join(map(str, self.timesteps))}"

    @staticmethod
    def _sync(pipe) -> None:
        if pipe.unet.device.type == "cuda":
            torch.cuda.synchronize(pipe.unet.device)

    def _run(self, pipe, prompts: list[str], seed: int, kwargs: dict) -> Side:
        gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(len(prompts))]
        self._sync(pipe)
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = pipe(prompts, generator=gens, **kwargs).images
        self._sync(pipe)
        return Side(list(images), (time.perf_counter() - t0) * 1000)

    def generate(self, prompt: str, seed: int = 0, n: int = NUM_IMAGES) -> tuple[Side, Side]:
        """(teacher, student): ``n`` images each of ``prompt``, image k from seed ``seed + k`` (the same noise
        for both models), with the wall time of each batch."""
        from sd_dmd.outputs.sample import call_kwargs

        prompts = [str(prompt)] * int(n)
        seed = int(seed)
        with self._lock:  # one click at a time: the pipelines are shared, and the times would be each other's
            teacher = self._run(self.teacher, prompts, seed,
                                dict(num_inference_steps=self.teacher_steps, guidance_scale=self.guidance))
            student = self._run(self.student, prompts, seed, call_kwargs(self.student, self.timesteps))
        return teacher, student


def timing(side: Side) -> str:
    n = len(side.images)
    return f"**{side.ms:.0f} ms** for {n} image{'s' if n > 1 else ''} ({side.ms_per_image:.1f} ms/image)"


def make_generate(comp: Comparison, n: int = NUM_IMAGES):
    """The app's click handler as a plain function: (prompt, seed) -> (teacher grid, teacher time, student grid,
    student time), the grids' small images enlarged."""

    def generate(prompt: str, seed) -> tuple:
        seed = 0 if seed is None or seed == "" else int(seed)
        teacher, student = comp.generate(prompt, seed, n)
        speed = f" ({teacher.ms / student.ms:.1f}x faster)" if student.ms > 0 else ""
        return grid(teacher.images), timing(teacher), grid(student.images), timing(student) + speed

    return generate


CSS = "#teacher img, #student img { image-rendering: pixelated; }"  # a browser's own scaling stays sharp too


def build_ui(comp: Comparison, prompt: str = "", title: str = "sd_dmd: teacher and student, side by side",
             n: int = NUM_IMAGES):
    """The gradio (>= 6) Blocks: a prompt box, a seed and a button; the teacher's and the student's images of seeds
    seed .. seed + n - 1 side by side, each with its time."""
    import os

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no phoning home
    import gradio as gr

    def image(label: str, elem_id: str):  # png: the default webp is lossy on 32 px digits; no share button
        return gr.Image(label=label, type="pil", format="png", interactive=False, buttons=["download", "fullscreen"],
                        elem_id=elem_id)

    fn = make_generate(comp, n)
    with gr.Blocks(title=title, analytics_enabled=False) as ui:
        gr.Markdown(f"### {title}\nLoRA: `{comp.lora}`. Each click samples {n} seeds (seed, seed + 1, ...) "
                    "with the same noise for both models.")
        with gr.Row():
            box = gr.Textbox(label="Prompt", value=prompt, elem_id="prompt", scale=4)
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=1)
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            with gr.Column():
                t_img = image(comp.teacher_label, "teacher")
                t_ms = gr.Markdown(elem_id="teacher_ms")
            with gr.Column():
                s_img = image(comp.student_label, "student")
                s_ms = gr.Markdown(elem_id="student_ms")
        outputs = [t_img, t_ms, s_img, s_ms]
        button.click(fn, [box, seed], outputs)
        box.submit(fn, [box, seed], outputs)
    return ui


def launch(ui, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve ``ui`` on ``host:port``: no share link, no browser opened."""
    ui.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
              prevent_thread_lock=not block, css=CSS)


def default_prompt(model: str | Path) -> str:
    """A prompt the model knows: a digit for the digits teacher, else a cat."""
    from sd_dmd.data.digits import TEACHER_DIR, prompt_for

    same = Path(model).resolve() == TEACHER_DIR.resolve() if Path(model).exists() else False
    return prompt_for(7) if same else "a photo of a cat"
