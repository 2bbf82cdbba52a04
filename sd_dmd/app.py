"""``python -m sd_dmd.app``: the teacher and the distilled student side by side in the browser (gradio).

    pip install '.[app]'
    python -m sd_dmd.app                                  # the digits teacher and `make demo`'s LoRA
    python -m sd_dmd.app --model PATH_OR_ID --lora LORA   # any teacher and a LoRA of it

The code is in :mod:`sd_dmd.outputs.app`; gradio is imported only once the arguments are read.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_LORA = Path("demo_out") / "run" / "final"  # where `make demo` (sd_dmd.demo, --out demo_out) writes its LoRA


def demo_lora() -> Path:
    """``make demo``'s LoRA: ``demo_out/run/final`` here, else in the repository."""
    root = Path(__file__).resolve().parents[1]
    for p in (DEMO_LORA, root / DEMO_LORA):
        if p.is_dir():
            return p
    return DEMO_LORA


def main(argv=None):
    p = argparse.ArgumentParser(description="The teacher and the distilled student side by side: a prompt, a seed, "
                                "4 images of each with their times (a gradio app; pip install '.[app]').")
    p.add_argument("--model", default=None, help="the teacher: a diffusers SD pipeline path or hub id (default: the "
                   "embedded digits teacher)")
    p.add_argument("--lora", default=None, help="the student: a run directory (its final/), final/, checkpoint-N/ or "
                   "a LoRA .safetensors file (default with the digits teacher: make demo's demo_out/run/final)")
    p.add_argument("--teacher_steps", type=int, default=50, help="the teacher's sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="the teacher's CFG scale (default: the real-score "
                   "guidance of the LoRA's run, its config.yaml; else 7.5)")
    p.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim"], help="the teacher's sampler")
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="the student's timesteps (default: the ones training recorded beside the LoRA, else 999)")
    p.add_argument("--num_images", type=int, default=4, help="images per click (seeds seed, seed+1, ...)")
    p.add_argument("--prompt", default=None, help="the prompt box's first value")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    if args.teacher_steps < 1 or args.num_images < 1:
        p.error("--teacher_steps and --num_images must be at least 1")

    import importlib.util

    from sd_dmd.cli import fail, guarded

    if importlib.util.find_spec("gradio") is None:
        fail("gradio is not installed: pip install '.[app]' (or pip install 'gradio>=6')")
    from importlib.metadata import version

    if int(version("gradio").split(".")[0]) < 6:
        fail(f"gradio {version('gradio')} is too old: pip install 'gradio>=6'")
    import torch

    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.models.lora import resolve_lora
    from sd_dmd.models.shared_unet import DTYPES
    from sd_dmd.outputs.app import Comparison, build_ui, default_prompt, launch

    model = args.model or str(TEACHER_DIR)
    if args.lora is None:
        if args.model is not None:
            fail("--lora: the student's LoRA is required with --model")
        lora = demo_lora()
        if not lora.is_dir():
            fail(f"no LoRA at {lora}: run `make demo` first (it trains the digits student there), or pass --lora")
        args.lora = str(lora)
    source = guarded(resolve_lora, args.lora)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    print(f"loading the teacher {model} and the student {source} ...", flush=True)
    comp = guarded(Comparison.load, model, source, teacher_steps=args.teacher_steps, guidance=args.guidance,
                   scheduler=args.scheduler, timesteps=args.timesteps, dtype=dtype, device=device)
    print(f"{comp.teacher_label} | {comp.student_label}", flush=True)
    ui = build_ui(comp, args.prompt if args.prompt is not None else default_prompt(model), n=args.num_images)
    launch(ui, args.host, args.port)


if __name__ == "__main__":
    main()
