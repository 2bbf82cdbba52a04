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


def make_inputs(out: Path, num_pairs: int = 500, seed: int = 0) -> None:
    """``out/prompts.txt`` and the teacher's pairs ``out/pairs`` (what configs/digits.yaml reads from demo_out/)."""
    import generate_pairs

    from .digits import TEACHER_DIR
    from .digits.data import write_prompt_file

    out.mkdir(parents=True, exist_ok=True)
    write_prompt_file(out / "prompts.txt", n_per_class=100, seed=seed)
    generate_pairs.main(["--prompts", str(out / "prompts.txt"), "--pretrained_model_name_or_path", str(TEACHER_DIR),
                         "--output_dir", str(out / "pairs"), "--num_pairs", str(num_pairs), "--resolution", "32",
                         "--guidance_scale", "3", "--num_inference_steps", "50", "--batch_size", "100",
                         "--shard_size", "100", "--seed", str(seed)])


def run_chain(out: Path, num_pairs: int = 500, steps: int | None = None, seed: int = 0, extra=()) -> Path:
    """Pairs + distillation into ``out``; returns the LoRA directory."""
    import train_text2image

    from .digits import TEACHER_DIR

    make_inputs(out, num_pairs, seed)
    argv = ["--config", str(ROOT / "configs" / "digits.yaml"), "--output_dir", str(out / "run"),
            "--regression.pairs_dir", str(out / "pairs"), "--data.prompts", str(out / "prompts.txt"),
            "--model.pretrained_model_name_or_path", str(TEACHER_DIR), "--overwrite", *extra]
    if steps is not None:
        argv += ["--train.max_steps", str(steps)]
    train_text2image.main(argv)
    return out / "run" / "final"


def evaluate_lora(lora: Path | None, n_per_class: int, seed: int):
    from .digits import TEACHER_DIR
    from .digits.evaluate import digit_metrics
    from .digits.sampling import one_step, sample_digits

    pipe = one_step(str(TEACHER_DIR), None if lora is None else str(lora))
    if lora is None:  # the undistilled teacher, one step, with the real score's CFG
        images, labels = sample_digits(pipe, n_per_class, seed, steps=1, guidance=3.0, timesteps=[999])
    else:
        images, labels = sample_digits(pipe, n_per_class, seed, steps=1, guidance=0.0, timesteps=[999])
    return images, labels, digit_metrics(images, labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--num_pairs", type=int, default=500)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: configs/digits.yaml)")
    p.add_argument("--eval_per_class", type=int, default=100)
    p.add_argument("--inputs_only", action="store_true",
                   help="only write OUT/prompts.txt and OUT/pairs (the inputs configs/digits.yaml names), then stop")
    args = p.parse_args(argv)
    if args.inputs_only:
        make_inputs(args.out, args.num_pairs)
        print(f"wrote {args.out / 'prompts.txt'} and {args.out / 'pairs'}")
        return
    from .digits.sampling import save_grid

    t0 = time.time()
    lora = run_chain(args.out, args.num_pairs, args.steps)
    images, _, distilled = evaluate_lora(lora, args.eval_per_class, seed=1)
    _, _, one_step_teacher = evaluate_lora(None, args.eval_per_class, seed=1)
    grid_images, _, _ = evaluate_lora(lora, 8, seed=2)
    save_grid(grid_images, args.out / "one_step_grid.png", nrow=8)
    metrics = {"distilled_one_step": distilled, "teacher_one_step": one_step_teacher,
               "lora": str(lora), "seconds": round(time.time() - t0, 1)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\n              digits-FID  prompt-acc  coverage")
    for name in ("teacher_one_step", "distilled_one_step"):
        m = metrics[name]
        print(f"{name:20s} {m['digits_fid']:9.2f}  {m['prompt_accuracy']:9.3f}  {m['coverage_mean']:8.3f}")
    print(f"\nLoRA: {lora}\nGrid (rows = digits 0-9, one step each): {args.out / 'one_step_grid.png'}\n"
          f"Metrics: {args.out / 'metrics.json'}   ({metrics['seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
