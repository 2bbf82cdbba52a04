"""Quality of DMD variants on the shipped digits teacher -> docs/RESULTS.md and docs/quality_curve.png.

    python benchmarks/digits_quality.py [--out runs/digits_quality] [--steps N] [--eval_seeds 0 1 2]

Rows: the teacher at 50 steps (PNDM, CFG 3 = the real score's guidance) and at one step, with CFG 3 and without
guidance (the latter is exactly the generator before training: its LoRA starts at zero); then one-step generators
distilled with DMD's recipe (configs/digits_dmd.yaml: the default before issue 27) and the ablations of the paper's
Table 2 on top of it, and the DMD2 rows of issue 16. Every distillation uses the scripts a user runs
(generate_pairs.py, train_text2image.py with its config plus the overrides shown). The shipped recipes of today
(configs/digits.yaml, digits_dmd2_gan.yaml, digits_dmd2_4step.yaml as shipped): benchmarks/recipes.py. Final
metrics load ``final/`` into a fresh diffusers pipeline; the curve evaluates every checkpoint's generator LoRA the
same way on one seed. Metrics: digits-FID, prompt accuracy, mean per-class
coverage, each the mean +- std over the evaluation seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd_dmd.demo import shipped_guidance  # noqa: E402

GUIDANCE = shipped_guidance()  # the real score's CFG in configs/digits.yaml; pairs and teacher rows use it
TEACHER_50 = f"teacher, 50 steps (PNDM, CFG {GUIDANCE:g})"
TEACHER_50_CFG3 = "teacher, 50 steps (PNDM, CFG 3: the reference before issue 15)"
TEACHER_1 = f"teacher, 1 step (CFG {GUIDANCE:g})"
TEACHER_1_NOCFG = "teacher, 1 step, no CFG (= G at step 0)"
BEGIN, END = "<!-- recipes.py: begin -->", "<!-- recipes.py: end -->"  # benchmarks/recipes.py's block


@dataclass(frozen=True)
class Row:
    """One distilled row: ``train_text2image.py --config configs/<config>.yaml`` plus ``overrides``, trained in
    ``run_dir(out, name)``. Its name is its label everywhere (table, curves, picture, commands, --variants) and the
    key of every lookup (``ROW``); rows name other rows by the Row itself."""

    name: str
    overrides: tuple[str, ...] = ()  # on top of the config; "REAL": the benchmark's real digits as latents
    config: str = "digits_dmd"  # configs/<config>.yaml
    resume: Row | None = None  # a second stage: resumes this row's finished run (a new output_dir, no --overwrite)
    resume_step: int | None = None  # ... from its checkpoint at this step
    table2: bool = False  # an ablation of the paper's Table 2: the targets check "shipped < this row"
    one_step_twin: Row | None = None  # a 4-step row: "4 steps beat 1" compares it with this 1-step row
    gan_control: Row | None = None  # the same training without the GAN: "the GAN's own share" compares them


# the DMD2 configs as issue 16 measured them (since issue 27 they ship adaptive GAN weights, a step-down, 1,800 steps)
_ISSUE16 = ("--train.max_steps", "400", "--optim.lr_scheduler", "constant_with_warmup", "--gan.weight_mode", "fixed",
            "--gan.generator_weight", "1e-3", "--gan.discriminator_weight", "1e-2")
_X64 = ("--gan.generator_weight", "0.064", "--gan.discriminator_weight", "0.64")  # see the x64 row
_1200 = ("--train.max_steps", "1200", "--checkpointing.every", "200")
_STAGE2 = ("--train.max_steps", "1800", "--checkpointing.every", "200", "--optim.lr_generator", "1e-4",
           "--optim.lr_fake", "3e-4")
# every row, in the order of the tables, curves and picture; the shipped recipe is the first
ROWS = [
    Row("DMD recipe (configs/digits_dmd.yaml)"),
    Row("distribution matching only (DMD2-style)", ("--regression.loss", "none"), table2=True),
    Row("regression only", ("--dmd.dm_weight", "0"), table2=True),
    Row("the recipe before issue 15", (
        "--optim.lr_generator", "1e-3", "--optim.lr_fake", "1e-3", "--dmd.fake_updates_per_step", "1",
        "--dmd.fake_loss_weighting", "eps", "--train.max_steps", "400", "--regression.weight", "0.25",
        "--regression.loss", "l2", "--train.ema_decay", "0", "--dmd.real_guidance_scale", "3")),
    # DMD2 (issue 16): their own configs; the GAN rows train against the 1,797 real digits (sd_dmd.encode_images)
    Row("DMD2 (TTUR 2, no regression)", config="digits_dmd2"),
    (_gan := Row("DMD2 + GAN", _ISSUE16, config="digits_dmd2_gan")),
    Row("DMD2 + GAN, 4 steps", _ISSUE16, config="digits_dmd2_4step", one_step_twin=_gan),
    Row("DMD + GAN (with regression)", ("--gan.real_latents", "REAL")),
    # DMD2's SD1.5 weights balance a per-sample GAN loss against per-element DM/fake losses over 4x64x64 latents;
    # over the digits' 4x8x8 the same weights are 64x weaker relative to them: this row scales both by 64
    Row("DMD2 + GAN x64 (weights scaled to the latent size)", _ISSUE16 + _X64, "digits_dmd2_gan"),
    # the curves still fall at 400 steps: the x64 GAN row and its no-GAN control, trained 3x longer (checkpoints
    # every 200 steps; runs finished by a resume count, and a note beside their time says so: see time_notes)
    (_control := Row("DMD2, 1200 steps (TTUR 2, no regression; the control for the row below)", _1200,
                     "digits_dmd2")),
    (_x64_1200 := Row("DMD2 + GAN x64, 1200 steps", _ISSUE16 + _X64 + _1200, "digits_dmd2_gan",
                      gan_control=_control)),
    Row("DMD2 + GAN x256, 1200 steps", (*_ISSUE16, "--gan.generator_weight", "0.256", "--gan.discriminator_weight",
                                        "2.56", *_1200), "digits_dmd2_gan"),
    # DMD2's second stage (their SD1.5 recipe drops the lr ~20x for it): the finished x64 run resumed for 600 more
    # steps at a lower lr, from its checkpoint at resume_step
    (_x64_stage2 := Row("DMD2 + GAN x64, 1200 steps, then 600 at lr/3 (DMD2's second stage)", _ISSUE16 + _X64 + _STAGE2,
                        "digits_dmd2_gan", resume=_x64_1200, resume_step=1200)),
    # 4 steps by backward simulation with the 1-step x64 rows' weights, length and second stage: "4 steps beat 1"
    (_x64_4 := Row("DMD2 + GAN x64, 4 steps, 1200 steps", _ISSUE16 + _X64 + _1200, "digits_dmd2_4step",
                   one_step_twin=_x64_1200)),
    Row("DMD2 + GAN x64, 4 steps, 1200 steps, then 600 at lr/3 (DMD2's second stage)", _ISSUE16 + _X64 + _STAGE2,
        "digits_dmd2_4step", resume=_x64_4, resume_step=1200, one_step_twin=_x64_stage2),
]
ROW = {r.name: r for r in ROWS}  # name -> row: --variants and every table look rows up by name
assert len(ROW) == len(ROWS), "two rows share a name"
SHIPPED = ROWS[0].name


def run_dir(out: Path, name: str) -> Path:
    return out / re.sub(r"[^A-Za-z0-9]+", "_", name.split(" (")[0]).strip("_")


def lora_timesteps(lora) -> list[int]:
    """The sampling timesteps training recorded beside a generator LoRA ([999] for one step, or no LoRA)."""
    from sd_dmd.models.lora import resolve_lora

    return (resolve_lora(str(lora)).timesteps if lora is not None else None) or [999]


def checkpoint_curve(run: Path, measure_one) -> list[dict]:
    """digits metrics of every checkpoint's generator LoRA (its EMA when the run keeps one: what final/ gets;
    one seed), in step order."""
    from sd_dmd.run_dir import list_checkpoints

    return [{"step": step, **measure_one(path / "generator_ema" if (path / "generator_ema").exists()
                                          else path / "generator")} for step, path in list_checkpoints(run)]


def finished_with_same_config(run: Path, argv: list[str]) -> bool:
    """``run`` holds a finished training whose saved config equals what ``argv`` resolves to (output_dir aside)."""
    if not ((run / "final" / "pytorch_lora_weights.safetensors").exists() and seconds_file(run).exists()
            and (run / "config.yaml").exists()):
        return False
    return config_matches(run, argv)


def config_matches(run: Path, argv: list[str], ignore: tuple[str, ...] = ()) -> bool:
    """``run``'s saved config equals what ``argv`` resolves to, but for output_dir and the keys under ``ignore``
    (dotted prefixes: "logging." or "gan.real_latents")."""
    from sd_dmd.config import load_config, to_dict
    from sd_dmd.training.config import Config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    want = flat(to_dict(load_config(Config, [a for a in argv if a != "--overwrite"])[0]))
    have = flat(to_dict(load_config(Config, ["--config", str(run / "config.yaml")])[0]))
    # output_dir differs by design; "auto" values (precision) are saved resolved; a run finished by a resume (which
    # continues bit-exactly) saved resume_from, which counts only where argv names one (a second stage)
    return all(want[k] == have.get(k) for k in want
               if k != "output_dir" and want[k] != "auto" and not k.startswith(ignore)
               and not (k == "checkpointing.resume_from" and want[k] is None))


def seconds_file(run: Path) -> Path:
    return run.parent / f"{run.name}.train_seconds.json"


def plot_curves(curves: dict, levels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    colors = plt.get_cmap("tab20").colors  # more rows than tab10's 10 colours
    for ax, key, label in ((axes[0], "digits_fid", "digits-FID (lower is better)"),
                           (axes[1], "coverage_mean", "coverage (higher is better)")):
        for i, (name, pts) in enumerate(curves.items()):
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name,
                    color=colors[(2 * i) % 20 + (2 * i) // 20])  # tab20's dark shades first, then light
        for (name, lv), style in zip(levels.items(), ("--", ":", "-.")):
            ax.axhline(lv[key], color="k", ls=style, lw=1, label=name)
        ax.set_xlabel("generator step")
        ax.set_ylabel(label)
        if key == "digits_fid":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)  # below both plots, covering neither
    fig.suptitle("Digits generators while they train (curve: 1 seed; table: 3 seeds)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/digits_quality"))
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: each row's config)")
    p.add_argument("--num_pairs", type=int, default=500)
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--curve_every", type=int, default=50, help="checkpoint (curve point) every N generator steps")
    p.add_argument("--curve_per_class", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=None, help="names of the variants to run (default: all)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--reuse", action="store_true",
                   help="keep what OUT already holds: teacher rows measured with the same seeds and image count, and "
                        "variants whose finished run has the same resolved config (training is deterministic, so a "
                        "rerun would repeat it); everything else is measured again")
    args = p.parse_args()
    import train_text2image

    from sd_dmd.demo import encode_real_digits, make_inputs
    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.evaluation.digits.evaluate import digit_metrics, load_classifier
    from sd_dmd.evaluation.digits.sampling import one_step, sample_digits, save_grid, teacher_pipeline

    t0 = time.time()
    clf = load_classifier()
    rows, grids, times, curves, time_notes = {}, {}, {}, {}, {}
    keys = ("digits_fid", "prompt_accuracy", "coverage_mean")

    cache_file = args.out / "teacher_rows.json"
    cache = json.loads(cache_file.read_text()) if args.reuse and cache_file.exists() else {}
    cache_key = f"seeds={args.eval_seeds} per_class={args.per_class}"

    def measure_teacher(name, make_pipe, **kw):
        """The teacher rows take most of the benchmark's evaluation time (3000 images at 50 steps)."""
        from safetensors.torch import load_file, save_file

        hit = cache.get(name, {})
        if hit.get("key") == cache_key and (args.out / "teacher_grids.safetensors").exists():
            rows[name] = hit["row"]
            grids[name] = load_file(str(args.out / "teacher_grids.safetensors"))[name]
            print(name, "(reused)", rows[name], flush=True)
            return
        measure(name, make_pipe(), **kw)
        cache[name] = {"key": cache_key, "row": rows[name]}
        args.out.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
        save_file({k: v.contiguous() for k, v in grids.items() if k in cache},
                  str(args.out / "teacher_grids.safetensors"))

    def curve_level(name, make_pipe, **kw):
        key = f"curve: seed=10000 per_class={args.curve_per_class}"
        hit = cache.get("curve " + name, {})
        if hit.get("key") != key:
            imgs, labels = sample_digits(make_pipe(), args.curve_per_class, 10_000, **kw)
            hit = {"key": key, "row": {k: v for k, v in digit_metrics(imgs, labels, clf).items() if k in keys}}
            cache["curve " + name] = hit
            cache_file.write_text(json.dumps(cache, indent=1))
        return hit["row"]

    def measure(name, pipe, **kw):
        ms, t = [], time.time()
        for s in args.eval_seeds:
            imgs, labels = sample_digits(pipe, args.per_class, 10_000 + s, **kw)
            ms.append(digit_metrics(imgs, labels, clf))
        n = len(args.eval_seeds) * len(imgs)
        grids[name] = imgs[::args.per_class]  # the first image of each digit 0-9 (same noise for every row)
        rows[name] = {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))) for k in keys}
        rows[name]["ms_per_image"] = (time.time() - t) * 1000 / n
        print(name, rows[name], flush=True)

    def measure_one(lora):
        ts = lora_timesteps(lora)
        imgs, labels = sample_digits(one_step(str(TEACHER_DIR), None if lora is None else str(lora)),
                                     args.curve_per_class, 10_000, steps=len(ts), guidance=0.0, timesteps=ts)
        return {k: v for k, v in digit_metrics(imgs, labels, clf).items() if k in keys}

    measure_teacher(TEACHER_50, lambda: teacher_pipeline(str(TEACHER_DIR)), steps=50, guidance=GUIDANCE)
    if GUIDANCE != 3:
        measure_teacher(TEACHER_50_CFG3, lambda: teacher_pipeline(str(TEACHER_DIR)), steps=50, guidance=3.0)
    measure(TEACHER_1, one_step(str(TEACHER_DIR), None), steps=1, guidance=GUIDANCE, timesteps=[999])
    measure(TEACHER_1_NOCFG, one_step(str(TEACHER_DIR), None), steps=1, guidance=0.0, timesteps=[999])
    start = measure_one(None)  # every curve's step 0: the generator's LoRA starts at zero
    inputs = args.out / "inputs"
    make_inputs(inputs, args.num_pairs)
    real = encode_real_digits(inputs)  # the real digits as the teacher's VAE latents: what the GAN rows discriminate
    commands = {}
    names = args.variants or [r.name for r in ROWS]
    for name in names:
        row = ROW[name]
        extra = row.overrides
        run = run_dir(args.out, name)
        pairs = inputs / "pairs"
        if "--dmd.real_guidance_scale" in extra:  # regression targets made with that guidance
            g = float(extra[extra.index("--dmd.real_guidance_scale") + 1])
            if g != GUIDANCE:
                pairs = args.out / f"inputs_cfg{g:g}" / "pairs"
                make_inputs(pairs.parent, args.num_pairs, guidance=g)
        config = row.config
        extra = [str(real) if a == "REAL" else a for a in extra]
        if config != "digits_dmd" and "GAN" in name:  # the config names demo_out/real; the benchmark has its own
            extra = extra + ["--gan.real_latents", str(real)]
        argv = ["--config", str(ROOT / "configs" / f"{config}.yaml"), "--output_dir", str(run),
                "--regression.pairs_dir", str(pairs), "--data.prompts", str(inputs / "prompts.txt"),
                "--model.pretrained_model_name_or_path", str(TEACHER_DIR), "--overwrite",
                "--checkpointing.every", str(args.curve_every), "--checkpointing.keep_last", "0", *extra]
        if args.steps:
            argv += ["--train.max_steps", str(args.steps)]
        parent = None
        if row.resume is not None:  # resumes another row's finished run: a new output_dir, so no --overwrite
            parent = run_dir(args.out, row.resume.name)
            argv = [a for a in argv if a != "--overwrite"] + [
                "--checkpointing.resume_from", str(parent / f"checkpoint-{row.resume_step}")]
        if args.reuse and finished_with_same_config(run, argv):
            saved = json.loads(seconds_file(run).read_text())
            times[name] = saved["seconds"]
            if saved.get("note"):  # how the time was made, when not by this script alone (written beside it)
                time_notes[name] = saved["note"]
            print(f"{name}: reusing the finished run in {run} (same resolved config)", flush=True)
        else:
            if parent is not None and run.exists():
                shutil.rmtree(run)
            t = time.time()
            train_text2image.main(argv)
            times[name] = time.time() - t
            saved = {"seconds": times[name]}
            if parent is not None:  # the row's model took both stages
                first = json.loads(seconds_file(parent).read_text())["seconds"]
                saved = {"seconds": first + times[name], "note": (
                    f"both stages: '{row.resume.name}' ({first:.0f} s) and the second stage resumed from its "
                    f"step {row.resume_step} ({times[name]:.0f} s)")}
                times[name] = saved["seconds"]
                time_notes[name] = saved["note"]
            seconds_file(run).write_text(json.dumps(saved))
        commands[name] = (f"python train_text2image.py --config configs/{config}.yaml "
                          + " ".join(a.replace(str(real), "demo_out/real") for a in extra)
                          + (f" --checkpointing.resume_from <the run of '{row.resume.name}'>/checkpoint-"
                             f"{row.resume_step}" if parent is not None else ""))
        ts = lora_timesteps(run / "final")
        measure(name, one_step(str(TEACHER_DIR), str(run / "final")), steps=len(ts), guidance=0.0, timesteps=ts)
        first = [{"step": 0, **start}]
        if parent is not None and row.resume.name in curves:  # the second stage continues its first's curve
            first = [c for c in curves[row.resume.name] if c["step"] <= row.resume_step]
        curves[name] = first + checkpoint_curve(run, measure_one)
        print(name, "curve", curves[name], flush=True)

    docs = args.results.parent
    docs.mkdir(parents=True, exist_ok=True)
    # the teacher's levels measured like the curve points (one seed, curve_per_class per digit): coverage and FID
    # depend on the number of images, so the table's 3-seed values would not sit on the same scale
    levels = {TEACHER_50: curve_level(TEACHER_50, lambda: teacher_pipeline(str(TEACHER_DIR)), steps=50,
                                      guidance=GUIDANCE),
              TEACHER_1: curve_level(TEACHER_1, lambda: one_step(str(TEACHER_DIR), None), steps=1, guidance=GUIDANCE,
                                     timesteps=[999]),
              TEACHER_1_NOCFG: start}
    plot_curves(curves, levels, docs / "quality_curve.png")
    # the picture: teacher rows next to student rows, the same noise and prompt in every column
    order = [TEACHER_50, names[0], TEACHER_1_NOCFG, TEACHER_1, *names[1:]]
    save_grid(torch.cat([grids[n] for n in order]), docs / "digits_variants.png", nrow=10)
    gan_history = {}
    for name in names:  # the discriminator's accuracies as the run logged them: over-fitting on 1,797 real digits?
        run = run_dir(args.out, name)
        ckpts = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda f: int(f.parent.name.split("-")[1]))
        if "GAN" in name and ckpts:
            hist = json.loads(ckpts[-1].read_text())["history"]
            gan_history[name] = [h for h in hist if "gan_d_real_acc" in h]
    write_results(args, rows, times, commands, names, order, t0, gan_history, time_notes)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "times_s": times, "curves": curves}, indent=2))


