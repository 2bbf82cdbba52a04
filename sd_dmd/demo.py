"""`make demo`: the whole chain on the embedded default (the shipped digits teacher), on CPU.

1. teacher pairs with generate_pairs.py; 2. distillation with train_text2image.py (configs/digits.yaml);
3. the LoRA loaded into a fresh diffusers pipeline; 4. a one-step grid for digits 0-9 and the metrics.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shipped() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())


def shipped_guidance() -> float:
    """The real score's CFG scale in configs/digits.yaml: the pairs and the teacher rows use the same."""
    return float(_shipped()["dmd"]["real_guidance_scale"])


def shipped_uses_pairs() -> bool:
    """Whether configs/digits.yaml trains with the regression loss (DMD) or without (DMD2-style)."""
    return _shipped()["regression"]["loss"] != "none"


def shipped_uses_gan() -> bool:
    """Whether configs/digits.yaml trains with DMD2's GAN (it then reads the real digits as latents)."""
    return bool((_shipped().get("gan") or {}).get("real_latents"))


def encode_real_digits(out: Path) -> Path:
    """``out/real``: the 1,797 real digits as latents of the teacher's VAE (~10 s; a complete store is kept)."""
    from sd_dmd import encode_images

    encode_images.main(["--source", "digits", "--output_dir", str(out / "real")])
    return out / "real"


def make_inputs(out: Path, num_pairs: int = 500, seed: int = 0, guidance: float | None = None) -> None:
    """``out/prompts.txt`` and the teacher's pairs ``out/pairs`` (what configs/digits.yaml reads from demo_out/),
    made with the real score's guidance (``shipped_guidance()`` unless given), and ``out/real`` when the shipped
    config has the GAN on. ``num_pairs=0``: no pairs."""
    import generate_pairs

    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.data.digits import write_prompt_file

    out.mkdir(parents=True, exist_ok=True)
    write_prompt_file(out / "prompts.txt", n_per_class=100, seed=seed)
    if shipped_uses_gan():
        encode_real_digits(out)
    if num_pairs == 0:
        return
    generate_pairs.main(["--prompts", str(out / "prompts.txt"), "--pretrained_model_name_or_path", str(TEACHER_DIR),
                         "--output_dir", str(out / "pairs"), "--num_pairs", str(num_pairs), "--resolution", "32",
                         "--guidance_scale", str(shipped_guidance() if guidance is None else guidance),
                         "--num_inference_steps", "50", "--batch_size", "100",
                         "--shard_size", "100", "--seed", str(seed)])


def run_chain(out: Path, num_pairs: int = 500, steps: int | None = None, seed: int = 0, extra=()) -> Path:
    """Pairs + distillation into ``out``; returns the LoRA directory."""
    import train_text2image

    from sd_dmd.data.digits import TEACHER_DIR

    make_inputs(out, num_pairs, seed)
    argv = ["--config", str(ROOT / "configs" / "digits.yaml"), "--output_dir", str(out / "run"),
            "--regression.pairs_dir", str(out / "pairs"), "--data.prompts", str(out / "prompts.txt"),
            "--model.pretrained_model_name_or_path", str(TEACHER_DIR), "--overwrite"]
    if shipped_uses_gan():
        argv += ["--gan.real_latents", str(out / "real")]
    argv += list(extra)  # last: they win
    if steps is not None:
        argv += ["--train.max_steps", str(steps)]
    train_text2image.main(argv)
    return out / "run" / "final"


def evaluate_lora(lora: Path | None, n_per_class: int, seed: int, teacher_steps: int | None = None,
                  guidance: float | None = None):
    """Images, labels and metrics of the distilled one-step LoRA, or of the teacher (``lora=None``) at one step
    (``teacher_steps=None``, on the LoRA's LCM pipeline) or at ``teacher_steps`` PNDM steps (what the pairs are
    made with), both with the real score's guidance (``shipped_guidance()``) unless ``guidance`` is given:
    ``lora=None, guidance=0`` is the generator before training. ``ms_per_image`` is included."""
    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.evaluation.digits.evaluate import digit_metrics
    from sd_dmd.evaluation.digits.sampling import one_step, sample_digits, teacher_pipeline

    t0 = time.perf_counter()
    if teacher_steps is not None:
        pipe = teacher_pipeline(str(TEACHER_DIR))
        g = shipped_guidance() if guidance is None else guidance
        images, labels = sample_digits(pipe, n_per_class, seed, steps=teacher_steps, guidance=g)
    else:
        pipe = one_step(str(TEACHER_DIR), None if lora is None else str(lora))
        if guidance is None:
            guidance = shipped_guidance() if lora is None else 0.0
        images, labels = sample_digits(pipe, n_per_class, seed, steps=1, guidance=guidance, timesteps=[999])
    ms = (time.perf_counter() - t0) * 1000 / len(images)
    return images, labels, {**digit_metrics(images, labels), "ms_per_image": round(ms, 2)}


