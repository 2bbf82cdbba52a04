"""End-to-end latency: one-step LoRA pipeline vs the 50-step CFG teacher, batch 1, in one run.

    python benchmarks/latency.py --model digits|tiny|sd15 [--repeats 10] [--compile]

One-step = text encode + one UNet call at t=999 (LCMScheduler, timesteps=[999], no CFG) + VAE decode, through a
plain diffusers StableDiffusionPipeline with the LoRA loaded. Options, each measured against the plain one-step
pipeline: LoRA fused into the weights, channels_last, TAESD-shaped decoder (AutoencoderTiny), torch.compile of the
UNet and of the VAE decoder (each kept only when it helps), and the direct call `sd_dmd.sample.one_step_generate`
(the pipeline's components without its per-call machinery). Then the best pipeline call is split into its parts.
`sd15` = SD1.5-shaped random weights (timings equal real weights'), fp16 on a GPU; CPU runs use fp32.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import bench_model, device_line, time_call


def add_random_lora(pipe, rank: int = 64):
    """Attach a generator-shaped LoRA with non-zero weights (random weights time like trained ones)."""
    from peft import LoraConfig

    from sd_dmd.models.shared_unet import DEFAULT_LORA_TARGETS

    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_LORA_TARGETS),
                                     init_lora_weights="gaussian"), adapter_name="generator")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)


def breakdown(pipe, prompt: str, res: int, repeats: int) -> list[tuple[str, float]]:
    """Median time of each stage of the one-step pipeline, run alone: text encoding, the UNet call, VAE decode and
    the conversion to an image tensor."""
    device = pipe.unet.device
    emb, _ = pipe.encode_prompt(prompt, device, 1, False)
    side = res // pipe.vae_scale_factor
    z = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator("cpu").manual_seed(0))
    z = z.to(device, emb.dtype)
    t = torch.tensor([999], device=device)
    lat = pipe.unet(z, t, encoder_hidden_states=emb).sample
    img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return [("text encoding", time_call(lambda: pipe.encode_prompt(prompt, device, 1, False), repeats)),
            ("UNet, one call", time_call(lambda: pipe.unet(z, t, encoder_hidden_states=emb), repeats)),
            ("VAE decode", time_call(lambda: pipe.vae.decode(lat / pipe.vae.config.scaling_factor), repeats)),
            ("image post-processing", time_call(lambda: pipe.image_processor.postprocess(img, output_type="pt"),
                                                repeats)),
            ("`pipe._execution_device` (diffusers walks every module for offload hooks)",
             time_call(lambda: pipe._execution_device, repeats))]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="digits", choices=["tiny", "digits", "sd15"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--teacher_repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile on CPU)")
    p.add_argument("--rank", type=int, default=64)
    args = p.parse_args()
    from diffusers import AutoencoderTiny, LCMScheduler

    from sd_dmd.models.teacher import teacher_pipeline
    from sd_dmd.outputs.sample import one_step_generate

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    model, res = bench_model(args.model, Path(tempfile.mkdtemp()))
    prompt = "a photo of an astronaut riding a horse"
    pipe = teacher_pipeline(model, "pndm", dtype, device)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731

    rows = []
    with torch.inference_mode():
        t_teacher = time_call(lambda: pipe(prompt, num_inference_steps=50, guidance_scale=3.0, height=res, width=res,
                                           generator=gen(), output_type="pt"), args.teacher_repeats, warmup=1)
        rows.append(("teacher, 50 steps PNDM, CFG 3", t_teacher))
        add_random_lora(pipe, args.rank)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        one = lambda: pipe(prompt, num_inference_steps=1, timesteps=[999], guidance_scale=0.0, height=res,  # noqa: E731
                           width=res, generator=gen(), output_type="pt")
        t_one = time_call(one, args.repeats, warmup=2)
        rows.append(("one step, LoRA unfused", t_one))
        pipe.fuse_lora()
        t_fused = time_call(one, args.repeats)
        rows.append(("one step, LoRA fused", t_fused))
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        t_cl = time_call(one, args.repeats)
        rows.append(("one step, fused + channels_last", t_cl))
        best = min(t_fused, t_cl)
        if t_cl > t_fused:
            pipe.unet.to(memory_format=torch.contiguous_format)
            pipe.vae.to(memory_format=torch.contiguous_format)
        vae = pipe.vae
        pipe.vae = AutoencoderTiny(latent_channels=4).to(device, dtype)  # TAESD's shape (random weights)
        t_taesd = time_call(one, args.repeats)
        rows.append(("one step, fused + TAESD-shaped decode", t_taesd))
        if t_taesd < best:
            best = t_taesd
        else:
            pipe.vae = vae
        if args.compile:
            unet = pipe.unet
            mode = "max-autotune" if cuda else "default"
            pipe.unet = torch.compile(unet, mode=mode, fullgraph=True)
            t_comp = time_call(one, args.repeats, warmup=3)
            rows.append(("one step, best so far + torch.compile(unet)", t_comp))
            if t_comp < best:
                best = t_comp
            else:
                pipe.unet = unet
            decode = pipe.vae.decode
            pipe.vae.decode = torch.compile(decode, mode=mode)
            t_comp_vae = time_call(one, args.repeats, warmup=3)
            rows.append(("one step, best so far + torch.compile(vae.decode)", t_comp_vae))
            if t_comp_vae < best:
                best = t_comp_vae
            else:
                pipe.vae.decode = decode
        parts = breakdown(pipe, prompt, res, args.repeats)
        best_pipe = best
        t_direct = time_call(lambda: one_step_generate(pipe, prompt, generator=gen(), output_type="pt"), args.repeats)
        rows.append(("one step, best so far, direct call (sd_dmd.sample.one_step_generate)", t_direct))
        best = min(best, t_direct)
    print(f"command: python benchmarks/latency.py --model {args.model} --repeats {args.repeats}"
          f"{' --compile' if args.compile else ''}")
    print(f"{device_line()}; {dtype}; resolution {res}, batch 1, median of {args.repeats}")
    print("| configuration | latency (ms) | images/s | speed-up vs teacher |\n|---|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t * 1e3:.1f} | {1 / t:.1f} | {t_teacher / t:.1f}x |")
    print(f"best one-step: {best * 1e3:.1f} ms ({1 / best:.1f} images/s), {t_teacher / best:.1f}x faster than the teacher")
    print("\nwhere the best one-step pipeline call spends its time (each part timed alone, median):")
    print("| part | ms | share |\n|---|---|---|")
    rest = ("rest (input checks, scheduler, latents; and parts run faster alone than in sequence)",
            best_pipe - sum(t for _, t in parts))
    for label, t in parts + [rest]:
        print(f"| {label} | {t * 1e3:.1f} | {t / best_pipe:.0%} |")


if __name__ == "__main__":
    main()
