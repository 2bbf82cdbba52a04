"""A run's training state on disk and back: adapters, optimisers, LR schedules, EMA, GAN head, GradScaler, RNG
history, and what a resume that changes the run's shape must convert (another learning rate, another number of fake
updates per step, another split of the batch). Without pickles: tensors in safetensors,
everything else in JSON.

A checkpoint is written into ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N/`` only when complete
(``trainer_state.json`` is its last file), so a kill during the write leaves nothing that resume picks.

Layout of ``checkpoint-N/``: ``config.yaml``, ``generator/`` and ``fake/`` (LoRAs as diffusers loads them),
``optimizer_{generator,fake[,discriminator]}.safetensors`` + ``.json``, ``gan_head.safetensors``,
``ema_generator.safetensors`` and ``generator_ema/``, ``trainer_state.json``. No random state: a step's draws are a
function of (seed, step, sample) (training/draws.py), whatever the process count (checkpoints from before issue 34
also hold ``rng-R.safetensors`` per process, no longer read).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from sd_dmd.config import save_config
from sd_dmd.outputs.hub import checkpoint_branch, try_push
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
                 "gan_weight": t.gan_weight.state_dict(), "divergence": t.divergence.state_dict(),
                 "history": t.history}
        atomic_json(tmp / STATE_FILE, json.loads(json.dumps(state, default=float)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        rotate(t.out, t.cfg.checkpointing.keep_last)
        t.log(f"saved {final}")
        hub = t.cfg.hub
        if hub.every_checkpoint:  # the LoRA final/ would get (the EMA one when there is one), to branch step-N
            lora = final / ("generator_ema" if t.ema is not None else "generator")
            try_push(lora, hub.model_id, t.log, private=hub.private, token=hub.token,
                     branch=checkpoint_branch(t.step), message=f"sd_dmd: generator LoRA at step {t.step}")
    acc.wait_for_everyone()
    t.saved_step = t.step
    return final


def load_checkpoint(t, path: Path) -> None:
    """Load ``checkpoint-N/`` into Trainer ``t``: everything it saved, in the objects ``t`` built at step 0. What was
    built but not saved (an EMA or GAN head switched on at this resume) is set from the loaded state, with a note.
    What changes the meaning of a step is converted (fake updates per step) or continues unchanged with a note (the
    batch's split and size: every saved position counts updates, not samples)."""
    state = json.loads((path / STATE_FILE).read_text())
    saved_cfg = saved_config(path) or {}
    load_adapter(t.model, GENERATOR, path / "generator")
    load_adapter(t.model, FAKE, path / "fake")
    load_optimizer(t.opt_g.optimizer, path / "optimizer_generator")
    load_optimizer(t.opt_f.optimizer, path / "optimizer_fake")
    t.sched_g.load_state_dict(state["sched_generator"])
    t.sched_f.load_state_dict(state["sched_fake"])
    t.step = state["step"]
    shift, notes = _convert_fake_positions(t, state, saved_cfg)
    notes += _load_gan_head(t, path, state, shift) + _load_ema(t, path, state)
    lr_changes = [f"{name} {old:g} -> {new:g}" for name, old, new in (
        ("optim.lr_generator", *set_base_lr(t.opt_g, t.sched_g, t.cfg.optim.lr_generator)),
        ("optim.lr_fake", *set_base_lr(t.opt_f, t.sched_f, t.cfg.optim.lr_fake))) if old != new]
    if state.get("scaler") and t.acc.scaler is not None:
        t.acc.scaler.load_state_dict(state["scaler"])
    t.nonfinite_total = state["nonfinite_total"]
    t.gan_weight.load_state_dict(state.get("gan_weight"))  # adaptive mode's smoothed ratio (absent: none yet)
    t.divergence.load_state_dict(state.get("divergence"))  # f-distill's ratio statistics (absent: none yet)
    t.history = state["history"]
    if lr_changes:  # DMD2's second stage: the same run, resumed at a lower learning rate
        notes.append(f"resumed at step {t.step} with {', '.join(lr_changes)} (the schedule continues from there)")
    notes += _batch_notes(t, path, state, saved_cfg)
    for note in notes:
        t.history.append({"step": t.step, "note": note})
        t.log(note)
    t.log(f"resumed from {path} at step {t.step}")


def global_batch(cfg, acc) -> int:
    """Distribution-matching samples per update, over all processes and micro-batches."""
    return cfg.train.batch_size * cfg.train.gradient_accumulation_steps * acc.num_processes


def saved_config(checkpoint: Path) -> Optional[dict]:
    """The config a checkpoint was made with (its own ``config.yaml``, else its run's), or None when it has none."""
    import yaml

    for p in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml"):
        if p.is_file():
            return yaml.safe_load(p.read_text()) or {}
    return None


def _convert_fake_positions(t, state: dict, saved_cfg: dict) -> tuple[int, list[str]]:
    """The fake score's and the head's schedules count fake updates: a resume with another
    ``dmd.fake_updates_per_step`` moves them to where a run with the new value stands at this step (s x new, less
    the updates the saved run skipped as non-finite), so that the step-down and the warm-up fall where the new
    config puts them. Before (issue 34): the saved count was read in the new units (1 -> 2 after the step-down put
    the fake score back before it, at 4x its lr). Moves the fake score's schedule; returns (the shift, for the
    head's, notes)."""
    old_k = int(((saved_cfg.get("dmd") or {}).get("fake_updates_per_step")) or t.cfg.dmd.fake_updates_per_step)
    new_k = t.cfg.dmd.fake_updates_per_step
    if old_k == new_k:
        return 0, []
    saved = int(state["sched_fake"]["last_epoch"])
    skipped = max(0, t.step * old_k - saved)
    shift = max(0, t.step * new_k - skipped) - saved
    t.sched_f.last_epoch = saved + shift
    return shift, [f"resumed at step {t.step} with dmd.fake_updates_per_step {old_k} -> {new_k}: the fake score's "
                   f"schedule moves from update {saved} to {t.sched_f.last_epoch} (step {t.step} x {new_k}"
                   + (f", less {skipped} skipped" if skipped else "") + ")"]


def _batch_notes(t, path: Path, state: dict, saved_cfg: dict) -> list[str]:
    """A resume with another split of the batch (processes, micro-batches) draws the same samples as the run that
    was never stopped (training/draws.py); with another global batch, the schedules, the EMA and the GAN weight go
    on counting updates, and the history says so."""
    notes = []
    if (path / "rng-0.safetensors").exists():
        notes.append(f"resumed at step {t.step} from a checkpoint written before per-sample draws (issue 34): its "
                     "per-process random streams are not read; the draws from here are keyed by (seed, step, sample)")
    tr = saved_cfg.get("train") or {}
    old_p = int(state.get("num_processes", t.acc.num_processes))
    old = dict(batch=int(tr.get("batch_size", t.cfg.train.batch_size)),
               acc=int(tr.get("gradient_accumulation_steps", t.cfg.train.gradient_accumulation_steps)), p=old_p)
    new = dict(batch=t.cfg.train.batch_size, acc=t.cfg.train.gradient_accumulation_steps, p=t.acc.num_processes)
    if old == new:
        return notes
    split = "{p} process(es) x {acc} micro-batch(es) of {batch}"
    g_old, g_new = old["batch"] * old["acc"] * old_p, global_batch(t.cfg, t.acc)
    what = (f"the same global batch of {g_new}: the draws are those of the run that was never stopped"
            if g_old == g_new else
            f"global batch {g_old} -> {g_new}: the schedules, the EMA and the GAN weight go on counting updates")
    notes.append(f"resumed at step {t.step} on {split.format(**new)}, saved with {split.format(**old)}; {what}")
    return notes


def _load_gan_head(t, path: Path, state: dict, shift: int = 0) -> list[str]:
    if not t.head_params:
        return []
    if (path / "gan_head.safetensors").exists():
        t.model.gan_head.load_state_dict(load_file(str(path / "gan_head.safetensors")))
        load_optimizer(t.opt_d.optimizer, path / "optimizer_discriminator")
        t.sched_d.load_state_dict(state["sched_discriminator"])
        t.sched_d.last_epoch += shift  # it counts fake updates too, in step with the fake score's
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