def by_rows(images, n_per_class: int):
    """sample_digits' order (all 0s, then all 1s, ...) -> rows of digits 0-9, one row per noise draw."""
    return images.view(10, n_per_class, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])


def comparison_grid(lora: Path, path: Path, n_rows: int = 4, seed: int = 2, ms: dict | None = None) -> None:
    """Rows in pairs: the 50-step teacher, then the one-step student on the same prompts and noise (digits 0-9 in
    columns), each row labelled with its model, steps, CFG and ms per image: ``ms`` {"teacher": ..., "student": ...}
    (the table's measurements, passed through), else what sampling this grid took."""
    import torch

    from sd_dmd.evaluation.digits.sampling import save_grid

    teacher, _, mt = evaluate_lora(None, n_rows, seed, teacher_steps=50)
    student, _, ms_ = evaluate_lora(lora, n_rows, seed)
    ms = {"teacher": mt["ms_per_image"], "student": ms_["ms_per_image"], **(ms or {})}
    t, s = by_rows(teacher, n_rows), by_rows(student, n_rows)
    rows = [r for i in range(n_rows) for r in (t[i * 10:(i + 1) * 10], s[i * 10:(i + 1) * 10])]
    labels = [f"teacher · 50 steps · CFG {shipped_guidance():g}\n{ms['teacher']:.1f} ms/image",
              f"student · 1 step\n{ms['student']:.1f} ms/image"] * n_rows
    save_grid(torch.cat(rows), path, nrow=10, row_labels=labels, col_labels=[str(d) for d in range(10)],
              corner="digit", group=2)


def table(metrics: dict) -> str:
    """Each row against the 50-step teacher: digits-FID and coverage, and as 'x teacher' (the issue-27 targets for
    the one-step student: FID <= 1.2x, coverage >= 0.8x)."""
    t = metrics["teacher_50_steps"]
    lines = [f"{'':28s} {'steps':>5s} {'digits-FID':>10s} {'x teacher':>9s} {'coverage':>8s} {'x teacher':>9s} "
             f"{'accuracy':>8s} {'ms/image':>8s} {'speed-up':>8s}"]
    for name, steps in (("teacher_50_steps", 50), ("teacher_one_step", 1), ("distilled_one_step", 1)):
        m = metrics[name]
        lines.append(f"{name:28s} {steps:5d} {m['digits_fid']:10.1f} {m['digits_fid'] / t['digits_fid']:8.2f}x "
                     f"{m['coverage_mean']:8.3f} {m['coverage_mean'] / t['coverage_mean']:8.2f}x "
                     f"{m['prompt_accuracy']:8.3f} {m['ms_per_image']:8.2f} {t['ms_per_image'] / m['ms_per_image']:7.1f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--num_pairs", type=int, default=None,
                   help="teacher pairs to make (default: 500 when configs/digits.yaml uses regression, else 0; "
                        "--inputs_only: 500)")
    p.add_argument("--steps", type=int, default=None,
                   help="distillation steps (default: configs/digits.yaml's, sized to fit 10 minutes on 2 cores, "
                        "install included)")
    p.add_argument("--eval_per_class", type=int, default=50, help="images per digit for every row of the table")
    p.add_argument("--inputs_only", action="store_true",
                   help="only write OUT/prompts.txt, OUT/pairs and OUT/real (the inputs configs/digits.yaml names), "
                        "then stop")
    args = p.parse_args(argv)
    if args.inputs_only:
        make_inputs(args.out, 500 if args.num_pairs is None else args.num_pairs)
        print(f"wrote the inputs configs/digits.yaml names under {args.out}/")
        return
    t0 = time.time()
    num_pairs = args.num_pairs if args.num_pairs is not None else 500 if shipped_uses_pairs() else 0
    lora = run_chain(args.out, num_pairs, args.steps)
    n = args.eval_per_class
    metrics = {"teacher_50_steps": evaluate_lora(None, n, seed=1, teacher_steps=50)[2],
               "teacher_one_step": evaluate_lora(None, n, seed=1)[2],
               "distilled_one_step": evaluate_lora(lora, n, seed=1)[2]}
    grid = args.out / "one_step_grid.png"
    comparison_grid(lora, grid, ms={"teacher": metrics["teacher_50_steps"]["ms_per_image"],
                                    "student": metrics["distilled_one_step"]["ms_per_image"]})
    metrics.update(lora=str(lora), images_per_model=10 * n, seconds=round(time.time() - t0, 1))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\n" + table(metrics))
    print(f"\nLoRA: {lora}\nGrid (digits 0-9 in columns; rows in pairs: 50-step teacher, then the one-step "
          f"student on the same prompt): {grid}\nMetrics: {args.out / 'metrics.json'}   "
          f"({metrics['seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
