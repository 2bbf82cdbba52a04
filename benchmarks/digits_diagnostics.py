"""What a digits DMD run is doing, per timestep band, while it trains (issue 15's diagnostics).

    python benchmarks/digits_diagnostics.py [--steps 300] [--probe_every 25] [--eval_every 50] [-- --dmd.x y ...]
    python benchmarks/digits_diagnostics.py --table runs/diag/*.json     # the sweep table of finished runs

Everything after ``--`` is passed to the config exactly as on train_text2image.py's command line (on top of
configs/digits_dmd.yaml). The run uses the trainer's own step (``Trainer.train_step``), so what is measured is
what ``train_text2image.py`` trains. Every ``probe_every`` generator steps, on a fixed probe set (fixed noise,
prompts, timesteps), it records per timestep band:

- ``fake_loss`` / ``teacher_loss``: the eps-MSE denoising loss of the fake score and of the unguided teacher on
  the generator's samples (the fake score keeps up with G when its loss is below the teacher's);
- ``gap``: mean |mu_real - mu_fake| (the distribution-matching direction, before Eq. 8's weight);
- ``eq8_weight``: Eq. 8's 1 / mean|x - mu_real|;
- and for the whole probe: the generator's update size (relative change of G(z) since the last probe),
  and the DM-direction check: the guided teacher's denoising loss on x and on x - eta * grad_DM.

Every ``eval_every`` steps: digits-FID, coverage and prompt accuracy of G (in process, the same noise as
``sd_dmd.digits.sampling.sample_digits``). Writes a JSON record (``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BANDS = [(20, 250), (250, 500), (500, 750), (750, 980)]


def build_trainer(overrides: list[str], steps: int, log=lambda *a, **k: None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sd_dmd.config import load_config
    from sd_dmd.training.loop import Trainer
    from sd_dmd.training.config import Config

    cfg, _ = load_config(Config, ["--config", str(ROOT / "configs" / "digits_dmd.yaml"),
                                  "--train.max_steps", str(steps), *overrides])
    acc = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision if cfg.train.mixed_precision != "auto"
                      else "no")
    set_seed(cfg.train.seed)
    return Trainer(cfg, acc, log), cfg


@torch.no_grad()
def generate_eval(model, n_per_class: int, seed: int, batch: int = 250):
    """Images of G for digits 0-9, the noise of sample_digits (one generator per image)."""
    from sd_dmd.data.digits import prompt_for

    labels = torch.arange(10).repeat_interleave(n_per_class)
    prompts = [prompt_for(int(k)) for k in labels]
    shape = (model.unet.config.in_channels, 8, 8)
    z = torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed * 1_000_003 + i))
                   for i in range(len(prompts))])
    out = []
    for i in range(0, len(prompts), batch):
        x = model.generate(z[i:i + batch], model.encode_prompts(prompts[i:i + batch]))
        out.append(model.decode(x).clamp(-1, 1))
    return torch.cat(out), labels


class Probe:
    """Fixed samples, noise and timesteps, so that successive probes differ only by the training."""

    def __init__(self, model, n: int = 200, seed: int = 1234):
        from sd_dmd.data.digits import prompt_for

        g = torch.Generator("cpu").manual_seed(seed)
        self.model = model
        shape = (model.unet.config.in_channels, 8, 8)
        self.z = torch.randn((n, *shape), generator=g)
        self.cond = model.encode_prompts([prompt_for(i % 10) for i in range(n)])
        self.noise = [torch.randn((n, *shape), generator=g) for _ in BANDS]
        self.t = [torch.randint(lo, hi + 1, (n,), generator=g) for lo, hi in BANDS]
        self.last_x = None

    def _den_loss(self, x0_hat, x, t):
        a, s = self.model.schedule.alpha_sigma(t, x)
        return float(((a / s) * (x0_hat - x)).pow(2).mean())

    @torch.no_grad()
    def __call__(self, eta: float = 0.1) -> dict:
        m = self.model
        x = m.generate(self.z, self.cond).float()
        real, teacher, fake = m.real_denoiser(), m.real_denoiser(guidance_scale=1.0), m.fake_denoiser()
        rec = {"bands": []}
        grads = []
        for (lo, hi), t, n in zip(BANDS, self.t, self.noise):
            x_t = m.schedule.add_noise(x, n, t)
            mu_real, mu_teacher, mu_fake = real(x_t, t, self.cond), teacher(x_t, t, self.cond), fake(x_t, t, self.cond)
            w = 1.0 / (x - mu_real).abs().flatten(1).mean(1)
            grads.append((mu_fake - mu_real) * w.view(-1, 1, 1, 1))
            rec["bands"].append({
                "band": [lo, hi], "fake_loss": self._den_loss(mu_fake, x, t),
                "teacher_loss": self._den_loss(mu_teacher, x, t), "real_guided_loss": self._den_loss(mu_real, x, t),
                "gap": float((mu_real - mu_fake).abs().mean()), "eq8_weight": float(w.mean())})
        grad = torch.stack(grads).mean(0)  # the DM gradient averaged over the four bands
        x2 = x - eta * grad

        def teacher_loss_on(y):
            return sum(self._den_loss(real(m.schedule.add_noise(y, n, t), t, self.cond), y, t)
                       for t, n in zip(self.t, self.noise)) / len(BANDS)

        rec["dm_check"] = {"eta": eta, "teacher_loss_x": teacher_loss_on(x), "teacher_loss_after_dm_step":
                           teacher_loss_on(x2)}
        rec["x_std"] = float(x.std())
        rec["g_update"] = None if self.last_x is None else float((x - self.last_x).norm() / self.last_x.norm())
        self.last_x = x
        return rec


def run(overrides: list[str], steps: int, probe_every: int, eval_every: int, eval_per_class: int,
        eval_seed: int = 10_000, tag: str = "") -> dict:
    from sd_dmd.evaluation.digits.evaluate import digit_metrics, load_classifier

    trainer, cfg = build_trainer(overrides, steps)
    model = trainer.model
    probe = Probe(model)
    clf = load_classifier()
    record = {"overrides": overrides, "steps": steps, "probes": [], "evals": [], "train": []}
    t0 = time.time()

    def evaluate(step):
        images, labels = generate_eval(model, eval_per_class, eval_seed)
        met = digit_metrics(images, labels, clf)
        record["evals"].append({"step": step, "seconds": round(time.time() - t0, 1),
                                **{k: met[k] for k in ("digits_fid", "coverage_mean", "prompt_accuracy")}})
        print(f"{tag} step {step}: " + json.dumps(record["evals"][-1]), flush=True)

    def do_probe(step):
        rec = probe()
        rec["step"] = step
        record["probes"].append(rec)
        b = rec["bands"]
        print(f"{tag} probe {step}: fake/teacher loss per band "
              + " ".join(f"{r['fake_loss']:.3f}/{r['teacher_loss']:.3f}" for r in b)
              + " | gap " + " ".join(f"{r['gap']:.3f}" for r in b)
              + f" | g_update {rec['g_update']} | dm_check {rec['dm_check']['teacher_loss_x']:.4f}"
              f"->{rec['dm_check']['teacher_loss_after_dm_step']:.4f}", flush=True)

    do_probe(0)
    evaluate(0)
    while trainer.step < steps:
        stats, applied = trainer.train_step()
        if not applied:
            continue
        trainer.step += 1
        record["train"].append({"step": trainer.step, **{k: float(v) for k, v in stats.items()}})
        if trainer.step % probe_every == 0:
            do_probe(trainer.step)
        if trainer.step % eval_every == 0 or trainer.step == steps:
            if trainer.ema is not None:
                trainer.ema.store(trainer.gen_params)
                trainer.ema.copy_to(trainer.gen_params)
            evaluate(trainer.step)
            if trainer.ema is not None:
                trainer.ema.restore(trainer.gen_params)
    record["seconds"] = round(time.time() - t0, 1)
    return record


def table(paths: list[Path]) -> str:
    """A markdown table of finished runs: overrides, steps, wall time, best and last digits-FID / coverage."""
    lines = ["| run | overrides (on configs/digits_dmd.yaml) | steps | wall | FID start -> best (step) -> last | "
             "coverage last | accuracy last | fake/teacher loss, t 750-980, last probe |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        ev = r["evals"]
        best = min(ev, key=lambda e: e["digits_fid"])
        hi = r["probes"][-1]["bands"][-1]
        lines.append(f"| {Path(path).stem} | `{' '.join(r['overrides'])}` | {r['steps']} | {r['seconds'] / 60:.1f} min | "
                     f"{ev[0]['digits_fid']:.0f} -> {best['digits_fid']:.0f} ({best['step']}) -> "
                     f"{ev[-1]['digits_fid']:.0f} | {ev[-1]['coverage_mean']:.3f} | {ev[-1]['prompt_accuracy']:.3f} | "
                     f"{hi['fake_loss']:.4f} / {hi['teacher_loss']:.4f} |")
    return "\n".join(lines)


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--table"]:
        print(table([Path(a) for a in argv[1:]]))
        return
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--probe_every", type=int, default=25)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_per_class", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/digits_diagnostics.json"))
    args = p.parse_args(argv)
    rec = run(overrides, args.steps, args.probe_every, args.eval_every, args.eval_per_class, tag=args.out.stem)
    rec["command"] = "python benchmarks/digits_diagnostics.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out} ({rec['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