def sampling_steps(name: str) -> int:
    return 50 if name.startswith("teacher, 50") else 4 if "4 steps" in name else 1


def row_line(name, r, teacher, times) -> str:
    """One table row without its overrides cell (the full table adds it)."""
    return (f"| {name} | {sampling_steps(name)} | {r['digits_fid'][0]:.1f} +- {r['digits_fid'][1]:.1f} | "
            f"{r['digits_fid'][0] / teacher['digits_fid'][0]:.2f} | "
            f"{r['prompt_accuracy'][0]:.3f} +- {r['prompt_accuracy'][1]:.3f} | "
            f"{r['coverage_mean'][0]:.3f} +- {r['coverage_mean'][1]:.3f} | "
            f"{r['coverage_mean'][0] / teacher['coverage_mean'][0]:.2f} | {r['ms_per_image']:.1f} | "
            f"{f'{times[name] / 60:.1f} min' if name in times else ''} |")


def at_a_glance(rows, times, teacher) -> list[str]:
    """The rows a user needs first: the 50-step teacher, the shipped recipe, the best one-step and few-step students
    (lowest digits-FID among the distilled rows), and the quality curve."""
    students = [n for n in rows if n in ROW]
    best = {k: min((n for n in students if sampling_steps(n) == k), key=lambda n: rows[n]["digits_fid"][0], default=None)
            for k in (1, 4)}
    pick = [TEACHER_50, SHIPPED, best[1], best[4]]
    pick = [n for i, n in enumerate(pick) if n is not None and n in rows and n not in pick[:i]]
    return ["## DMD and DMD2 variants (issue 16) at a glance", "",
            "| model | sampling steps | digits-FID (lower is better) | x teacher | prompt accuracy | coverage | "
            "x teacher | ms / image | training time |",
            "|---|---|---|---|---|---|---|---|---|",
            *[row_line(n, rows[n], teacher, times) for n in pick], "",
            "Mean +- std over the evaluation seeds; 'x teacher' divides by the 50-step teacher at CFG "
            f"{GUIDANCE:g}. The DMD recipe is `configs/digits_dmd.yaml`, what `make demo` ran before issue 27 "
            "([DMD2.md](DMD2.md) for "
            "the GAN recipes).", "", "![quality curve](quality_curve.png)", "",
            "`quality_curve.png`: digits-FID and coverage of every checkpoint's generator against training step, "
            "with the teacher's levels as lines (one seed, 50 images per digit).", ""]


