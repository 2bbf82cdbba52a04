"""digits-FID (mean +- std over seeds), prompt accuracy and coverage of one generator LoRA, measured exactly as
benchmarks/digits_quality.py measures a row (seeds 0 1 2, 100 images per digit, guidance 0, the LoRA's own
sampling timesteps), plus a summary of the run's logged GAN/DM gradient ratio when the run holds a history.

    OMP_NUM_THREADS=1 python benchmarks/digits_fid.py RUN_DIR [--lora RUN_DIR/final] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

KEYS = ("digits_fid", "prompt_accuracy", "coverage_mean")


def ratio_summary(history: list[dict]) -> dict:
    """Median, first and last thirds' medians of ``gan_dm_grad_ratio`` over the logged steps."""
    r = [h["gan_dm_grad_ratio"] for h in history if "gan_dm_grad_ratio" in h]
    if not r:
        return {}
    third = max(1, len(r) // 3)
    w = [h["gan_weight_generator"] for h in history if "gan_weight_generator" in h]
    return {"n": len(r), "median": statistics.median(r), "first_third": statistics.median(r[:third]),
            "last_third": statistics.median(r[-third:]), "gan_weight_generator_median": statistics.median(w)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("--lora", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    from sd_dmd.data.digits import TEACHER_DIR
    from sd_dmd.evaluation.digits.evaluate import digit_metrics, load_classifier
    from sd_dmd.evaluation.digits.sampling import one_step, sample_digits
    from sd_dmd.models.lora import resolve_lora

    lora = args.lora or args.run / "final"
    ts = resolve_lora(str(lora)).timesteps or [999]
    pipe, clf, ms = one_step(str(TEACHER_DIR), str(lora)), load_classifier(), []
    for s in args.seeds:
        imgs, labels = sample_digits(pipe, args.per_class, 10_000 + s, steps=len(ts), guidance=0.0, timesteps=ts)
        ms.append(digit_metrics(imgs, labels, clf))
    out = {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))) for k in KEYS}
    hist = args.run / "final" / "history.json"
    if hist.exists():
        h = json.loads(hist.read_text())
        out["gan_dm_grad_ratio"] = ratio_summary(h["history"] if isinstance(h, dict) else h)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
