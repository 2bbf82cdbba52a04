"""Step time and peak memory of a full DMD training step (generator turn + fake turn): the shared-UNet LoRA
design (the library's own Trainer) against a three-UNet baseline (DMD2's layout), in one process and run.

    python benchmarks/train_step.py --model sd15 --batch 1 4 8 --precision fp16 bf16      # on a GPU
    python benchmarks/train_step.py --model tiny --batch 2 --precision no                  # anywhere (CPU)

Models: `sd15` = SD1.5-shaped random weights (UNet 320/640/1280/1280, cross-attention 768, CLIP ViT-L text encoder,
SD VAE; random weights time exactly like real ones); `medium` = a ~100M UNet; `tiny` = the test pipeline.
Variants per row: gradient checkpointing, 8-bit AdamW, regression (none / LPIPS after the full VAE / LPIPS after a
TAESD-shaped decoder). Overhead ratio = step time / ideal, ideal = 7 f(B) + f(2B) [+ 3 f(R) with regression]
where f(n) is a measured UNet forward at batch n and a backward counts as two forwards: G fwd+bwd (3), real CFG
fwd at 2B (f(2B)), fake fwd (1), fake fwd+bwd (3).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from common import bench_model, device_line
from common import time_call as _timed


def _peak_reset():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def make_pairs(model: str, res: int, out: Path) -> str:
    import generate_pairs

    (out / "p.txt").write_text("\n".join(f"benchmark prompt {i}" for i in range(16)) + "\n")
    generate_pairs.main(["--prompts", str(out / "p.txt"), "--pretrained_model_name_or_path", model, "--output_dir",
                         str(out / "pairs"), "--num_pairs", "16", "--num_inference_steps", "2", "--resolution",
                         str(res), "--batch_size", "8"] + (["--mixed_precision", "fp16"] if torch.cuda.is_available()
                                                            else []))
    return str(out / "pairs")


def shared_trainer(model, res, pairs, prompts, batch, precision, gc_on, opt8, reg, taesd_dir):
    from accelerate import Accelerator

    from sd_dmd.config import from_dict
    from sd_dmd.train import Trainer
    from sd_dmd.train_config import Config

    wdt = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
    cfg = from_dict(Config, {
        "output_dir": str(Path(pairs).parent / "run"),
        "model": {"pretrained_model_name_or_path": model, "weight_dtype": wdt, "resolution": res},
        "regression": {"loss": "none" if reg == "none" else "lpips", "pairs_dir": pairs, "batch_size": batch,
                       "decoder": "vae" if reg == "vae" else "taesd", "tiny_vae": taesd_dir,
                       "lpips_pretrained_backbone": False},
        "data": {"prompts": [prompts]},
        "optim": {"optimizer": "adamw8bit" if opt8 else "adamw", "warmup_steps": 0},
        "train": {"batch_size": batch, "mixed_precision": precision, "gradient_checkpointing": gc_on, "max_steps": 10},
        "logging": {"tracker": "none"}})
    return Trainer(cfg, Accelerator(mixed_precision=precision), log=lambda *a: None)


def unet_forward_time(unet, batch, latent, cond_dim, dtype, repeats) -> float:
    dev = next(unet.parameters()).device
    x = torch.randn(batch, *latent, device=dev, dtype=dtype)
    c = torch.randn(batch, 77, cond_dim, device=dev, dtype=dtype)
    t = torch.full((batch,), 500, device=dev)
    with torch.no_grad():
        return _timed(lambda: unet(x, t, encoder_hidden_states=c), repeats)


def three_unet_step_fn(model, batch, precision, gc_on, opt8, latent, repeats):
    """DMD2's layout: a frozen teacher, a fully trained fake UNet and a fully trained generator (fp32 master
    weights, autocast), with the same losses from sd_dmd.losses."""
    from diffusers import UNet2DConditionModel

    from sd_dmd.denoisers import CFGDenoiser, EpsDenoiser
    from sd_dmd.losses import dmd_loss, fake_score_loss
    from sd_dmd.schedule import NoiseSchedule

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    wdt = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    teacher = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dev, wdt).requires_grad_(False)
    gen = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dev)
    fake = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dev)
    if gc_on:
        gen.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    if opt8:
        import bitsandbytes as bnb

        opt_g, opt_f = bnb.optim.AdamW8bit(gen.parameters(), 1e-5), bnb.optim.AdamW8bit(fake.parameters(), 1e-5)
    else:
        opt_g, opt_f = torch.optim.AdamW(gen.parameters(), 1e-5), torch.optim.AdamW(fake.parameters(), 1e-5)
    sched = NoiseSchedule.scaled_linear()
    cd = gen.config.cross_attention_dim
    ac = torch.autocast(dev, dtype=wdt, enabled=precision != "no")

    def eps(net):
        return lambda x, t, c: net(x, t, encoder_hidden_states=c).sample.float()

    real = CFGDenoiser(EpsDenoiser(eps(teacher), sched), 3.0, torch.zeros(1, 77, cd, device=dev, dtype=wdt))
    fake_d = EpsDenoiser(eps(fake), sched)

    def step():
        c = torch.randn(batch, 77, cd, device=dev, dtype=wdt)
        z = torch.randn(batch, *latent, device=dev)
        with ac:
            x = EpsDenoiser(eps(gen), sched)(z, torch.full((batch,), 999, device=dev), c)
            t = torch.randint(20, 981, (batch,), device=dev)
            loss, _ = dmd_loss(x, real, fake_d, t, torch.randn_like(x), sched, c)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with ac:
            lf, _ = fake_score_loss(fake_d, x.detach(), torch.randint(0, 1000, (batch,), device=dev),
                                    torch.randn_like(x), sched, c)
        lf.backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)

    _peak_reset()
    t = _timed(step, repeats)
    return t, _peak_gib(), unet_forward_time(teacher, batch, latent, cd, wdt, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny", choices=["tiny", "medium", "sd15"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=["bf16" if torch.cuda.is_available() else "no"])
    p.add_argument("--grad_checkpointing", nargs="+", default=["on", "off"])
    p.add_argument("--adamw8bit", nargs="+", default=["off", "on"])
    p.add_argument("--regression", nargs="+", default=["none", "taesd", "vae"])
    p.add_argument("--baseline", nargs="+", default=["yes"], help="also run the three-UNet baseline (yes/no)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from diffusers import AutoencoderTiny

    tmp = Path(tempfile.mkdtemp())
    model, res = bench_model(args.model, tmp)
    pairs = make_pairs(model, res, tmp)
    taesd_dir = str(tmp / "taesd")
    AutoencoderTiny(latent_channels=4).save_pretrained(taesd_dir)
    print(f"command: python benchmarks/train_step.py {' '.join(sys.argv[1:])}")
    print(f"{device_line()}; model {args.model} at {res}px")
    print("| design | batch | precision | grad ckpt | 8-bit AdamW | regression | step (s) | peak GPU mem (GiB) | "
          "UNet fwd f(B) (s) | overhead ratio |\n|---|---|---|---|---|---|---|---|---|---|")
    for b, prec, gco, o8, reg in itertools.product(args.batch, args.precision, args.grad_checkpointing,
                                                   args.adamw8bit, args.regression):
        _peak_reset()
        tr = shared_trainer(model, res, pairs, str(tmp / "p.txt"), b, prec, gco == "on", o8 == "on", reg, taesd_dir)
        _peak_reset()
        t_step = _timed(tr.train_step, args.repeats)
        peak = _peak_gib()
        unet = tr.model.unet
        unet.disable_adapters()
        cd = unet.config.cross_attention_dim
        f1 = unet_forward_time(unet, b, tr.latent_shape, cd, tr.model.weight_dtype, args.repeats)
        f2 = unet_forward_time(unet, 2 * b, tr.latent_shape, cd, tr.model.weight_dtype, args.repeats)
        unet.enable_adapters()
        ideal = 7 * f1 + f2 + (3 * f1 if reg != "none" else 0.0)
        print(f"| shared UNet + 2 LoRA | {b} | {prec} | {gco} | {o8} | {reg} | {t_step:.3f} | {peak:.2f} | {f1:.4f} | "
              f"{t_step / ideal:.2f} |", flush=True)
        latent = tr.latent_shape
        del tr, unet
        if "yes" in args.baseline and reg == "none":
            try:
                t3, p3, f3 = three_unet_step_fn(model, b, prec, gco == "on", o8 == "on", latent, args.repeats)
                print(f"| three UNets (DMD2 layout) | {b} | {prec} | {gco} | {o8} | none | {t3:.3f} | {p3:.2f} | "
                      f"{f3:.4f} | {t3 / (9 * f3):.2f} (f(2B)~2f(B)) |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| three UNets (DMD2 layout) | {b} | {prec} | {gco} | {o8} | none | OOM | OOM | - | - |")
            _peak_reset()


if __name__ == "__main__":
    main()
