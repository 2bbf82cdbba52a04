"""DMD training of the generator and fake-score LoRAs on one shared UNet (DESIGN.md, paper Alg. 1).

Each step: a generator turn (distribution matching + lambda_reg * regression) and then
``fake_updates_per_step`` fake-score turns on detached generator samples.

Multi-process: the UNet is not wrapped in DDP. Only the adapter being stepped has gradients, and they
are averaged across processes by hand (one flat all-reduce) before clipping, which is exactly DDP's
mean-reduction without DDP's trouble with two alternating adapters on one module.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import torch

from sd_dmd.config import save_config
from sd_dmd.errors import TrainingError
from sd_dmd.run_dir import list_checkpoints
from sd_dmd.training import artifacts, turns
from sd_dmd.training import state as ckpt
from sd_dmd.training.build import check_precision, load_data, load_model, make_optimisation
from sd_dmd.training.config import Config
from sd_dmd.training.divergence import DivergenceWeights
from sd_dmd.training.draws import Draws
from sd_dmd.training.gan_weight import GANWeight
from sd_dmd.training.preflight import check_start, clear_output_dir
from sd_dmd.training.tracking import start_trackers


class Trainer:
    """One run: what build.py makes from the config (model, data, optimisation), the step counter and history; the
    loop. What a step computes is in turns.py, the state's save and load in state.py, what a run writes in
    artifacts.py."""

    def __init__(self, cfg: Config, accelerator, log=print):
        self.cfg, self.acc, self.log = cfg, accelerator, log
        self.out = Path(cfg.output_dir)
        check_precision(cfg, accelerator)
        self.model, self.latent_shape = load_model(cfg, accelerator.device)
        data = load_data(cfg, self.model, accelerator.device, log)
        self.prompts, self.store, self.reg_loss, self.real_store = (data.prompts, data.store, data.reg_loss,
                                                                    data.real_store)
        opt = make_optimisation(cfg, self.model, accelerator, gan=self.real_store is not None)
        self.gen_params, self.fake_params, self.head_params = opt.gen_params, opt.fake_params, opt.head_params
        self.opt_g, self.opt_f, self.opt_d = opt.opt_g, opt.opt_f, opt.opt_d
        self.sched_g, self.sched_f, self.sched_d, self.ema = opt.sched_g, opt.sched_f, opt.sched_d, opt.ema
        self.draws = Draws(cfg, self.prompts, self.latent_shape, self.model.schedule.num_train_timesteps,
                           accelerator.device, accelerator.process_index, self.store, self.real_store)
        self.gan_weight = GANWeight(cfg.gan, self._mean_over_processes)  # fixed or adaptive (gan.weight_mode)
        self.divergence = DivergenceWeights(cfg.dmd, self._mean_over_processes)  # f-distill (dmd.divergence)
        self.step = 0
        self.attempt = 0  # retries of this step after a non-finite generator turn (each draws new samples)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self.saved_step = None  # step of the last checkpoint written
        self.stop_signal = None  # set by the SIGTERM/SIGINT handler

    # ----- what a step reads ---------------------------------------------------------------------------
    def gan_on(self) -> bool:
        return self.real_store is not None and self.step >= self.cfg.gan.start_step

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.item() > 0

    def _mean_over_processes(self, values: list[float]) -> list[float]:
        if self.acc.num_processes == 1:
            return values
        return self.acc.reduce(torch.tensor(values, device=self.acc.device, dtype=torch.float64),
                               reduction="mean").tolist()

    # ----- the two turns ----------------------------------------------------------------------------
    def generator_turn(self) -> tuple[dict, bool, list]:
        return turns.generator_turn(self)

    def fake_turn(self, samples: Optional[list] = None, turn: int = 0) -> tuple[dict, bool]:
        return turns.fake_turn(self, samples, turn)

    def train_step(self) -> tuple[dict, bool]:
        return turns.train_step(self)

    # ----- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        ckpt.load_checkpoint(self, path)


    # ----- validation -------------------------------------------------------------------------------
    def validation_grid(self, tag: str) -> Optional[Path]:
        return artifacts.validation_grid(self, tag)

    # ----- final export -----------------------------------------------------------------------------
    def export_final(self) -> Path:
        return artifacts.export_final(self)

    # ----- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, acc = self.cfg, self.acc
        from tqdm.auto import tqdm

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="dmd",
                   dynamic_ncols=True)
        t_last, samples = time.time(), 0
        while self.step < cfg.train.max_steps:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            stats, applied = self.train_step()
            self._count_nonfinite(stats, applied)
            self.attempt = 0 if applied else self.attempt + 1
            if applied:
                self.step += 1
                samples += ckpt.global_batch(cfg, acc)
                bar.update(1)
                if self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps:
                    dt = time.time() - t_last
                    stats.update(samples_per_s=samples / max(dt, 1e-9), lr_generator=self.sched_g.get_last_lr()[0],
                                 nonfinite_total=self.nonfinite_total)
                    if torch.cuda.is_available():
                        stats["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    t_last, samples = time.time(), 0
                    self._log_stats(stats, bar)
                if cfg.logging.validation_every and self.step % cfg.logging.validation_every == 0:
                    self.validation_grid(f"step-{self.step:06d}")
                if cfg.checkpointing.every and self.step % cfg.checkpointing.every == 0:
                    self.save_checkpoint()
            if self.any_process(self.stop_signal is not None):  # every process stops at the same step
                self._stop(bar)
        bar.close()
        acc.wait_for_everyone()
        return self.export_final()

    def _count_nonfinite(self, stats: dict, applied: bool) -> None:
        skipped_fake = stats.get("fake_updates_skipped", 0)
        if applied and not skipped_fake:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        what = (f"step {self.step + 1}: non-finite loss or gradient on some process; step skipped, nothing updated"
                if not applied else f"step {self.step}: {skipped_fake} non-finite fake-score update(s) skipped")
        if self.acc.scaler is not None:
            what += f" (fp16 loss scale now {self.acc.scaler.get_scale():g})"
        self.log(f"{what} ({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)")
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            last = list_checkpoints(self.out)
            raise TrainingError(f"{self.nonfinite_in_a_row} consecutive non-finite steps; stopping. Last good "
                                f"checkpoint: {last[-1][1] if last else 'none'}")

    def _log_stats(self, stats: dict, bar) -> None:
        self.history.append({"step": self.step, **{k: round(float(v), 6) for k, v in stats.items()}})
        self.acc.log(stats, step=self.step)
        if self.acc.is_main_process:
            bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss_dm", "loss_reg", "loss_fake") if k in stats})
            self.log(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def _stop(self, bar) -> None:
        """SIGTERM/SIGINT reached some process: all of them write one checkpoint and exit (143 / 130)."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a stop signal on another process"
        self.log(f"{name} received: writing a checkpoint and stopping")
        if self.saved_step != self.step:  # decided from state every process shares: no process waits alone
            self.save_checkpoint()
        bar.close()
        raise SystemExit(130 if self.stop_signal == signal.SIGINT else 143)

    def _on_stop_signal(self, signum, frame):
        self.stop_signal = signum


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> "Trainer":
    """Run (or resume) training; returns the Trainer, whose ``final`` is the exported LoRA directory.

    Every check (config, precision, resume compatibility, model, prompts, pairs) runs before the output
    directory is touched, so a failed start leaves it as it was."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    path = check_start(cfg, resume, overwrite)
    resuming = cfg.checkpointing.resume_from is not None
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision,
                      log_with=None if cfg.logging.tracker == "none" else cfg.logging.tracker,
                      project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    set_seed(cfg.train.seed)  # identical LoRA initialisation on every process
    log = print if acc.is_main_process else (lambda *a, **k: None)
    trainer = Trainer(cfg, acc, log)  # loads and checks the model, prompts and pairs
    acc.wait_for_everyone()
    if acc.is_main_process:
        if overwrite and out.exists():
            clear_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    log(trainer.model.describe())
    if trainer.model.family.flow:  # the DM range as the sigmas it covers (the teacher's shift applied)
        log(f"DM timesteps: {trainer.model.schedule.describe_range(cfg.dmd.t_min, cfg.dmd.t_max)}")
    start_trackers(acc, cfg, out)
    if path is not None:
        trainer.load_checkpoint(path)
    elif resuming:
        log("no checkpoint to resume from; starting at step 0")
    trainer.final = trainer.fit()
    acc.end_training()
    log(f"done: generator LoRA at {trainer.final} (load with pipe.load_lora_weights('{trainer.final}'))")
    return trainer

