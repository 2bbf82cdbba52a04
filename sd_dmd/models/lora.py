"""LoRA files: the generator (or fake) adapter as diffusers loads it (``pytorch_lora_weights.safetensors`` with its
metadata, and ``sd_dmd_sampling.json`` beside it), the kohya/A1111/ComfyUI form, and finding one in a run directory.

DESIGN.md: ``get_peft_model_state_dict(unet, adapter_name=...)`` ->
``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=sd, unet_lora_adapter_metadata=...)``.
Without the metadata a LoRA with alpha != r reloads at the wrong scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from sd_dmd.models.shared_unet import GENERATOR, DMDModel


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, as save_lora_weights writes it


class LoraPathError(FileNotFoundError):
    """``--lora`` names no LoRA layout this package writes; the message says what was found there."""


@dataclass
class LoraSource:
    """Where a LoRA's weights are and how they were found."""

    ref: str  # the weights file, or a hub id (loaded as diffusers resolves it)
    form: str  # which layout ``--lora`` named, e.g. "checkpoint directory: its generator/"

    @property
    def file(self) -> Optional[Path]:
        p = Path(self.ref)
        return p if p.is_file() else None

    def load_into(self, pipe) -> None:
        """``pipe.load_lora_weights`` with the adapter metadata (rank, alpha) saved with the weights, step by step as
        diffusers does it, but the text encoder's part only when the file has one.

        Our LoRAs hold UNet weights alone, and ``load_lora_weights`` then logs diffusers' long "No LoRA keys associated
        to CLIPTextModel found ..." warning on every load. The UNet receives the same adapter either way
        (tests/test_model.py, tests/test_lora_forms.py)."""
        sd, network_alphas, metadata = self.state_dict(pipe)
        if not all("lora" in k for k in sd):  # diffusers' own check
            raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
        if getattr(pipe, "transformer", None) is not None:  # SD3: its transformer; its text encoders warn as above
            pipe.load_lora_into_transformer(sd, transformer=pipe.transformer, metadata=metadata, _pipeline=pipe,
                                            low_cpu_mem_usage=True)
            return
        # low_cpu_mem_usage: load_lora_weights' default with the peft and transformers of requirements.txt
        pipe.load_lora_into_unet(sd, network_alphas, pipe.unet, metadata=metadata, _pipeline=pipe,
                                 low_cpu_mem_usage=True)
        if any(k.startswith(f"{pipe.text_encoder_name}.") for k in sd):  # e.g. a kohya file with lora_te_* keys
            pipe.load_lora_into_text_encoder(sd, network_alphas, pipe.text_encoder, lora_scale=pipe.lora_scale,
                                             metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=True)

    def state_dict(self, pipe) -> tuple[dict, Optional[dict], Optional[dict]]:
        """(weights, network alphas, adapter metadata) as ``pipe`` (a pipeline or its class) reads them; SD3's
        loader returns no alphas (None)."""
        where = dict(weight_name=self.file.name) if self.file else {}
        out = pipe.lora_state_dict(str(self.file.parent) if self.file else self.ref, return_lora_metadata=True, **where)
        return (out[0], None, out[1]) if len(out) == 2 else tuple(out)

    def __str__(self) -> str:
        return f"{self.ref} ({self.form})"

    @property
    def timesteps(self) -> Optional[list[int]]:
        """The sampling timesteps training recorded beside the weights (``sd_dmd_sampling.json``), if any."""
        import json

        f = self.file
        if f is None or not (f.parent / SAMPLING_FILE).is_file():
            return None
        return [int(t) for t in json.loads((f.parent / SAMPLING_FILE).read_text())["timesteps"]]


def _is_kohya(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith(("lora_unet_", "lora_transformer_")) for k in f.keys())


