"""Pairs/s of generate_pairs against a plain loop over StableDiffusionPipeline(output_type="latent").

    python benchmarks/pairs_throughput.py [--model tiny|digits|sd15] [--num_pairs 64] [--batch_size 8] [--repeats 3]

Both paths run in one process, same batch size, same scheduler, same noise; the ratio is what counts. They run
--repeats times in alternation (pipeline, generate_pairs; generate_pairs, pipeline; ...), so drift on a shared machine hits both;
the figure reported is the ratio of the summed times, with each round's ratio and their median beside it.
`sd15` builds SD1.5-shaped random weights (UNet 320/640/1280/1280, CLIP ViT-L text encoder, SD VAE) and
needs a GPU to finish in reasonable time; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
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
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from sd_dmd.data.config import PairsConfig
    from sd_dmd.data.pairs import generate_pairs, pair_noise, pair_seed
    from sd_dmd.models.teacher import teacher_latents, teacher_pipeline
    tmp = Path(tempfile.mkdtemp())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mp = "fp16" if device == "cuda" else "no"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model, res = bench_model(args.model, tmp)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(args.num_pairs)) + "\n")

    # the plain diffusers loop, same noise and prompts; one warm-up call for the process (both paths profit)
    pipe = teacher_pipeline(model, "pndm", dtype, device)
    shape = (pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
    texts = prompts.read_text().splitlines()
    teacher_latents(pipe, texts[:args.batch_size], torch.stack([pair_noise(pair_seed(0, i), shape)
                                                                for i in range(args.batch_size)]), 2, 3.0, res)
    del pipe

    def plain_loop() -> float:
        pipe = teacher_pipeline(model, "pndm", dtype, device)  # fresh each round, loaded untimed, as generate_pairs'
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
        return time.perf_counter() - t0

    # where generate_pairs' time goes, measured without touching its code: its pipeline calls, and the writer thread
    from sd_dmd.data import pairs
    in_pipe, on_writer = [0.0], [0.0]

    def timed(acc, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[0] += time.perf_counter() - t
        return wrapper

    pairs.teacher_latents = timed(in_pipe, pairs.teacher_latents)
    pairs.ShardWriter._run = timed(on_writer, pairs.ShardWriter._run)

    def library(r: int) -> float:
        cfg = PairsConfig(prompts=[str(prompts)], pretrained_model_name_or_path=model,
                          output_dir=str(tmp / f"pairs{r}"), num_pairs=args.num_pairs, resolution=res,
                          batch_size=args.batch_size, num_inference_steps=args.steps, mixed_precision=mp,
                          shard_size=max(args.batch_size, 64))
        return generate_pairs(cfg, log=lambda *a: None).seconds  # sampling and writing; the pipeline's load excluded

    rounds = []
    for r in range(args.repeats):  # the order alternates too: the second of a pair must not always be the same path
        if r % 2 == 0:
            a = plain_loop()
            rounds.append((a, library(r)))
        else:
            b = library(r)
            rounds.append((plain_loop(), b))
    t_pipe, t_lib = sum(a for a, _ in rounds), sum(b for _, b in rounds)
    n = args.num_pairs * args.repeats
    print(f"command: python benchmarks/pairs_throughput.py --model {args.model} --num_pairs {args.num_pairs} "
          f"--batch_size {args.batch_size} --steps {args.steps} --repeats {args.repeats}")
    print(device_line())
    print(f"plain StableDiffusionPipeline loop: {n / t_pipe:.2f} pairs/s")
    print(f"generate_pairs (incl. noise derivation, digests, parquet shards): {n / t_lib:.2f} pairs/s")
    print("per round (pipeline s, generate_pairs s, ratio): "
          + ", ".join(f"({a:.2f}, {b:.2f}, {a / b:.3f}x)" for a, b in rounds))
    print(f"generate_pairs outside its pipeline calls (noise derivation, hand-off, the last shard's write): "
          f"{t_lib - in_pipe[0]:.2f} s of {t_lib:.2f} s ({100 * (t_lib - in_pipe[0]) / t_lib:.2f}%); on the writer "
          f"thread, beside sampling (digests, token count, parquet encode, fsync): {on_writer[0]:.2f} s")
    print(f"median of the rounds' ratios: {statistics.median(a / b for a, b in rounds):.3f}x")
    print(f"ratio generate_pairs / pipeline: {t_pipe / t_lib:.3f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
