"""Pairs/s of generate_pairs against a plain loop over StableDiffusionPipeline(output_type="latent").

    python benchmarks/pairs_throughput.py [--model tiny|digits|sd15] [--num_pairs 64] [--batch_size 8]

Both paths run in one process, same batch size, same scheduler, same noise; the ratio is what counts.
`sd15` builds SD1.5-shaped random weights (UNet 320/640/1280/1280, CLIP ViT-L text encoder, SD VAE) and
needs a GPU to finish in reasonable time; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import bench_model, device_line


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny", choices=["tiny", "digits", "sd15"])
    p.add_argument("--num_pairs", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    from sd_dmd.pairs import PairsConfig, generate_pairs, pair_noise, pair_seed, teacher_latents, teacher_pipeline
    tmp = Path(tempfile.mkdtemp())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mp = "fp16" if device == "cuda" else "no"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model, res = bench_model(args.model, tmp)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(args.num_pairs)) + "\n")

    # the plain diffusers loop, same noise and prompts
    pipe = teacher_pipeline(model, "pndm", dtype, device)
    shape = (pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
    texts = prompts.read_text().splitlines()
    teacher_latents(pipe, texts[:args.batch_size], torch.stack([pair_noise(pair_seed(0, i), shape)
                                                                for i in range(args.batch_size)]), 2, 3.0, res)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(0, args.num_pairs, args.batch_size):
        idx = range(b, min(b + args.batch_size, args.num_pairs))
        noise = torch.stack([pair_noise(pair_seed(0, i), shape) for i in idx]).to(device, dtype)
        pipe(texts[b:b + len(idx)], latents=noise, num_inference_steps=args.steps, guidance_scale=3.0, height=res,
             width=res, output_type="latent")
    if device == "cuda":
        torch.cuda.synchronize()
    t_pipe = time.perf_counter() - t0
    del pipe

    cfg = PairsConfig(prompts=[str(prompts)], pretrained_model_name_or_path=model, output_dir=str(tmp / "pairs"),
                      num_pairs=args.num_pairs, resolution=res, batch_size=args.batch_size,
                      num_inference_steps=args.steps, mixed_precision=mp, shard_size=max(args.batch_size, 64))
    stats = generate_pairs(cfg, log=lambda *a: None)
    t_lib = stats.seconds
    print(f"command: python benchmarks/pairs_throughput.py --model {args.model} --num_pairs {args.num_pairs} "
          f"--batch_size {args.batch_size} --steps {args.steps}")
    print(device_line())
    print(f"plain StableDiffusionPipeline loop: {args.num_pairs / t_pipe:.2f} pairs/s")
    print(f"generate_pairs (incl. noise derivation, digests, parquet shards): {args.num_pairs / t_lib:.2f} pairs/s")
    print(f"ratio generate_pairs / pipeline: {t_pipe / t_lib:.3f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
