"""Issue 38's memory target, SD3.5-Medium's shape at 1024 px, measured on a CPU host where a GPU is not lent.

    python benchmarks/sd35_memory.py --layers 2 4      # host memory per depth, then the line through them at 24
    python benchmarks/sd35_memory.py --dry             # the tiny SD3 pipeline, 16 px (a check that it runs)

One SD3.5-Medium transformer forward at 1024 px takes ~400 s on this 2-core CPU in bf16, so the full 24-block step
(~20 forward-equivalents) cannot run here. Each row runs the real step of configs/sd35_dmd2_4step.yaml's shape (batch 1,
bf16 base weights under bf16 autocast, gradient checkpointing, 8-bit AdamW when bitsandbytes is there, LoRA rank 64 on
both adapters, the GAN head on the middle block's 64x64 token grid with a real-latent batch, 4-step backward
simulation at its deepest, the text cache: no text encoder loaded) on an SD3.5-Medium-shaped pipeline (random
weights, sd_dmd.models.tiny.build_sd35_shaped_pipeline) cut to N joint blocks (N <= 13: all dual-attention, as
Medium's first 13). Everything that grows with depth (frozen weights, LoRA, their gradients and optimiser states, the
checkpointed blocks' saved inputs) grows by the same amount per block, so two depths give the line; the rest (patch
embedding, context embedder, VAE, the GAN head, one block's recomputed activations) is its intercept. The line at 24
blocks is an extrapolation, marked as one; the GPU script (benchmarks/gpu_rows.sh --sd35) measures the whole model
with torch.cuda.max_memory_allocated.

Peak memory: each depth runs in a child process of its own; the column is the child's peak resident memory
(ru_maxrss) above what it held before building the trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_line

sys.path.insert(0, str(ROOT))
BNB = Path(sys.prefix) / "extras" / "adamw8bit"  # the [adamw8bit] extra beside the environment (make test)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def prepare(out: Path, layers: int, dry: bool) -> dict:
    """The pipeline (bf16, N blocks), a text cache of its prompts and 2 real latents: what a user makes first."""
    import contextlib
    import io

    from PIL import Image

    from sd_dmd import cache_text, encode_images
    from sd_dmd.models.tiny import build_tiny_sd3_pipeline

    if dry:
        path, res = build_tiny_sd3_pipeline(out / "pipe"), 16
    else:
        import diffusers

        from sd_dmd.models.tiny import build_sd35_shaped_pipeline

        real_init = diffusers.SD3Transformer2DModel.__init__

        def cut(self, *a, **kw):  # N of Medium's 24 blocks, the first min(N, 13) with dual attention
            kw.update(num_layers=layers, dual_attention_layers=tuple(range(min(layers, 13))))
            real_init(self, *a, **kw)

        diffusers.SD3Transformer2DModel.__init__ = cut
        try:
            path, res = build_sd35_shaped_pipeline(out / "pipe"), 1024
        finally:
            diffusers.SD3Transformer2DModel.__init__ = real_init
    (out / "p.txt").write_text("\n".join(f"benchmark prompt {i}" for i in range(4)) + "\n")
    (out / "img").mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (res, res), (60 * i, 90, 160)).save(out / "img" / f"{i}.png")
        (out / "img" / f"{i}.txt").write_text(f"benchmark prompt {i}")
    with contextlib.redirect_stdout(io.StringIO()):
        cache_text.main(["--pretrained_model_name_or_path", str(path), "--prompts", str(out / "p.txt"),
                         "--extra_prompts", "a photo", "--output_dir", str(out / "cache")]
                        + ([] if dry else ["--mixed_precision", "bf16"]))
        encode_images.main(["--images", str(out / "img"), "--pretrained_model_name_or_path", str(path),
                            "--output_dir", str(out / "real"), "--resolution", str(res)])
    return {"path": str(path), "res": res}


def measure(out: Path, path: str, res: int, dry: bool, steps: int) -> dict:
    """One Trainer of the sd35_dmd2_4step shape; ``steps`` steps after a warm-up one; peak RSS above the start."""
    from accelerate import Accelerator

    from sd_dmd.config import from_dict
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import Trainer

    if (BNB / "bitsandbytes").is_dir():
        sys.path.insert(0, str(BNB))
    import importlib.util

    opt8 = importlib.util.find_spec("bitsandbytes") is not None
    precision = "no" if dry else "bf16"
    rss0 = _rss_gib()
    cfg = from_dict(Config, {
        "output_dir": str(out / "run"), "model": {"pretrained_model_name_or_path": path, "resolution": res,
                                                  "weight_dtype": "fp32" if dry else "bf16"},
        "lora": {"generator": {"rank": 64, "alpha": 8.0}, "fake": {"rank": 64, "alpha": 64.0}},
        "dmd": {"generator_timesteps": [999, 749, 499, 249], "fake_updates_per_step": 1},
        "regression": {"loss": "none"}, "gan": {"real_latents": str(out / "real")},
        "data": {"prompts": [str(out / "p.txt")], "text_cache": str(out / "cache")},
        "optim": {"optimizer": "adamw8bit" if opt8 else "adamw", "warmup_steps": 0},
        "train": {"batch_size": 1, "mixed_precision": precision, "gradient_checkpointing": True, "max_steps": 100},
        "logging": {"tracker": "none", "validation_prompts": ["a photo"]}})
    t = Trainer(cfg, Accelerator(mixed_precision=precision), log=lambda *a, **k: None)
    # deepest backward simulation: the 4-step generator's last step (k = 3 no-grad generator calls first)
    t.draws.sim_steps = lambda: 3
    times = []
    for _ in range(1 + steps):
        t0 = time.perf_counter()
        t.train_step()
        t.step += 1
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss0
    net = t.model.unet
    return {"peak": peak, "step": min(times[1:]) if steps else times[0], "opt8": opt8,
            "params_b": sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n) / 1e9,
            "blocks": len(net.transformer_blocks)}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}): {proc.stdout[-2000:]}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("--_prepare", "--_measure"):
        spec = json.loads(sys.argv[2])
        out = Path(spec["out"])
        if sys.argv[1] == "--_prepare":
            r = prepare(out, spec["layers"], spec["dry"])
        else:
            r = measure(out, spec["path"], spec["res"], spec["dry"], spec["steps"])
        print("RESULT " + json.dumps(r), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="joint blocks of each measured depth")
    p.add_argument("--steps", type=int, default=0, help="timed steps after the first (0: the first step's time)")
    p.add_argument("--dry", action="store_true", help="the tiny SD3 pipeline at 16 px")
    args = p.parse_args()
    print(f"command: python benchmarks/sd35_memory.py {' '.join(sys.argv[1:])}")
    print(f"{device_line()}; SD3.5-Medium shape {'(dry: tiny SD3, 16 px)' if args.dry else 'at 1024 px'}")
    print("| joint blocks | frozen params (B) | 8-bit AdamW | step (s) | peak host memory (GiB) |\n|---|---|---|---|---|",
          flush=True)
    rows = []
    for n in ([2] if args.dry else args.layers):
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"out": tmp, "layers": n, "dry": args.dry, "steps": args.steps}
            spec.update(run_child(["--_prepare", json.dumps(spec)]))
            r = run_child(["--_measure", json.dumps(spec)])
        rows.append((r["blocks"], r))
        print(f"| {r['blocks']} | {r['params_b']:.3f} | {'yes' if r['opt8'] else 'no'} | {r['step']:.1f} | "
              f"{r['peak']:.2f} |", flush=True)
    if len(rows) >= 2:
        (n1, a), (n2, b) = rows[0], rows[-1]
        per = (b["peak"] - a["peak"]) / (n2 - n1)
        at24 = a["peak"] + per * (24 - n1)
        print(f"| 24 (extrapolated: {per:.3f} GiB a block from the rows above) | - | - | - | {at24:.2f} |", flush=True)


if __name__ == "__main__":
    main()
