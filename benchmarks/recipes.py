"""The shipped recipes against the teacher, and digits-FID against training time -> the top of docs/RESULTS.md and
docs/recipes_wall_time.png.

    OMP_NUM_THREADS=1 python benchmarks/recipes.py --rows one_step &    # rows side by side, one thread each
    OMP_NUM_THREADS=1 python benchmarks/recipes.py --rows four_step
    python benchmarks/recipes.py --calibrate                           # on an idle machine: step times alone
    python benchmarks/recipes.py --reuse                               # the rest, then the table and the picture

Rows: the 50-step teacher; `dmd` = configs/digits_dmd.yaml (DMD's recipe, the default until issue 27); `default` =
configs/digits.yaml as `make demo` trains it; `one_step` = configs/digits_dmd2_gan.yaml (the best one-step recipe);
`four_step` = configs/digits_dmd2_4step.yaml (the best four-step one). Each row trains its config as shipped (only
the input paths and the checkpoint interval are set here), then is scored as benchmarks/digits_quality.py scores a
row: 3 seeds x 100 images per digit, mean +- std. Every checkpoint's generator (its EMA where the run keeps one) is
scored on one seed and 50 images per digit. The picture's time axis: steps x the recipe's step time measured alone
(--calibrate), so that runs made under different loads compare; without it, the wall time as run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT
from digits_quality import BEGIN, END, config_matches, finished_with_same_config, lora_timesteps

KEYS = ("digits_fid", "prompt_accuracy", "coverage_mean")
ROWS = {"dmd": ("configs/digits_dmd.yaml", "before: `configs/digits_dmd.yaml`, DMD's recipe, the default until issue 27"),
        "default": ("configs/digits.yaml", "default: `configs/digits.yaml`, what `make demo` trains"),
        "one_step": ("configs/digits_dmd2_gan.yaml", "best one-step: `configs/digits_dmd2_gan.yaml`"),
        "four_step": ("configs/digits_dmd2_4step.yaml", "best four-step: `configs/digits_dmd2_4step.yaml`")}
TEACHER = "teacher, 50 steps (PNDM, CFG {g:g})"


def wall_minutes(history: list[dict], samples_per_step: int) -> dict[int, float]:
    """step -> minutes of training spent to reach it, from the logged throughput (each logged entry covers the
    steps since the previous one, checkpoint writes included)."""
    out, prev, total = {0: 0.0}, 0, 0.0
    for h in history:
        if "samples_per_s" in h:
            total += (h["step"] - prev) * samples_per_step / h["samples_per_s"] / 60
            prev = h["step"]
            out[prev] = total
    return out


def same_training(run: Path, argv: list[str]) -> bool:
    """``run``'s saved config trains what ``argv`` would: equal on every key but paths, logging and checkpoints (the
    teacher compared as a resolved path: named relative or absolute)."""
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config

    teacher = (load_config(Config, a)[0].model.pretrained_model_name_or_path
               for a in ([x for x in argv if x != "--overwrite"], ["--config", str(run / "config.yaml")]))
    return len({Path(t).resolve() for t in teacher}) == 1 and config_matches(run, argv, ignore=(
        "data.", "logging.", "checkpointing.", "gan.real_latents", "regression.pairs_dir",
        "model.pretrained_model_name_or_path"))


def ratio_median(history: list[dict]) -> float | None:
    r = [h["gan_dm_grad_ratio"] for h in history if "gan_dm_grad_ratio" in h]
    return float(np.median(r)) if r else None


def plot(curves: dict, teacher: dict, path: Path, axis: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "digits_fid", "digits-FID (lower is better)"),
                           (axes[1], "coverage_mean", "coverage (higher is better)")):
        for name, pts in curves.items():
            ax.plot([p["minutes"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name,
                    ls=":" if "not shipped" in name else "-")
        ax.axhline(teacher[key], color="k", ls="--", lw=1, label="teacher, 50 steps")
        ax.set_xlabel(axis, fontsize=8)
        ax.set_ylabel(label)
        if key == "digits_fid":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Digits students against training time (1 seed, 50 images per digit)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/recipes"))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                   help="train and score only these rows (default: all; then the table and picture are written)")
    p.add_argument("--teacher", action="store_true", help="with --rows: measure the 50-step teacher too")
    p.add_argument("--from_run", nargs="+", default=[], metavar="ROW=RUN_DIR",
                   help="score a finished run made elsewhere for ROW instead of training it (its config must train "
                        "the same; its curve is whatever checkpoints it kept)")
    p.add_argument("--reuse", action="store_true", help="keep rows whose finished run has the same resolved config")
    p.add_argument("--curve_every", type=int, default=100)
    p.add_argument("--calibrate", action="store_true",
                   help="only measure each row's seconds per step alone (30 steps; run it on an idle machine): the "
                        "picture's time axis then is steps x that, the same footing for every recipe")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--note", default="", help="a paragraph for the table (how the runs shared the machine)")
    args = p.parse_args()
    import yaml

    import train_text2image
    from sd_dmd.data.digits import TEACHER_DIR, write_prompt_file
    from sd_dmd.demo import encode_real_digits, make_inputs, shipped_guidance
    from sd_dmd.evaluation.digits.evaluate import digit_metrics, load_classifier
    from sd_dmd.evaluation.digits.sampling import (
        one_step,
        sample_digits,
        teacher_pipeline,
    )
    from sd_dmd.outputs.report import find_history
    from sd_dmd.run_dir import list_checkpoints

    clf, g = load_classifier(), shipped_guidance()
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = args.out / "inputs"
    if not (inputs / "real").exists():
        write_prompt_file(inputs / "prompts.txt", n_per_class=100, seed=0)
        encode_real_digits(inputs)

    def score(pipe, seeds, per_class, **kw) -> dict:
        ms = []
        for s in seeds:
            imgs, labels = sample_digits(pipe, per_class, 10_000 + s, **kw)
            ms.append(digit_metrics(imgs, labels, clf))
        return {k: [float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))] for k in KEYS}

    teacher_file = args.out / "teacher.json"  # measured when assembling (no --rows): side-by-side instances skip it
    if (args.rows is None or args.teacher) and not args.calibrate and not (args.reuse and teacher_file.exists()):
        pipe = teacher_pipeline(str(TEACHER_DIR))
        t = {"table": score(pipe, [0, 1, 2], 100, steps=50, guidance=g),
             "curve": {k: v[0] for k, v in score(pipe, [0], 50, steps=50, guidance=g).items()}}
        teacher_file.write_text(json.dumps(t, indent=1))
    def row_argv(name: str, run: Path) -> list[str]:
        config = ROOT / ROWS[name][0]
        argv = ["--config", str(config), "--output_dir", str(run), "--data.prompts", str(inputs / "prompts.txt"),
                "--model.pretrained_model_name_or_path", str(TEACHER_DIR), "--checkpointing.every",
                str(args.curve_every), "--checkpointing.keep_last", "0", "--overwrite"]
        shipped = yaml.safe_load(config.read_text())
        if (shipped.get("gan") or {}).get("real_latents"):
            argv += ["--gan.real_latents", str(inputs / "real")]
        if shipped["regression"]["loss"] != "none":
            make_inputs(inputs, 500)  # the teacher's pairs, as make demo makes them
            argv += ["--regression.pairs_dir", str(inputs / "pairs")]
        return argv

    if args.calibrate:  # each recipe's step time alone on this process's threads: 30 steps, the last 20 timed
        cal = {}
        for name in args.rows or list(ROWS):
            run = args.out / "calibration_run"
            train_text2image.main([*row_argv(name, run), "--train.max_steps", "30", "--logging.every", "5",
                                   "--checkpointing.every", "0"])
            batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]
            cal[name] = float(np.median([batch / h["samples_per_s"] for h in find_history(run)[0]
                                         if "samples_per_s" in h and h["step"] > 10]))
            print(f"{name}: {cal[name]:.3f} s/step alone on {torch.get_num_threads()} thread(s)", flush=True)
        (args.out / "calibration.json").write_text(json.dumps({"seconds_per_step": cal,
                                                              "threads": torch.get_num_threads()}, indent=1))
        return
    imported = dict(item.split("=", 1) for item in args.from_run)
    for name in args.rows or list(ROWS):
        run = args.out / name
        argv = row_argv(name, run)
        result = args.out / f"{name}.json"
        seconds = None  # training time as run; an imported run's is its logged one
        if name in imported:  # a finished run of the same training made elsewhere: scored, not retrained
            run = Path(imported[name])
            if not same_training(run, argv):
                raise SystemExit(f"--from_run {name}={run}: its config trains differently from {ROWS[name][0]}")
        elif args.reuse and result.exists() and finished_with_same_config(run, argv):
            print(f"{name}: reusing {run} (same resolved config)", flush=True)
            continue
        else:
            t0 = time.time()
            train_text2image.main(argv)
            seconds = time.time() - t0
            (run.parent / f"{run.name}.train_seconds.json").write_text(json.dumps({"seconds": seconds}))
        hist = find_history(run)[0]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        minutes = wall_minutes(hist, cfg["train"]["batch_size"] * cfg["train"]["gradient_accumulation_steps"])
        seconds = 60 * max(minutes.values()) if seconds is None else seconds
        ts = lora_timesteps(run / "final")
        row = score(one_step(str(TEACHER_DIR), str(run / "final")), [0, 1, 2], 100, steps=len(ts), guidance=0.0,
                    timesteps=ts)
        curve = []
        for step, path in [(0, None), *list_checkpoints(run)]:
            lora = None if path is None else path / "generator_ema" if (path / "generator_ema").exists() \
                else path / "generator"
            m = score(one_step(str(TEACHER_DIR), None if lora is None else str(lora)), [0], 50, steps=len(ts),
                      guidance=0.0, timesteps=ts)
            curve.append({"step": step, "minutes": minutes.get(step, float("nan")), **{k: v[0] for k, v in m.items()}})
            print(name, curve[-1], flush=True)
        result.write_text(json.dumps({"row": row, "train_seconds": seconds, "steps": ts, "curve": curve,
                                      "run": str(run),
                                      "gan_dm_grad_ratio_median": ratio_median(hist),
                                      "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), "
                                                 f"torch {torch.__version__}"}, indent=1))
    if args.rows is None:
        write_results(args, json.loads(teacher_file.read_text()), g)


def targets(rows: dict, t: dict) -> list[str]:
    """Issue 27's targets, each with where the measured row stands."""
    def x(n, k):
        return rows[n]["row"][k][0] / t[k][0]

    out = ["Targets (issue 27):", ""]
    for n, fid, cov in (("default", 1.2, 0.8), ("one_step", 0.85, 0.85), ("four_step", 0.8, 0.95)):
        if n in rows:
            out.append(f"- {ROWS[n][1].split(':')[0]}: digits-FID {x(n, 'digits_fid'):.2f}x the teacher's (target <= "
                       f"{fid}x): {'met' if x(n, 'digits_fid') <= fid else 'missed'}; coverage "
                       f"{x(n, 'coverage_mean'):.2f}x (target >= {cov}x): "
                       f"{'met' if x(n, 'coverage_mean') >= cov else 'missed'}")
    if "default" in rows:
        gap = (t["prompt_accuracy"][0] - rows["default"]["row"]["prompt_accuracy"][0]) * 100
        out.append(f"- default: prompt accuracy {gap:+.1f} points below the teacher's (target within 2): "
                   f"{'met' if abs(gap) <= 2 else 'missed'}")
    if "one_step" in rows and "four_step" in rows:
        one, four = rows["one_step"]["row"], rows["four_step"]["row"]
        fid = one["digits_fid"][0] - four["digits_fid"][0] > max(one["digits_fid"][1], four["digits_fid"][1])
        cov = four["coverage_mean"][0] - one["coverage_mean"][0] > max(one["coverage_mean"][1],
                                                                      four["coverage_mean"][1])
        out.append(f"- four steps beat one by more than the seed spread: digits-FID {fid} "
                   f"({four['digits_fid'][0]:.1f} vs {one['digits_fid'][0]:.1f}), coverage {cov} "
                   f"({four['coverage_mean'][0]:.3f} vs {one['coverage_mean'][0]:.3f})")
    return [*out, ""]


