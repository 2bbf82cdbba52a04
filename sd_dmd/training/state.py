"""A run's training state on disk and back: adapters, optimisers, LR schedules, EMA, GAN head, GradScaler, RNG
streams, history, and the learning-rate reset of a resume at another rate. Without pickles: tensors in safetensors,
everything else in JSON.

A checkpoint is written into ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N/`` only when complete
(``trainer_state.json`` is its last file), so a kill during the write leaves nothing that resume picks.

Layout of ``checkpoint-N/``: ``config.yaml``, ``generator/`` and ``fake/`` (LoRAs as diffusers loads them),
``optimizer_{generator,fake[,discriminator]}.safetensors`` + ``.json``, ``gan_head.safetensors``,
``ema_generator.safetensors`` and ``generator_ema/``, ``rng-R.safetensors`` per process, ``trainer_state.json``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sd_dmd.config import save_config
from sd_dmd.models.lora import load_adapter, save_lora
from sd_dmd.models.shared_unet import FAKE, GENERATOR
from sd_dmd.run_dir import STATE_FILE, list_checkpoints


TENSOR_REF = "__safetensors_key__"


def _split_tensors(obj, path: str, tensors: dict):
    """Replace every tensor in a nested dict/list by ``{TENSOR_REF: key}``, collecting it in ``tensors``.

    Any depth: bitsandbytes' 8-bit AdamW nests its quantisation state under
    ``__bnb_optimizer_quant_state__``. Keys are paths of the (stringified) dict keys."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"optimizer state at {path!r} holds a {type(obj).__name__}, which checkpoints cannot store")


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if TENSOR_REF in obj:
            return tensors[obj[TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_optimizer(optimizer, path: Path) -> None:
    """optimizer.state_dict() as ``path.safetensors`` (tensors) + ``path.json`` (the structure, with the
    original key types: dict items are stored as [key, value] pairs so integer parameter ids stay ints)."""
    tensors: dict = {}
    meta = _split_tensors(optimizer.state_dict(), "", tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_optimizer(optimizer, path: Path) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    state = _join_tensors(json.loads(path.with_suffix(".json").read_text()), tensors)
    optimizer.load_state_dict(state)


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_resume(output_dir: Path, resume_from: Optional[str]) -> Optional[Path]:
    if resume_from is None:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume_from)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"{p}: not a complete checkpoint (no {STATE_FILE})")
    return p


def rotate(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and stale ``.tmp`` ones."""
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for _, p in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def save_rng(generator: torch.Generator, path: Path) -> None:
    save_file({"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}, str(path))


def load_rng(generator: torch.Generator, path: Path) -> None:
    st = load_file(str(path))
    generator.set_state(st["generator"])
    torch.set_rng_state(st["torch_cpu"])


def resume_seed(seed: int, step: int, rank: int) -> int:
    """Seed of process ``rank``'s streams after a resume at ``step`` on another process count: a function of
    (seed, step, rank) only, so every rank of every re-launch derives the same, distinct streams."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ----- a trainer's state: save and load ------------------------------------------------------------------------
def save_checkpoint(t) -> Path:
    """Write Trainer ``t``'s state to ``checkpoint-{step}/`` (every process: its RNG stream; the main one: the rest)."""
    acc = t.acc
    final = t.out / f"checkpoint-{t.step}"
    tmp = t.out / f"checkpoint-{t.step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_rng(t.rng, tmp / f"rng-{acc.process_index}.safetensors")
    if acc.is_main_process:
        save_config(t.cfg, tmp / "config.yaml")  # what a resume must stay compatible with
        save_lora(t.model, tmp / "generator", GENERATOR)
        save_lora(t.model, tmp / "fake", FAKE)
        save_optimizer(t.opt_g.optimizer, tmp / "optimizer_generator")
        save_optimizer(t.opt_f.optimizer, tmp / "optimizer_fake")
        if t.head_params:
            save_file({k: v.contiguous() for k, v in t.model.gan_head.state_dict().items()},
                      str(tmp / "gan_head.safetensors"))
            save_optimizer(t.opt_d.optimizer, tmp / "optimizer_discriminator")
        if t.ema is not None:
            save_file({f"{i}": p.contiguous() for i, p in enumerate(t.ema.shadow_params)},
                      str(tmp / "ema_generator.safetensors"))
            t.ema.store(t.gen_params)  # the EMA weights as a LoRA diffusers loads (what final/ gets)
            t.ema.copy_to(t.gen_params)
            save_lora(t.model, tmp / "generator_ema", GENERATOR)
            t.ema.restore(t.gen_params)
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": t.step, "num_processes": acc.num_processes,
                 "nonfinite_total": t.nonfinite_total,
                 "sched_generator": t.sched_g.state_dict(), "sched_fake": t.sched_f.state_dict(),
                 "sched_discriminator": t.sched_d.state_dict() if t.sched_d is not None else None,
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "ema_optimization_step": t.ema.optimization_step if t.ema is not None else None,
                 "gan_weight": t.gan_weight.state_dict(), "history": t.history}
        atomic_json(tmp / STATE_FILE, json.loads(json.dumps(state, default=float)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        rotate(t.out, t.cfg.checkpointing.keep_last)
        t.log(f"saved {final}")
    acc.wait_for_everyone()
    t.saved_step = t.step
    return final


def load_checkpoint(t, path: Path) -> None:
    """Load ``checkpoint-N/`` into Trainer ``t``: everything it saved, in the objects ``t`` built at step 0. What was
    built but not saved (an EMA or GAN head switched on at this resume) is set from the loaded state, with a note."""
    state = json.loads((path / STATE_FILE).read_text())
    load_adapter(t.model, GENERATOR, path / "generator")
    load_adapter(t.model, FAKE, path / "fake")
    load_optimizer(t.opt_g.optimizer, path / "optimizer_generator")
    load_optimizer(t.opt_f.optimizer, path / "optimizer_fake")
    t.sched_g.load_state_dict(state["sched_generator"])
    t.sched_f.load_state_dict(state["sched_fake"])
    notes = _load_gan_head(t, path, state) + _load_ema(t, path, state)
    lr_changes = [f"{name} {old:g} -> {new:g}" for name, old, new in (
        ("optim.lr_generator", *set_base_lr(t.opt_g, t.sched_g, t.cfg.optim.lr_generator)),
        ("optim.lr_fake", *set_base_lr(t.opt_f, t.sched_f, t.cfg.optim.lr_fake))) if old != new]
    if state.get("scaler") and t.acc.scaler is not None:
        t.acc.scaler.load_state_dict(state["scaler"])
    t.step = state["step"]
    t.nonfinite_total = state["nonfinite_total"]
    t.gan_weight.load_state_dict(state.get("gan_weight"))  # adaptive mode's smoothed ratio (absent: none yet)
    t.history = state["history"]
    if lr_changes:  # DMD2's second stage: the same run, resumed at a lower learning rate
        notes.append(f"resumed at step {t.step} with {', '.join(lr_changes)} (the schedule continues from there)")
    for note in notes:
        t.history.append({"step": t.step, "note": note})
        t.log(note)
    _load_streams(t, path, state["num_processes"])


def _load_gan_head(t, path: Path, state: dict) -> list[str]:
    if not t.head_params:
        return []
    if (path / "gan_head.safetensors").exists():
        t.model.gan_head.load_state_dict(load_file(str(path / "gan_head.safetensors")))
        load_optimizer(t.opt_d.optimizer, path / "optimizer_discriminator")
        t.sched_d.load_state_dict(state["sched_discriminator"])
        set_base_lr(t.opt_d, t.sched_d, t.cfg.optim.lr_fake)
        return []
    # DMD2's second stage: the GAN switched on when resuming a run made without it. The fresh head's schedule (built
    # at step 0) takes the fake score's position at its first fake turn (turns.fake_turn), as when gan.start_step
    # switches it on mid-run
    return [f"GAN on from step {max(state['step'], t.cfg.gan.start_step)}: the discriminator head starts fresh"]


def _load_ema(t, path: Path, state: dict) -> list[str]:
    if t.ema is None:
        return []
    if (path / "ema_generator.safetensors").exists():
        saved = load_file(str(path / "ema_generator.safetensors"))
        for i, p in enumerate(t.ema.shadow_params):
            p.data.copy_(saved[str(i)])
        t.ema.optimization_step = state["ema_optimization_step"]
        return []
    from diffusers.training_utils import EMAModel  # switched on at resume: it was built from the B = 0 adapter

    t.ema = EMAModel(t.gen_params, decay=t.cfg.train.ema_decay)
    return [f"EMA on from step {state['step']}: it starts from the resumed generator (the checkpoint has none)"]


def _load_streams(t, path: Path, saved_n: int) -> None:
    n = t.acc.num_processes
    if saved_n == n:  # the same streams continue: bit-exact with a run that was never stopped
        load_rng(t.rng, path / f"rng-{t.acc.process_index}.safetensors")
        t.log(f"resumed from {path} at step {t.step}")
        return
    # a preempted cluster came back with another GPU count: fresh streams, derived, never reused
    seed = resume_seed(t.cfg.train.seed, t.step, t.acc.process_index)
    t.rng.manual_seed(seed)
    torch.manual_seed(seed)
    note = (f"resumed at step {t.step} on {n} process(es), saved with {saved_n}: per-process RNG streams "
            f"re-seeded from (seed {t.cfg.train.seed}, step {t.step}, rank); global batch "
            f"{saved_n * t.samples_per_step_per_process()} -> {n * t.samples_per_step_per_process()}")
    t.history.append({"step": t.step, "note": note})
    t.log(f"resumed from {path}; {note}")


def follow_schedule(optimizer, scheduler, leader, lr: float) -> None:
    """``scheduler`` (the GAN head's) takes ``leader``'s position (the fake score's) and applies its lr there: a
    head built at step 0 whose GAN switched on later (a resume, or gan.start_step) would restart at the peak."""
    scheduler.last_epoch = leader.last_epoch
    set_base_lr(optimizer, scheduler, lr)


def set_base_lr(optimizer, scheduler, lr: float) -> tuple[float, float]:
    """Make the configured ``lr`` the schedule's base after a resume; returns (saved base, new base).

    The optimiser's and the scheduler's state dicts both carry the saved run's lr (``initial_lr``,
    ``base_lrs``), so without this a resume at another learning rate silently kept the old one. The
    schedule's shape (warm-up, decay) is the new config's, evaluated at the step reached."""
    saved = float(scheduler.base_lrs[0])
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return saved, lr