def write_results(args, rows, times, commands, names, order, t0, gan_history=None, time_notes=None):
    gan_history, time_notes = gan_history or {}, time_notes or {}
    teacher, one = rows[TEACHER_50], rows[TEACHER_1]
    full = args.out / "full_run_minutes.json"
    if not args.reuse:
        full.write_text(json.dumps({"minutes": (time.time() - t0) / 60}))
    reused = (f" (with --reuse: the 50-step teacher rows and the runs whose resolved config had not changed came "
              f"from earlier runs in {args.out} (the first full run took {json.loads(full.read_text())['minutes']:.0f} "
              "min); the other runs were trained, and every one-step row, the curves and the pictures measured, in "
              "this one)" if args.reuse and full.exists() else "")
    old = args.results.read_text() if args.results.exists() else ""
    kept = old[old.index(BEGIN):old.index(END) + len(END)] if BEGIN in old and END in old else ""
    lines = [
        "# Results: DMD variants on the digits teacher",
        "",
        *([kept, ""] if kept else []),  # benchmarks/recipes.py's table of the shipped recipes stays on top
        *at_a_glance(rows, times, teacher),
        "## All rows",
        "",
        f"Generated by `python benchmarks/digits_quality.py{' --steps ' + str(args.steps) if args.steps else ''}"
        f"{' --reuse' if args.reuse else ''}` "
        f"on {platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{(time.time() - t0) / 60:.0f} min in all{reused}. Teacher: `sd_dmd/assets/digits_teacher` (32 px, latents 4x8x8). "
        f"Pairs: {args.num_pairs} from the 50-step PNDM teacher at CFG {GUIDANCE:g} (`generate_pairs.py`). "
        f"'x teacher' divides by the 50-step teacher at CFG {GUIDANCE:g}, the real score's guidance. Distillation: "
        "`configs/digits_dmd.yaml` (or the config a row names) with the overrides below. Evaluation: "
        f"{args.per_class} images per digit ('a handwritten digit k') per seed, seeds "
        f"{[10_000 + s for s in args.eval_seeds]}; mean +- std over those {len(args.eval_seeds)} seeds (each model "
        "is trained once). Every row uses the same noise per image.",
        "",
        "| model | sampling steps | digits-FID (lower is better) | x teacher | prompt accuracy | coverage | "
        "x teacher | ms / image | training time | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ov = [("demo_out/real" if a == "REAL" else a) for a in (ROW[name].overrides if name in ROW else ())]
        lines.append(row_line(name, r, teacher, times) + (f" {'`' + ' '.join(ov) + '`' if ov else ''} |"))
    lines += ["", "## Targets (the DMD recipe, one step: the default before issue 27)", ""]
    if SHIPPED in rows:
        s = rows[SHIPPED]
        fid_x = s["digits_fid"][0] / teacher["digits_fid"][0]
        cov_x = s["coverage_mean"][0] / teacher["coverage_mean"][0]
        acc_gap = (teacher["prompt_accuracy"][0] - s["prompt_accuracy"][0]) * 100
        lines += [
            f"- digits-FID {s['digits_fid'][0]:.1f} = {fid_x:.2f}x the 50-step teacher's (target <= 1.3x): "
            f"{'met' if fid_x <= 1.3 else 'missed'}",
            f"- coverage {s['coverage_mean'][0]:.3f} = {cov_x:.2f}x the teacher's (target >= 0.8x): "
            f"{'met' if cov_x >= 0.8 else 'missed'}",
            f"- prompt accuracy {acc_gap:+.1f} points below the teacher (target within 2): "
            f"{'met' if abs(acc_gap) <= 2 else 'missed'}",
            f"- better than the 1-step teacher (CFG {GUIDANCE:g}): {s['digits_fid'][0] < one['digits_fid'][0]}; than G at step 0 "
            f"(1 step, no CFG): {s['digits_fid'][0] < rows[TEACHER_1_NOCFG]['digits_fid'][0]}",
        ]
        for other in [r.name for r in ROWS if r.table2]:
            if other in rows:
                lines.append(f"- Table 2 ordering, DMD recipe < {other}: "
                             f"{s['digits_fid'][0] < rows[other]['digits_fid'][0]} "
                             f"({s['digits_fid'][0]:.1f} vs {rows[other]['digits_fid'][0]:.1f})")
    gan_rows = [n for n in rows if "GAN" in n]
    if gan_rows:
        lines += ["", "## DMD2 targets (issue 16)", "",
                  "digits-FID is measured against the 1,797 real digits (the same real set the GAN rows discriminate "
                  "against), as every row here.", ""]
        for n in gan_rows:
            lines.append(f"- {n}: digits-FID {rows[n]['digits_fid'][0]:.1f} vs the 50-step teacher's "
                         f"{teacher['digits_fid'][0]:.1f}: student beats its teacher: "
                         f"{rows[n]['digits_fid'][0] < teacher['digits_fid'][0]}")
        for four, one_gan in [(r.name, r.one_step_twin.name) for r in ROWS if r.one_step_twin is not None]:
            if four in rows and one_gan in rows:
                lines.append(f"- 4 steps beat 1 step ('{four}' vs '{one_gan}'): "
                             f"{rows[four]['digits_fid'][0] < rows[one_gan]['digits_fid'][0]} "
                             f"({rows[four]['digits_fid'][0]:.1f} vs {rows[one_gan]['digits_fid'][0]:.1f} digits-FID; "
                             f"coverage {rows[four]['coverage_mean'][0]:.3f} vs {rows[one_gan]['coverage_mean'][0]:.3f})")
        for long_gan, ctrl in [(r.name, r.gan_control.name) for r in ROWS if r.gan_control is not None]:
            if ctrl in rows and long_gan in rows:
                lines.append(f"- the GAN's own share, at 1200 steps: DMD2 + GAN x64 "
                             f"{rows[long_gan]['digits_fid'][0]:.1f} vs DMD2 without it "
                             f"{rows[ctrl]['digits_fid'][0]:.1f} digits-FID; coverage "
                             f"{rows[long_gan]['coverage_mean'][0]:.3f} vs {rows[ctrl]['coverage_mean'][0]:.3f}")
        for n in gan_rows:
            d = gan_history.get(n)
            if d:
                lines.append(f"- {n}, the discriminator over the run (logged every 50 steps, step: accuracy on real / on "
                             "generated latents): " + ", ".join(f"{h['step']}: {h['gan_d_real_acc']:.2f}/"
                                                                 f"{h['gan_d_fake_acc']:.2f}" for h in d))
    lines += [
        "",
        "![quality curve](quality_curve.png)",
        "",
        "`quality_curve.png`: digits-FID and coverage of every checkpoint's generator (the EMA one where the run keeps "
        f"it: what final/ gets), with the teacher's levels as lines, all on one seed and {args.curve_per_class} images "
        "per digit (so their values sit a little apart from the table's 3-seed ones; step 0 is the no-CFG row).",
        "",
        "## Reading it",
        "",
        f"- The 50-step teacher at CFG 3, the reference of the earlier table, re-measures at "
        f"{rows[TEACHER_50_CFG3]['digits_fid'][0]:.1f} digits-FID and {rows[TEACHER_50_CFG3]['coverage_mean'][0]:.3f} "
        "coverage here (the earlier table, made with torch 2.14.1, said 120.0 and 0.581; the evaluator and sampler "
        "code did not change, the cause was not found). Against it the DMD recipe's student is at "
        f"{rows[SHIPPED]['digits_fid'][0] / rows[TEACHER_50_CFG3]['digits_fid'][0]:.2f}x FID; against the teacher "
        "at the real score's own guidance (CFG 1.75, the one distillation targets), the ratios above." if
        TEACHER_50_CFG3 in rows and SHIPPED in rows else "- (no CFG-3 reference row)",
        "- How the recipe was found, the diagnostics and the sweep: [QUALITY_SWEEP.md](QUALITY_SWEEP.md).",
        *[f"- Training time of '{n}': {note}" for n, note in time_notes.items()],
        "- DMD2 rows: the GAN trains against the same 1,797 real digits the FID compares with, so a student below the "
        "teacher here would say it learnt the data, not only the teacher (DMD2's claim). The discriminator accuracies "
        "above show whether it over-fits those few real images (both near 1.0) or hardly separates them (near 0.5). "
        "The 'x64' row scales DMD2's SD1.5 GAN weights by the ratio of latent sizes (4x64x64 / 4x8x8): the GAN "
        "losses are per sample while the DM and fake losses are means over latent elements. The 'second stage' rows "
        "are DMD2's recipe of resuming a finished run at a lower learning rate (theirs: ~20x lower; here 3x, generator "
        "and fake score/discriminator alike), from the row named before 'then'; their curves continue that row's, "
        "and their training time is both stages'."
        if gan_rows else "",
        "",
        "![samples](digits_variants.png)",
        "",
        "Rows of the picture, top to bottom: " + "; ".join(order) + " (one image per digit 0-9; the same noise and "
        "prompt in each column).",
        "",
        "Commands:",
        "",
        "```",
        *[f"{k}: {v}" for k, v in commands.items()],
        "```",
    ]
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
