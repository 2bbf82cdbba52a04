"""Check, before anything is loaded or written, that a run can start: the paths a training config names exist, the
output directory is a new one or this run's (``--resume`` / ``--overwrite``), a resume changes nothing the saved
adapters depend on, the tracker is installed (:func:`check_start`, also what ``--dry-run`` runs).

``check_paths(cfg)`` raises :class:`PreflightError` with one line per problem, each naming the config key,
the path and what to pass or run instead; ``find_problems(cfg)`` returns those lines. A hub id counts as
present when it is a local directory, or, under ``HF_HUB_OFFLINE=1``, when it is in the local Hugging Face
cache; online, a hub id is left to ``from_pretrained`` to download.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from sd_dmd.config import ConfigError
from sd_dmd.run_dir import CKPT_RE
from sd_dmd.training import state as ckpt
from sd_dmd.training.config import Config, resolve_precision, resume_conflicts


class PreflightError(ConfigError):
    """Paths of the config are missing; ``problems`` holds one line per problem (also the message's lines)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# the input directories of the shipped configs and the command that writes them
MAKERS = {"runs/tiny_inputs": "python -m sd_dmd.tiny", "demo_out": "python -m sd_dmd.demo --inputs_only"}


def _maker(path: str) -> Optional[str]:
    """The command that writes ``path`` when it is under an input directory of a shipped config."""
    p = Path(path)
    return next((cmd for root, cmd in MAKERS.items() if p == Path(root) or Path(root) in p.parents), None)


def _writes(path: str) -> str:
    return f" ({_maker(path)} writes it)" if _maker(path) else ""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on), at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _in_hub_cache(repo_id: str, filename: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def model_problem(key: str, name: str, marker: str, revision: Optional[str] = None,
                  check_dir: Optional[Callable[[Path], Optional[str]]] = None) -> Optional[str]:
    """Why model ``name`` cannot be loaded here, or None if it can.

    ``name`` is a local directory (checked by ``check_dir``, or for a ``marker`` file in it) or a hub id (under
    HF_HUB_OFFLINE, ``marker`` must be in the local cache).
    """
    fix = f"pass --{key} DIR_OR_HUB_ID"
    p = Path(name).expanduser()
    if p.is_dir():
        why = check_dir(p) if check_dir else (None if (p / marker).is_file() else f"no {marker}")
        return None if why is None else f"{key}: {name}: {why}; {fix}"
    if p.exists():
        return f"{key}: {name} is a file, not a model directory; {fix}"
    if not _is_hub_id(name):
        return f"{key}: {name} is neither a local directory nor a hub id 'org/name'{_writes(name)}; {fix}"
    if hub_offline() and not _in_hub_cache(name, marker, revision):
        return (f"{key}: {name} is no local directory, and as a hub id it is not in the local Hugging Face cache "
                f"(HF_HUB_OFFLINE is set){_writes(name)}; download it once online (hf download {name}) or {fix}")
    return None


def _sd_pipeline_dir(p: Path) -> Optional[str]:
    """Why the directory is no pipeline of a supported teacher family (its model_index.json, its folders), or None."""
    from sd_dmd.errors import ModelError
    from sd_dmd.models.family import detect_family

    try:
        detect_family(str(p))
    except ModelError as e:
        return str(e).removeprefix(f"{p}: ")
    return None


# torchvision's ImageNet weights that lpips.LPIPS(pretrained=True, pnet_rand=False) loads for its backbone
LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def lpips_backbone_problem(net: str) -> Optional[str]:
    """Offline, the LPIPS backbone must already be in torch's hub cache (torchvision downloads it otherwise)."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if path.is_file() or not hub_offline():
        return None
    return (f"regression.lpips_pretrained_backbone: offline and {path} is not cached (LPIPS-{net} needs it); copy "
            f"{LPIPS_BACKBONES[net]} there, or pass --regression.lpips_pretrained_backbone false (random backbone, "
            "tests only) or --regression.loss l2")


def find_problems(cfg) -> list[str]:
    """One line per missing path of a ``train_config.Config`` (empty when everything is there)."""
    from sd_dmd.run_dir import STATE_FILE
    from sd_dmd.data.store import MANIFEST
    from sd_dmd.errors import PromptError
    from sd_dmd.data.prompts import expand_sources

    problems = []
    m = cfg.model
    problem = model_problem("model.pretrained_model_name_or_path", m.pretrained_model_name_or_path,
                            "model_index.json", m.revision, check_dir=_sd_pipeline_dir)
    problems += [problem] if problem else []
    for source in cfg.data.prompts:
        try:
            expand_sources([source])
        except PromptError as e:
            problems.append(f"data.prompts: {e}{_writes(source)}; pass --data.prompts FILE... "
                            "(.txt/.jsonl/.parquet, globs, dirs)")
    r = cfg.regression
    if r.loss != "none":
        if r.decoder == "taesd":
            problem = model_problem("regression.tiny_vae", r.tiny_vae, "config.json")
            problems += [problem] if problem else []
        if r.loss == "lpips" and r.lpips_pretrained_backbone:
            problems += [lpips_backbone_problem(r.lpips_net)] if lpips_backbone_problem(r.lpips_net) else []
        store = Path(r.pairs_dir or "")
        make = "make it with " + (_maker(r.pairs_dir or "") or
                                  f"python generate_pairs.py --output_dir {r.pairs_dir} (same teacher and resolution)")
        alternatives = "pass --regression.pairs_dir DIR, or --regression.loss none"
        if not store.is_dir():
            problems.append(f"regression.pairs_dir: {r.pairs_dir} does not exist; {make}, or {alternatives}")
        elif not (store / MANIFEST).is_file():
            problems.append(f"regression.pairs_dir: {r.pairs_dir} has no {MANIFEST} (not a pairs store); {make}, "
                            f"or {alternatives}")
    real = cfg.gan.real_latents
    if real and not (Path(real) / MANIFEST).is_file():
        make = _maker(real) or f"python -m sd_dmd.encode_images --images ... --output_dir {real} (same VAE and resolution)"
        problems.append(f"gan.real_latents: {real} is not a real-latent store (no {MANIFEST}); make it with {make}, "
                        "or pass --gan.real_latents DIR")
    resume = cfg.checkpointing.resume_from
    if resume not in (None, "latest") and not (Path(resume) / STATE_FILE).is_file():
        problems.append(f"checkpointing.resume_from: {resume} is not a complete checkpoint (no {STATE_FILE}); "
                        "pass a checkpoint-N directory or 'latest'")
    return problems


def check_paths(cfg) -> None:
    """Raise :class:`PreflightError` (a ConfigError: the CLI prints each line as ``error: ...``) on problems."""
    problems = find_problems(cfg)
    if problems:
        raise PreflightError(problems)


# ----- the run directory and resume -----------------------------------------------------------------------------
# What a run directory holds; --overwrite deletes these and refuses a directory holding anything else.
RUN_ARTEFACTS = ("config.yaml", "final", "logs", "validation")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse another run's directory unless resuming or overwriting (writes nothing)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if not out.exists() or not any(out.iterdir()) or resume:
        return
    if not overwrite:
        raise ConfigError(f"output_dir: {out} already holds a run; pass --resume to continue it or "
                          "--overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in RUN_ARTEFACTS and not CKPT_RE.match(p.name.removesuffix(".tmp")))
    if foreign:
        raise ConfigError(f"output_dir: {out} holds {', '.join(foreign[:5])}, which no run writes; --overwrite "
                          "only replaces a run directory (move those away or choose another output_dir)")


def clear_output_dir(out: Path) -> None:
    """--overwrite: nothing of the old run stays (checkpoints, final/, TensorBoard events, validation images)."""
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_resume_config(cfg: Config, checkpoint: Path) -> None:
    """A resume may not change what the saved adapters are (train_config.FIXED_ON_RESUME): one error naming
    every changed key, raised before anything is written."""
    saved = ckpt.saved_config(checkpoint)
    if saved is None:
        return
    changed = resume_conflicts(saved, asdict(cfg))
    if changed:
        raise ConfigError(f"--resume from {checkpoint} with settings that differ from the saved run: "
                          f"{'; '.join(changed)} (start a new output_dir, or drop these overrides)")


def check_start(cfg: Config, resume: bool = False, overwrite: bool = False) -> Optional[Path]:
    """Every check that needs no model (``--dry-run`` runs these): output directory, paths, precision, tracker,
    resume compatibility. Settles ``cfg``'s auto values; returns the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    if resume and cfg.checkpointing.resume_from is None:
        cfg.checkpointing.resume_from = "latest"
    check_output_dir(out, cfg.checkpointing.resume_from is not None, overwrite)
    check_paths(cfg)
    resolve_precision(cfg)
    check_tracker(cfg.logging.tracker)
    check_optimizer(cfg.optim.optimizer)
    path = ckpt.resolve_resume(out, cfg.checkpointing.resume_from)
    if path is not None:
        check_resume_config(cfg, path)
    return path


def check_tracker(tracker: str) -> None:
    if tracker == "none":
        return
    import importlib.util

    if importlib.util.find_spec(tracker) is None:
        how = "pip install 'sd_dmd[wandb]'" if tracker == "wandb" else f"pip install {tracker}"
        raise ConfigError(f"logging.tracker: {tracker} is not installed ({how}, or --logging.tracker none)")


def check_optimizer(optimizer: str) -> None:
    """8-bit AdamW needs bitsandbytes, an extra: installed, diffusers and peft import it and (>= 0.49, on
    AVX512-bf16 CPUs) it asks the Hub for a CPU kernel, so make install leaves it out (docs/TRAINING.md)."""
    import importlib.util

    if optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("optim.optimizer: adamw8bit needs bitsandbytes, the [adamw8bit] extra (pip install -e "
                          "'.[adamw8bit]' -c constraints.txt), or --optim.optimizer adamw")