def resolve_lora(path: str | Path) -> LoraSource:
    """The weights file behind ``path``: a run directory (``final/``), a ``final/`` (or any diffusers LoRA)
    directory, a ``checkpoint-N/`` directory (``generator/``), a ``.safetensors`` file, or a hub id."""
    from sd_dmd.run_dir import list_checkpoints

    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise LoraPathError(f"{path}: not a .safetensors LoRA file")
        return LoraSource(str(p), "kohya-format file" if _is_kohya(p) else "diffusers-format file")
    if p.is_dir():
        for sub, form in (("", "LoRA directory"), ("generator", "checkpoint directory: its generator/"),
                          ("final", "run directory: its final/")):
            if (p / sub / LORA_FILE).is_file():
                return LoraSource(str(p / sub / LORA_FILE), form)
        ckpts = [c.name for _, c in list_checkpoints(p)]
        hint = (f"; the run has no final/ yet, pass one of its checkpoints: {', '.join(ckpts)}" if ckpts else
                "; expected a run directory, its final/, a checkpoint-N/ or a .safetensors file")
        raise LoraPathError(f"{path}: no {LORA_FILE} here, in generator/ or in final/{hint}")
    if str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise LoraPathError(f"{path}: no such LoRA file or directory")
    return LoraSource(str(path), "hub id")


KOHYA_FILE = "lora_kohya.safetensors"


def adapter_state_dict(model: DMDModel, name: str) -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter, keys without the adapter name (as diffusers saves them)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model.unet, adapter_name=name).items()}


SAMPLING_FILE = "sd_dmd_sampling.json"  # beside a generator LoRA: its sampler, timesteps and guidance


def save_lora(model: DMDModel, out_dir: str | Path, name: str = GENERATOR) -> Path:
    """Diffusers-format LoRA (``pytorch_lora_weights.safetensors`` + adapter metadata)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = model.family.network[0]  # StableDiffusion(XL)Pipeline: "unet." keys; StableDiffusion3Pipeline: "transformer."
    model.family.pipeline_class().save_lora_weights(
        out, **{f"{net}_lora_layers": adapter_state_dict(model, name),
                f"{net}_lora_adapter_metadata": model.unet.peft_config[name].to_dict()}, safe_serialization=True)
    if name == GENERATOR:  # how to sample it: python -m sd_dmd.sample and the evaluator read this
        scheduler = "FlowMatchLCMScheduler" if model.family.flow else "LCMScheduler"
        (out / SAMPLING_FILE).write_text(json.dumps(
            {"scheduler": scheduler, "timesteps": list(model.generator_timesteps), "guidance_scale": 0.0}) + "\n")
    return out


def load_adapter(model: DMDModel, name: str, lora_dir: str | Path) -> None:
    """Load a LoRA saved by :func:`save_lora` back into adapter ``name`` (used when resuming)."""
    from peft import set_peft_model_state_dict

    sd = load_file(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"))
    sd = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in sd.items()}
    result = set_peft_model_state_dict(model.unet, sd, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{lora_dir}: LoRA does not match adapter '{name}' "
                         f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})")
    for p in model.adapter_parameters(name):
        p.data = p.data.float()


def export_kohya(model: DMDModel, path: str | Path, name: str = GENERATOR) -> Path:
    """kohya-ss keys (``lora_unet_*.lora_down/lora_up.weight``, ``.alpha``) for A1111/ComfyUI; for SD3 the
    ``lora_transformer_*`` keys ComfyUI maps for SD3 (comfy/lora.py, "OneTrainer lora": the diffusers module path with
    dots as underscores).

    diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank; we write the adapter's real alpha.
    """
    alpha = float(model.unet.peft_config[name].lora_alpha)
    if model.family.network[0] == "transformer":
        kohya = {}
        for k, v in adapter_state_dict(model, name).items():
            module, kind = k.rsplit(".lora_", 1)
            key = "lora_transformer_" + module.replace(".", "_")
            kohya[f"{key}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
    else:
        from diffusers.utils import convert_state_dict_to_kohya

        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in adapter_state_dict(model, name).items()})
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
