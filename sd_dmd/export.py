"""Saving the adapters: diffusers LoRA format (with metadata), kohya/A1111/ComfyUI format, fused UNet.

DESIGN.md: ``get_peft_model_state_dict(unet, adapter_name=...)`` ->
``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=sd, unet_lora_adapter_metadata=...)``.
Without the metadata a LoRA with alpha != r reloads at the wrong scale.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import FAKE, GENERATOR, DMDModel

KOHYA_FILE = "lora_kohya.safetensors"


def adapter_state_dict(model: DMDModel, name: str) -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter, keys without the adapter name (as diffusers saves them)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model.unet, adapter_name=name).items()}


def save_lora(model: DMDModel, out_dir: str | Path, name: str = GENERATOR) -> Path:
    """Diffusers-format LoRA (``pytorch_lora_weights.safetensors`` + adapter metadata)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=adapter_state_dict(model, name),
        unet_lora_adapter_metadata=model.unet.peft_config[name].to_dict(), safe_serialization=True)
    return out


def load_adapter(model: DMDModel, name: str, lora_dir: str | Path) -> None:
    """Load a LoRA saved by :func:`save_lora` back into adapter ``name`` (used when resuming)."""
    from peft import set_peft_model_state_dict

    sd = load_file(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"))
    sd = {k.removeprefix("unet."): v for k, v in sd.items()}
    result = set_peft_model_state_dict(model.unet, sd, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{lora_dir}: LoRA does not match adapter '{name}' "
                         f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})")
    for p in model.adapter_parameters(name):
        p.data = p.data.float()


def export_kohya(model: DMDModel, path: str | Path, name: str = GENERATOR) -> Path:
    """kohya-ss keys (``lora_unet_*.lora_down/lora_up.weight``, ``.alpha``) for A1111/ComfyUI.

    diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank; we write the adapter's real alpha.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    sd = {f"unet.{k}": v for k, v in adapter_state_dict(model, name).items()}
    kohya = convert_state_dict_to_kohya(sd)
    alpha = float(model.unet.peft_config[name].lora_alpha)
    for k in kohya:
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(kohya, str(tmp), metadata={"ss_network_module": "networks.lora",
                                         "ss_network_dim": str(model.unet.peft_config[name].r),
                                         "ss_network_alpha": str(alpha)})
    tmp.replace(path)
    return path


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
