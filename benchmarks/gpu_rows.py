"""The GPU rows of issue 35, in one run that fits 10 minutes on one H100 (benchmarks/gpu_rows.sh runs it there).

    python benchmarks/gpu_rows.py                 # on a GPU: SD1.5 shape (random weights), 512 px, bf16
    python benchmarks/gpu_rows.py --sdxl          # and the SDXL-shaped rows at 1024 px, if time allows
    python benchmarks/gpu_rows.py --sd35          # and issue 38's SD3.5-Medium-shaped step at 1024 px
    python benchmarks/gpu_rows.py --dry           # anywhere: the tiny pipeline on the CPU, one step per row

Rows (each printed as soon as it is measured, markdown, with the device line):
1. step time and torch.cuda.max_memory_allocated, shared UNet + 2 LoRAs against three UNets (DMD2's layout),
   batch 1 / 4 / 8 (DMD + TTUR 1, no regression);
2. the gain of the one-call roles (train.one_call_roles on against off) and of torch.compile (compile time, then
   steady step time), at batch 4;
3. one-step latency at 512 (UNet once, VAE decode) against the teacher's 50 CFG steps;
4. ``--sd35``: issue 38's SD3.5-Medium-shaped step (random weights, 1024 px, batch 1, bf16, gradient checkpointing,
   8-bit AdamW when bitsandbytes is there, GAN, 4-step backward simulation, text cache on): its step time and
   torch.cuda.max_memory_allocated (target <= 24 GiB).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_model, device_line, sync
from common import time_call as _timed


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def trainer(path: str, res: int, prompts: str, batch: int, precision: str, out: Path, _extra=None, **train):
    """A Trainer at this shape (DMD, TTUR 1, no regression, rank 64); ``_extra``: config groups merged over it."""
    from accelerate import Accelerator

    from sd_dmd.config import from_dict
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import Trainer

    tree = {
        "output_dir": str(out), "model": {"pretrained_model_name_or_path": path, "resolution": res,
                                          "weight_dtype": {"no": "fp32"}.get(precision, precision)},
        "lora": {"generator": {"rank": 64, "alpha": 64.0}, "fake": {"rank": 64, "alpha": 64.0}},
        "regression": {"loss": "none"}, "data": {"prompts": [prompts]}, "optim": {"warmup_steps": 0},
        "dmd": {"fake_updates_per_step": 1},
        "train": {"batch_size": batch, "mixed_precision": precision, "max_steps": 100, **train},
        "logging": {"tracker": "none"}}
    for group, values in (_extra or {}).items():
        tree[group] = {**tree.get(group, {}), **values}
    return Trainer(from_dict(Config, tree), Accelerator(mixed_precision=precision), log=lambda *a, **k: None)


def step_fn(t):
    def step():
        t.train_step()
        t.step += 1
    return step


def row_designs(path, res, prompts, batches, precision, repeats, tmp, three: bool = True) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import three_unet_step_fn

    print("\n| design | batch | step (s) | max_memory_allocated (GiB) |\n|---|---|---|---|", flush=True)
    for b in batches:
        _peak_reset()
        t = trainer(path, res, prompts, b, precision, tmp / f"s{b}")
        s = _timed(step_fn(t), repeats)
        print(f"| shared UNet + 2 LoRA | {b} | {s:.3f} | {_peak():.2f} |", flush=True)
        latent = t.latent_shape
        del t
        _peak_reset()
        if not three:  # the three-UNet step of train_step.py calls SD-style UNets only
            continue
        try:
            step, _ = three_unet_step_fn(path, b, precision, False, False, latent)
            s = _timed(step, repeats)
            print(f"| three UNets (DMD2 layout) | {b} | {s:.3f} | {_peak():.2f} |", flush=True)
            del step
        except torch.OutOfMemoryError:
            print(f"| three UNets (DMD2 layout) | {b} | OOM | OOM |", flush=True)


def row_features(path, res, prompts, batch, precision, repeats, tmp, backend: str = "inductor") -> None:
    print(f"\n| feature (batch {batch}) | off: step (s) | on: step (s) | off / on | compile time (s) |\n"
          "|---|---|---|---|---|", flush=True)
    t = trainer(path, res, prompts, batch, precision, tmp / "f")
    step = step_fn(t)
    times = {}
    for on in (False, True, False, True):  # interleaved: machine drift hits both alike
        t.model.one_call_roles = on
        times.setdefault(on, []).append(_timed(step, repeats))
    off, on = min(times[False]), min(times[True])
    print(f"| one-call roles | {off:.3f} | {on:.3f} | {off / on:.2f} | - |", flush=True)
    t.model.one_call_roles = True
    from sd_dmd.models.shared_unet import compile_unet

    compile_unet(t.model, backend)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):  # every role, grad mode and shape of a step
        step()
    sync()
    compile_s = time.perf_counter() - t0
    c = _timed(step, repeats, warmup=0)
    print(f"| torch.compile ({backend}) | {on:.3f} | {c:.3f} | {on / c:.2f} | {compile_s:.1f} (3 first steps) |",
          flush=True)


def row_latency(path, res, repeats) -> None:
    from diffusers import StableDiffusionPipeline

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None).to(dev)
    pipe.set_progress_bar_config(disable=True)
    one = _timed(lambda: pipe("a photo", num_inference_steps=1, guidance_scale=0.0, height=res, width=res,
                              output_type="pil"), repeats)
    fifty = _timed(lambda: pipe("a photo", num_inference_steps=50, guidance_scale=7.5, height=res, width=res,
                                output_type="pil"), max(1, repeats // 2))
    print(f"\n| sampler at {res} px | latency (s) |\n|---|---|\n| one step (the student's) | {one:.3f} |\n"
          f"| teacher, 50 steps, CFG | {fifty:.3f} |\n| ratio | {fifty / one:.1f}x |", flush=True)


def row_sd35(path, res, precision, repeats, tmp) -> None:
    """The SD3.5 row: a text cache and real latents made first (as a user would), then a step of the
    configs/sd35_dmd2_4step shape (TTUR 1 to fit the time)."""
    import contextlib
    import importlib.util
    import io

    from PIL import Image

    from sd_dmd import cache_text, encode_images

    prompts = tmp / "sd35_p.txt"
    prompts.write_text("\n".join(f"benchmark prompt {i}" for i in range(4)) + "\n")
    (tmp / "sd35_img").mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (res, res), (40 * i, 90, 160)).save(tmp / "sd35_img" / f"{i}.png")
        (tmp / "sd35_img" / f"{i}.txt").write_text(f"benchmark prompt {i}")
    with contextlib.redirect_stdout(io.StringIO()):  # their own summaries: not rows
        cache_text.main(["--pretrained_model_name_or_path", path, "--prompts", str(prompts), "--output_dir",
                         str(tmp / "sd35_cache"), "--extra_prompts", "a photo",
                         "--mixed_precision", "bf16" if precision == "bf16" else "no"])
        encode_images.main(["--images", str(tmp / "sd35_img"), "--pretrained_model_name_or_path", path,
                            "--output_dir", str(tmp / "sd35_real"), "--resolution", str(res)])
    opt8 = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
    _peak_reset()
    t = trainer(path, res, str(prompts), 1, precision, tmp / "sd35_run", gradient_checkpointing=True,
                _extra={"data": {"text_cache": str(tmp / "sd35_cache")}, "gan": {"real_latents": str(tmp / "sd35_real")},
                        "dmd": {"generator_timesteps": [999, 749, 499, 249]},
                        "optim": {"optimizer": "adamw8bit" if opt8 else "adamw"},
                        "logging": {"validation_prompts": ["a photo"]}})
    s = _timed(step_fn(t), repeats)
    what = (f"batch 1, {precision}, grad ckpt, {'8-bit AdamW' if opt8 else 'AdamW (no bitsandbytes here)'}, GAN, "
            f"4-step (k up to 3), text cache, {res} px")
    print(f"\n| SD3.5-Medium-shaped step (issue 38) | step (s) | max_memory_allocated (GiB) |\n|---|---|---|\n"
          f"| {what} | {s:.3f} | {_peak():.2f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the tiny pipeline on the CPU, one step per row")
    p.add_argument("--sdxl", action="store_true", help="also the SDXL-shaped design rows at 1024 px")
    p.add_argument("--sd35", action="store_true", help="also the SD3.5-Medium-shaped step (issue 38; --dry: tiny SD3)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        p.error("no GPU here: pass --dry for the CPU check")
    kind, precision, batches = ("tiny", "no", [1, 2]) if args.dry else ("sd15", "bf16", [1, 4, 8])
    repeats = 1 if args.dry else args.repeats
    print(f"command: python benchmarks/gpu_rows.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(device_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, res = bench_model(kind, tmp)
        prompts = tmp / "p.txt"
        prompts.write_text("\n".join(f"benchmark prompt {i}" for i in range(16)) + "\n")
        row_designs(path, res, str(prompts), batches, precision, repeats, tmp)
        row_features(path, res, str(prompts), batches[-1] if args.dry else 4, precision, repeats, tmp,
                     "aot_eager" if args.dry else "inductor")  # inductor on a CPU compiles for minutes
        row_latency(path, res, repeats)
        if args.sdxl and not args.dry:
            sdxl, res_xl = bench_model("sdxl", tmp)
            row_designs(sdxl, res_xl, str(prompts), [1, 2], precision, 3, tmp, three=False)
        if args.sd35:
            sd35, res35 = bench_model("tiny_sd3" if args.dry else "sd35", tmp)
            row_sd35(sd35, res35, precision, 1 if args.dry else 3, tmp)


if __name__ == "__main__":
    main()
