"""Saving the adapters: diffusers LoRA format (with metadata), kohya/A1111/ComfyUI format, fused UNet.

DESIGN.md: ``get_peft_model_state_dict(unet, adapter_name=...)`` ->
``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=sd, unet_lora_adapter_metadata=...)``.
Without the metadata a LoRA with alpha != r reloads at the wrong scale.

From the command line, a trained LoRA merged into a plain ``UNet2DConditionModel`` (rank and alpha are read
from the LoRA itself: its adapter metadata, or the kohya ``.alpha`` keys):

    python -m sd_dmd.export --model PATH_OR_ID --lora runs/x/final --out fused_unet/ [--dtype fp16]
    # then: StableDiffusionPipeline.from_pretrained(PATH_OR_ID, unet=UNet2DConditionModel.from_pretrained("fused_unet"))
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.models.lora import KOHYA_FILE, SAMPLING_FILE, export_kohya, save_lora
from sd_dmd.models.shared_unet import FAKE, GENERATOR, DMDModel


def export_fused_unet(model: DMDModel, out_dir: str | Path, name: str = GENERATOR,
                      dtype: torch.dtype | None = None) -> Path:
    """A plain ``UNet2DConditionModel`` with the generator LoRA merged in (``save_pretrained``)."""
    unet = copy.deepcopy(model.unet).float()
    others = [a for a in unet.peft_config if a != name]
    if others:
        unet.delete_adapters(others)
    unet.enable_adapters()
    unet.set_adapter(name)
    unet.fuse_lora(adapter_names=[name])
    unet.unload_lora()
    if dtype is not None:
        unet.to(dtype)
    unet.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def save_all(model: DMDModel, out_dir: str | Path) -> None:
    """Generator LoRA (diffusers + kohya) at ``out_dir``, the fake LoRA under ``out_dir/fake``."""
    out = Path(out_dir)
    save_lora(model, out, GENERATOR)
    export_kohya(model, out / KOHYA_FILE, GENERATOR)
    save_lora(model, out / "fake", FAKE)


def fuse_lora_into_unet(model: str, lora, out_dir: str | Path, dtype: torch.dtype | None = None,
                        revision: str | None = None, variant: str | None = None) -> dict:
    """Load ``model``'s UNet, load ``lora`` (any :func:`sd_dmd.sample.resolve_lora` form) with the rank/alpha saved
    with it, merge it and ``save_pretrained`` a plain UNet at ``out_dir`` (written to ``out_dir.tmp``, then renamed).
    Returns what was fused: source, rank, alpha and where they came from."""
    import diffusers

    from sd_dmd.errors import ModelError
    from sd_dmd.models.family import detect_family
    from sd_dmd.models.lora import LoraSource, resolve_lora

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or choose another --out")
    src = lora if isinstance(lora, LoraSource) else resolve_lora(lora)
    family = detect_family(model, revision)
    pipeline_cls = family.pipeline_class()  # StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline
    folder, cls = family.network  # the UNet, or SD3's transformer
    unet = getattr(diffusers, cls).from_pretrained(model, subfolder=folder, revision=revision, variant=variant).float()
    sd, network_alphas, metadata = src.state_dict(pipeline_cls)
    try:  # as the pipeline's load_lora_weights, for the network alone
        if folder == "transformer":
            pipeline_cls.load_lora_into_transformer(sd, unet, adapter_name=GENERATOR, metadata=metadata)
        else:
            pipeline_cls.load_lora_into_unet(sd, network_alphas, unet, adapter_name=GENERATOR, metadata=metadata)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{src}: does not fit the {cls} of {model} ({type(e).__name__}: {str(e)[:200]})") from None
    if GENERATOR not in getattr(unet, "peft_config", {}):
        raise ModelError(f"{src}: holds no {cls} LoRA weights")
    cfg = unet.peft_config[GENERATOR]
    info = {"lora": str(src), "rank": cfg.r, "alpha": cfg.lora_alpha,
            "rank_alpha_from": "adapter metadata" if metadata else "kohya .alpha keys" if network_alphas else
            "weight shapes only (no metadata: alpha assumed = rank)"}
    unet.fuse_lora(adapter_names=[GENERATOR])
    unet.unload_lora()
    if dtype is not None:
        unet.to(dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp, safe_serialization=True)
    info["timesteps"] = src.timesteps or [999]
    scheduler = "FlowMatchLCMScheduler" if family.flow else "LCMScheduler"
    (tmp / SAMPLING_FILE).write_text(json.dumps({"scheduler": scheduler, "timesteps": info["timesteps"],
                                                 "guidance_scale": 0.0}) + "\n")  # how to sample the fused UNet
    tmp.replace(out)
    return info


def push_target(run: Path) -> tuple[Path, Optional[str]]:
    """What ``--push_to_hub`` uploads for ``run``, and to which branch: a run directory or its ``final/`` -> final/
    to main; a ``checkpoint-N/`` -> its generator LoRA (the EMA one when saved) to branch ``step-N``."""
    from sd_dmd.outputs.hub import checkpoint_branch
    from sd_dmd.run_dir import CKPT_RE

    m = CKPT_RE.match(run.name)
    if m and run.is_dir():
        lora = run / "generator_ema" if (run / "generator_ema").is_dir() else run / "generator"
        return lora, checkpoint_branch(int(m.group(1)))
    final = run / "final" if (run / "final").is_dir() else run
    return final, None


def _push(args) -> None:
    from sd_dmd.cli import fail
    from sd_dmd.outputs.hub import push_folder

    folder, branch = push_target(args.run)
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        fail(f"{args.run}: no final/ (or checkpoint-N/generator/) with pytorch_lora_weights.safetensors; "
             "give a run directory, its final/ or a checkpoint-N/")
    try:
        url = push_folder(folder, args.push_to_hub, private=args.private, token=args.token, branch=branch)
    except Exception as e:  # noqa: BLE001 - one line, with the token scrubbed
        text = str(e).replace(args.token, "<token>") if args.token else str(e)
        fail(f"push of {folder} to {args.push_to_hub} failed: {type(e).__name__}: "
             f"{(text.strip().splitlines() or [''])[0]}")
    print(f"pushed {folder} to {args.push_to_hub}{f' (branch {branch})' if branch else ''}: {url}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge a trained LoRA into the base UNet and save a plain "
                                            "UNet2DConditionModel; or, with RUN --push_to_hub ID, upload a finished "
                                            "run's final/ (or a checkpoint's LoRA) to the Hugging Face Hub.")
    p.add_argument("run", nargs="?", type=Path, help="with --push_to_hub: a run directory, its final/, or a "
                   "checkpoint-N/ (pushed to branch step-N)")
    p.add_argument("--push_to_hub", metavar="ID", default=None, help="Hub repository 'owner/name' (created if missing)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    p.add_argument("--token", default=None, help="with --push_to_hub: Hub token (else HF_TOKEN or `hf auth login`)")
    p.add_argument("--model", help="diffusers SD pipeline path or hub id (the base the LoRA trained on)")
    p.add_argument("--lora", help="run directory (final/), final/, checkpoint-N/ (generator/) or a "
                   "LoRA .safetensors file (diffusers or kohya keys)")
    p.add_argument("--out", type=Path, help="output directory for the fused UNet (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the saved weights "
                   "(the merge itself runs in fp32)")
    p.add_argument("--revision", default=None, help="hub revision of the base model")
    p.add_argument("--variant", default=None, help="weight variant of the base model, e.g. fp16")
    args = p.parse_args(argv)
    if args.push_to_hub or args.run is not None:
        if not (args.push_to_hub and args.run is not None):
            p.error("RUN and --push_to_hub ID go together (python -m sd_dmd.export RUN --push_to_hub ID)")
        return _push(args)
    missing = [f"--{k}" for k in ("model", "lora", "out") if getattr(args, k) is None]
    if missing:
        p.error(f"the fused-UNet export needs {', '.join(missing)}")
    _fuse(args)


def _fuse(args) -> None:
    from sd_dmd.cli import fail, guarded
    from sd_dmd.models.shared_unet import DTYPES

    if args.out.exists():
        fail(f"{args.out}: already exists; remove it or choose another --out")
    info = guarded(fuse_lora_into_unet, args.model, args.lora, args.out, DTYPES[args.dtype], args.revision,
                   args.variant)
    print(f"fused LoRA {info['lora']} (rank {info['rank']}, alpha {info['alpha']}, from its "
          f"{info['rank_alpha_from']}) into {args.model}/unet -> {args.out} ({args.dtype}); sample it with "
          f"LCMScheduler, timesteps={info['timesteps']}, guidance_scale=0")


if __name__ == "__main__":
    main()
