"""Issue 36: divergence x guidance placement on the digits instrument, at equal steps -> docs/RESULTS.md's table.

    python benchmarks/divergence_grid.py [--config configs/digits.yaml] [--rows reverse_kl js ...] \
        [--extra='--train.seed 1'] [--eval_seeds 0 1 2] [--per_class 100] [--out runs/divergence_grid]

Each row trains ``--config`` as shipped plus the row's overrides (train_text2image.py's code, in this process), then
samples 100 images per digit for each evaluation seed from ``final/`` in a fresh diffusers pipeline and scores them
(digits-FID, prompt accuracy, per-class coverage: sd_dmd.evaluation.digits). The teacher (50 PNDM steps at the
config's real-score CFG) is measured once with the same seeds. Finished rows are reused (their results.json and a
config that still matches); one row at a time (2 cores: side by side they slow each other several-fold).
Prints one table: each metric's mean +- std over seeds, the ratio to the teacher, training minutes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("digits_fid", "prompt_accuracy", "coverage_mean")
ROWS = {  # name -> overrides on top of --config
    "reverse_kl": [],
    "js": ["--dmd.divergence", "js"],
    "forward_kl": ["--dmd.divergence", "forward_kl"],
    "anti_cfg": ["--dmd.fake_guidance", "-0.5"],
    "zero_cfg": ["--dmd.real_guidance_scale", "1", "--dmd.fake_conditioning", "none",
                 "--regression.allow_guidance_mismatch", "true"],
    "js_anti_cfg": ["--dmd.divergence", "js", "--dmd.fake_guidance", "-0.5"],
}


def measure(pipe, seeds, per_class, clf, **kw) -> dict:
    from sd_dmd.evaluation.digits.evaluate import digit_metrics
    from sd_dmd.evaluation.digits.sampling import sample_digits

    ms = [digit_metrics(*sample_digits(pipe, per_class, 10_000 + s, **kw), clf) for s in seeds]
    row = {k: [float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))] for k in KEYS}
    row["coverage_per_class"] = {c: float(np.mean([m["coverage_per_class"][c] for m in ms]))
                                 for c in ms[0]["coverage_per_class"]}
    return row


def train_row(name: str, argv: list[str], run: Path) -> float:
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import train

    cfg = load_config(Config, argv + ["--output_dir", str(run), "--checkpointing.every", "0"])[0]
    t0 = time.time()
    train(cfg, overwrite=True)
    return (time.time() - t0) / 60


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--extra", default="", help="overrides for every row, one string: --extra='--train.seed 1'")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/divergence_grid"))
    args = p.parse_args()
    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.evaluation.digits.evaluate import load_classifier
    from sd_dmd.evaluation.digits.sampling import one_step, teacher_pipeline
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config

    torch.set_num_threads(2)
    clf = load_classifier()
    args.out.mkdir(parents=True, exist_ok=True)
    import shlex

    args.extra = shlex.split(args.extra)
    base = ["--config", args.config, *args.extra]
    guidance = load_config(Config, base)[0].dmd.real_guidance_scale
    teacher_file = args.out / f"teacher_cfg{guidance:g}_{'-'.join(map(str, args.eval_seeds))}x{args.per_class}.json"
    if not teacher_file.exists():
        teacher_file.write_text(json.dumps(measure(teacher_pipeline(str(TEACHER_DIR)), args.eval_seeds,
                                                   args.per_class, clf, steps=50, guidance=guidance)))
    teacher = json.loads(teacher_file.read_text())
    results = {}
    for name in args.rows:
        argv = base + ROWS[name]
        run = args.out / name
        done = run / "results.json"
        if done.exists() and json.loads(done.read_text()).get("argv") == argv:
            results[name] = json.loads(done.read_text())
            print(f"{name}: reused {done}", flush=True)
            continue
        minutes = train_row(name, argv, run)
        row = measure(one_step(str(TEACHER_DIR), str(run / "final")), args.eval_seeds, args.per_class, clf,
                      steps=1, guidance=0.0, timesteps=[999])
        results[name] = {"argv": argv, "train_minutes": minutes, **row}
        done.write_text(json.dumps(results[name], indent=1))
        print(name, results[name], flush=True)
    print_table(args, teacher, results, guidance)


def print_table(args, teacher: dict, results: dict, guidance: float) -> None:
    print(f"\n`python benchmarks/divergence_grid.py --config {args.config} {' '.join(args.extra)}` on "
          f"{platform.machine()} ({torch.get_num_threads()} threads), seeds {args.eval_seeds} x {args.per_class} "
          f"per digit; teacher: 50 PNDM steps, CFG {guidance:g}\n")
    print("| row | overrides | digits-FID | x teacher | coverage | x teacher | accuracy | train min |")
    print("|---|---|---|---|---|---|---|---|")
    t = teacher
    print(f"| teacher | | {t['digits_fid'][0]:.1f} ± {t['digits_fid'][1]:.1f} | 1.00 | {t['coverage_mean'][0]:.3f} "
          f"| 1.00 | {t['prompt_accuracy'][0]:.3f} | |")
    for name, r in results.items():
        print(f"| {name} | `{' '.join(ROWS[name]) or '(as shipped)'}` | {r['digits_fid'][0]:.1f} ± "
              f"{r['digits_fid'][1]:.1f} | {r['digits_fid'][0] / t['digits_fid'][0]:.2f} | "
              f"{r['coverage_mean'][0]:.3f} ± {r['coverage_mean'][1]:.3f} | "
              f"{r['coverage_mean'][0] / t['coverage_mean'][0]:.2f} | {r['prompt_accuracy'][0]:.3f} | "
              f"{r['train_minutes']:.1f} |")


if __name__ == "__main__":
    main()