def write_results(args, teacher: dict, g: float) -> None:
    rows = {n: json.loads((args.out / f"{n}.json").read_text()) for n in ROWS if (args.out / f"{n}.json").exists()}
    cal_file = args.out / "calibration.json"
    cal = json.loads(cal_file.read_text()) if cal_file.exists() else None
    if cal:  # every recipe on the same footing: its steps x its step time measured alone
        for n, r in rows.items():
            for pt in r["curve"]:
                pt["minutes"] = pt["step"] * cal["seconds_per_step"][n] / 60
        axis = f"training time (minutes at {cal['threads']} CPU thread(s) alone: steps x each recipe's step time)"
    else:
        axis = "training wall time as run (minutes; the load differed between runs)"
    curves = {ROWS[n][1].split(":")[0]: r["curve"] for n, r in rows.items()}
    for n in rows:  # the same recipe with the adaptive GAN weight (target 1.0), where that was run: not shipped
        f = args.out / f"{n}_adaptive.json"
        if f.exists():
            pts = json.loads(f.read_text())["curve"]
            if cal:
                pts = [{**pt, "minutes": pt["step"] * cal["seconds_per_step"][n] / 60} for pt in pts]
            curves[ROWS[n][1].split(":")[0] + ", adaptive GAN weight (not shipped)"] = pts
    plot(curves, teacher["curve"], args.results.parent / "recipes_wall_time.png", axis)
    t = teacher["table"]

    def line(label, r, steps, minutes="", ratio=""):
        return (f"| {label} | {steps} | {r['digits_fid'][0]:.1f} +- {r['digits_fid'][1]:.1f} | "
                f"{r['digits_fid'][0] / t['digits_fid'][0]:.2f} | {r['coverage_mean'][0]:.3f} +- "
                f"{r['coverage_mean'][1]:.3f} | {r['coverage_mean'][0] / t['coverage_mean'][0]:.2f} | "
                f"{r['prompt_accuracy'][0]:.3f} | {minutes} | {ratio} |")

    machine = next(iter(rows.values()))["machine"]
    block = [BEGIN, "", "## The shipped recipes", "",
             "| model | sampling steps | digits-FID (lower is better) | x teacher | coverage | x teacher | "
             "prompt accuracy | training steps | training time alone | wall time as run | "
             "GAN/DM gradient ratio (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             line(TEACHER.format(g=g), t, 50, "| | "),
             *[line(ROWS[n][1], r["row"], len(r["steps"]),
                    f"{r['curve'][-1]['step']} | "
                    + (f"{r['curve'][-1]['minutes']:.1f} min" if cal else "") + f" | {r['train_seconds'] / 60:.1f} min",
                    "" if r["gan_dm_grad_ratio_median"] is None else f"{r['gan_dm_grad_ratio_median']:.2f}")
               for n, r in rows.items()], "",
             f"Generated by `python benchmarks/recipes.py` on {machine}. Mean +- std over 3 seeds x 1000 images, "
             "scored as every row below; 'x teacher' divides by the 50-step teacher at CFG "
             f"{g:g}. Each config trains as shipped. 'Training time alone': the steps x the recipe's step time "
             + (f"measured alone on {cal['threads']} thread(s) (`--calibrate`)" if cal else "(not calibrated)")
             + "; 'wall time as run': what the run took, its load noted below.", "",
             *targets(rows, t), *([args.note, ""] if args.note else []),
             "![digits-FID against wall time](recipes_wall_time.png)", "",
             "`recipes_wall_time.png`: every checkpoint's generator (one seed, 50 images per digit) against the "
             "training time it took to reach it (see the axis); the dashed line is the 50-step teacher on the same "
             "images.",
             "", END]
    text = args.results.read_text() if args.results.exists() else "# Results\n"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + "\n".join(block) + text[text.index(END) + len(END):]
    else:
        head, _, rest = text.partition("\n\n")
        text = head + "\n\n" + "\n".join(block) + "\n\n" + rest
    args.results.write_text(text)
    print("\n".join(block))


if __name__ == "__main__":
    main()
