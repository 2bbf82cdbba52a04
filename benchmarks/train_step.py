"""Step time and peak memory of a full DMD training step (generator turn + fake turn): the shared-UNet LoRA
design (the library's own Trainer) against a three-UNet baseline (DMD2's layout), in one run.

    python benchmarks/train_step.py --model sd15 --batch 1 4 8 --precision fp16 bf16      # on a GPU
    python benchmarks/train_step.py --model tiny --batch 2 --precision no                  # anywhere (CPU)
    python benchmarks/train_step.py --model sd15 --precision no --isolate --profile        # CPU, host memory

Models: `sd15` = SD1.5-shaped random weights (UNet 320/640/1280/1280, cross-attention 768, CLIP ViT-L text encoder,
SD VAE; random weights time exactly like real ones); `medium` = a ~100M UNet; `tiny` = the test pipeline.
Variants per row: gradient checkpointing, 8-bit AdamW, regression (none / LPIPS after the full VAE / LPIPS after a
TAESD-shaped decoder).

Memory: on a GPU, `torch.cuda.max_memory_allocated` over the timed steps. With `--isolate` every row runs in its own
child process (same command, same run) and on CPU the column is the child's peak resident memory above what it
held before building the design (`ru_maxrss`), so rows do not see each other's allocations; a row the kernel kills
for memory reads "OOM".

Overhead ratio = step time / ideal, ideal = 7 f(B) + f(2B) [+ 3 f(B) with regression], f(n) a measured forward of
the plain UNet (adapters off) at batch n, a backward counted as two forwards: G fwd+bwd (3), real CFG fwd at 2B
(f(2B)), fake fwd (1), fake fwd+bwd (3). The "LoRA fwd / fwd" column is a forward with the rank-r adapter on over
one with adapters off: the part of the overhead the LoRA branches themselves cost. `--profile` prints the
operators that take the time in one shared-design step (torch.profiler).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import bench_model, device_line
from common import time_call as _timed

HEADER = ("| design | batch | precision | grad ckpt | 8-bit AdamW | regression | step (s) | peak mem (GiB) | "
          "UNet fwd f(B) (s) | LoRA fwd / fwd | overhead ratio | weights / LoRA / grads / optim (GiB) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakMemory:
    """Peak GPU memory allocated (CUDA), or peak host RSS above the current RSS (CPU, only in a child process of
    its own: ``ru_maxrss`` is the peak over the whole process life; otherwise nan)."""

    def __init__(self, host: bool = False):
        self.host = host
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.rss0 = _rss_gib()

    def peak_gib(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**30
        if not self.host:
            return float("nan")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - self.rss0


def make_pairs(model: str, res: int, out: Path, n: int) -> str:
    import generate_pairs

    (out / "p.txt").write_text("\n".join(f"benchmark prompt {i}" for i in range(16)) + "\n")
    generate_pairs.main(["--prompts", str(out / "p.txt"), "--pretrained_model_name_or_path", model, "--output_dir",
                         str(out / "pairs"), "--num_pairs", str(n), "--num_inference_steps", "1", "--resolution",
                         str(res), "--batch_size", str(n)] + (["--mixed_precision", "fp16"]
                                                             if torch.cuda.is_available() else []))
    return str(out / "pairs")


def make_real_latents(model: str, res: int, out: Path, n: int) -> str:
    """A real-latent store for the GAN rows: n random images encoded by the model's VAE (sd_dmd.encode_images)."""
    import numpy as np
    from PIL import Image

    from sd_dmd import encode_images

    d = out / "real_images"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"benchmark prompt {i}")
    encode_images.main(["--images", str(d), "--pretrained_model_name_or_path", model, "--output_dir",
                        str(out / "real"), "--resolution", str(res)])
    return str(out / "real")


DMD2_OPTIONS = {"none": {}, "gan": {"gan": True}, "4step": {"steps": 4}, "gan+4step": {"gan": True, "steps": 4}}


def shared_trainer(model, res, pairs, prompts, batch, precision, gc_on, opt8, reg, taesd_dir, rank, real=None,
                   timesteps=(999,)):
    from accelerate import Accelerator

    from sd_dmd.config import from_dict
    from sd_dmd.training.loop import Trainer
    from sd_dmd.training.config import Config

    wdt = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
    cfg = from_dict(Config, {
        "output_dir": str(Path(prompts).parent / "run"),
        "model": {"pretrained_model_name_or_path": model, "weight_dtype": wdt, "resolution": res},
        "lora": {"generator": {"rank": rank, "alpha": float(rank)}, "fake": {"rank": rank, "alpha": float(rank)}},
        "regression": {"loss": "none" if reg == "none" else "lpips", "pairs_dir": pairs, "batch_size": batch,
                       "decoder": "vae" if reg == "vae" else "taesd", "tiny_vae": taesd_dir,
                       "lpips_pretrained_backbone": False},
        "data": {"prompts": [prompts]},
        "optim": {"optimizer": "adamw8bit" if opt8 else "adamw", "warmup_steps": 0},
        "train": {"batch_size": batch, "mixed_precision": precision, "gradient_checkpointing": gc_on, "max_steps": 10},
        "dmd": {"generator_timesteps": list(timesteps)},
        "gan": {"real_latents": real},
        "logging": {"tracker": "none"}})
    return Trainer(cfg, Accelerator(mixed_precision=precision), log=lambda *a: None)


def unet_forward_time(unet, batch, latent, cond_dim, dtype, repeats, text=None) -> float:
    """A forward's time at ``batch``; ``text``: the model's conditioner (SDXL's added conditions)."""
    dev = next(unet.parameters()).device
    x = torch.randn(batch, *latent, device=dev, dtype=dtype)
    c = torch.randn(batch, 77, cond_dim, device=dev, dtype=dtype)
    kw = {"encoder_hidden_states": c}
    if text is not None:
        kw = text.unet_kwargs(text.encode(["benchmark prompt"] * batch).to(dtype))
    t = torch.full((batch,), 500, device=dev)
    with torch.no_grad():
        return _timed(lambda: unet(x, t, **kw), repeats)


def three_unet_step_fn(model, batch, precision, gc_on, opt8, latent):
    """DMD2's layout: a frozen teacher, a fully trained fake UNet and a fully trained generator (fp32 master
    weights, autocast), with the same losses from sd_dmd.core.losses. Returns (step fn, teacher UNet)."""
    from diffusers import UNet2DConditionModel

    from sd_dmd.core.denoisers import CFGDenoiser, EpsDenoiser
    from sd_dmd.core.losses import dmd_loss, fake_score_loss
    from sd_dmd.core.schedule import NoiseSchedule

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

    return step, teacher


def _gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def shared_state_gib(tr) -> dict:
    """Bytes held by tensors of each kind after a step, counted from the live objects: frozen weights (UNet, VAE,
    text encoder), the two LoRAs, their gradients at the peak (one adapter's at a time), optimiser states."""
    m = tr.model
    frozen = [p for mod in (m.unet, m.vae, *m.text_encoders) for n, p in mod.named_parameters() if "lora_" not in n]
    opt = [v for o in (tr.opt_g, tr.opt_f) for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
    return dict(weights=_gib(frozen), lora=_gib(tr.gen_params + tr.fake_params),
                grads=max(_gib(tr.gen_params), _gib(tr.fake_params)), optim=_gib(opt))


def three_state_gib(unet_params: int, wbytes: int, opt8: bool) -> dict:
    """The same count for the three-UNet layout: teacher in the weight dtype, generator and fake with fp32 master
    weights, fp32 gradients (one UNet's at a time: G's are freed at its step), AdamW states (2 x fp32,
    or 2 x 8-bit + a small fp32 per-block scale for 8-bit AdamW, counted as 2 bytes)."""
    g = 2**30
    return dict(weights=unet_params * (wbytes + 8) / g, lora=0.0, grads=unet_params * 4 / g,
                optim=2 * unet_params * (2 if opt8 else 8) / g)


def profile_step(step, title: str, n: int = 14) -> None:
    """Print the operators taking the most self time in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\nprofile of one step, {title} (top {n} operators by self time):\n```")
    print(prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=40))
    print("```", flush=True)


def run_row(spec: dict) -> dict:
    """Measure one row; ``spec`` has design, model, res, pairs, prompts, taesd, batch, precision, gc, opt8, reg,
    rank, repeats, profile."""
    s = spec
    mem = PeakMemory(host=s.get("isolated", False))
    if s["design"] == "shared":
        d2 = DMD2_OPTIONS[s.get("dmd2", "none")]
        tr = shared_trainer(s["model"], s["res"], s["pairs"], s["prompts"], s["batch"], s["precision"], s["gc"] == "on",
                            s["opt8"] == "on", s["reg"], s["taesd"], s["rank"], s["real"] if d2.get("gan") else None,
                            [999, 749, 499, 249][:d2.get("steps", 1)])
        if d2.get("steps"):  # the deepest backward simulation (3 no-grad G calls first): the step's upper bound
            tr.draws.sim_steps = lambda: d2["steps"] - 1
        t_step = _timed(tr.train_step, s["repeats"])
        peak = mem.peak_gib()
        state = shared_state_gib(tr)
        if s["profile"]:
            profile_step(tr.train_step, f"shared UNet, batch {s['batch']}, {s['precision']}, ckpt {s['gc']}, "
                                        f"regression {s['reg']}")
        unet, latent, dtype = tr.model.unet, tr.latent_shape, tr.model.weight_dtype
        cd = unet.config.cross_attention_dim
        tr.model._activate("generator")
        text = tr.model.text
        f_lora = unet_forward_time(unet, s["batch"], latent, cd, dtype, s["repeats"], text)
        unet.disable_adapters()
        f1 = unet_forward_time(unet, s["batch"], latent, cd, dtype, s["repeats"], text)
        f2 = unet_forward_time(unet, 2 * s["batch"], latent, cd, dtype, s["repeats"], text)
        unet.enable_adapters()
        ideal = 7 * f1 + f2 + (3 * f1 if s["reg"] != "none" else 0.0)
        return dict(step=t_step, peak=peak, f1=f1, lora_fwd=f_lora / f1, ratio=f"{t_step / ideal:.2f}", **state)
    if s.get("count_only"):  # state bytes of the layout, without allocating it
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            n = sum(p.numel() for p in UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(s["model"], subfolder="unet")).parameters())
        return dict(three_state_gib(n, 4 if s["precision"] == "no" else 2, s["opt8"] == "on"), step=None)
    step, teacher = three_unet_step_fn(s["model"], s["batch"], s["precision"], s["gc"] == "on", s["opt8"] == "on",
                                       s["latent"])
    t_step = _timed(step, s["repeats"])
    peak = mem.peak_gib()
    cd = teacher.config.cross_attention_dim
    f1 = unet_forward_time(teacher, s["batch"], s["latent"], cd, teacher.dtype, s["repeats"])
    return dict(step=t_step, peak=peak, f1=f1, lora_fwd=float("nan"), ratio=f"{t_step / (9 * f1):.2f} (f(2B)~2f(B))",
                **three_state_gib(sum(p.numel() for p in teacher.parameters()), teacher.dtype.itemsize,
                                  s["opt8"] == "on"))


def format_row(spec: dict, r: dict | None) -> str:
    name = "shared UNet + 2 LoRA" if spec["design"] == "shared" else "three UNets (DMD2 layout)"
    if spec["design"] == "shared" and spec.get("dmd2", "none") != "none":
        name += {"gan": " + GAN head", "4step": ", 4-step G (k=3)", "gan+4step": " + GAN head, 4-step G (k=3)"}[spec["dmd2"]]
    head = f"| {name} | {spec['batch']} | {spec['precision']} | {spec['gc']} | {spec['opt8']} | {spec['reg']} |"
    state = ""
    if r is not None and "weights" in r:
        state = f" {r['weights']:.2f} / {r['lora']:.2f} / {r['grads']:.2f} / {r['optim']:.2f}"
    if r is not None and r.get("not_run"):
        return head + f" not run | > state | - | - | - |{state} (counted: its state alone exceeds this host) |"
    if r is None or r.get("step") is None:
        return head + f" OOM | OOM | - | - | - |{state}{' (counted)' if state else ''} |"
    return (head + f" {r['step']:.3f} | {r['peak']:.2f} | {r['f1']:.4f} | {r['lora_fwd']:.2f} | {r['ratio']} |"
            f"{state} |")


def _limit_host_memory() -> None:
    """Cap this child's address space at what it maps now + the memory available, so running out of host memory
    is an allocation error in this process instead of the kernel's OOM killer picking a victim."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(0.95 * avail),) * 2)


def run_isolated(spec: dict) -> dict | None:
    """Run one row in a child process; None when it runs out of memory (killed, or torch's OOM error)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, "--_row", json.dumps(dict(spec, isolated=True))],
                          stdout=subprocess.PIPE, env=env, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
        print(line)
    if proc.returncode in (-9, 137, 3):  # SIGKILL by the kernel's OOM killer, or OutOfMemoryError below
        return None
    raise RuntimeError(f"row {spec} failed with exit code {proc.returncode}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--_row":
        if not torch.cuda.is_available():
            _limit_host_memory()
        try:
            print("ROW " + json.dumps(run_row(json.loads(sys.argv[2]))), flush=True)
        except torch.OutOfMemoryError:
            sys.exit(3)
        except RuntimeError as e:  # the CPU allocator hitting the address-space limit
            if "can't allocate memory" in str(e):
                sys.exit(3)
            raise
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "tiny_sdxl", "medium", "sd15", "sdxl"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=["bf16" if torch.cuda.is_available() else "no"])
    p.add_argument("--grad_checkpointing", nargs="+", default=["on", "off"])
    p.add_argument("--adamw8bit", nargs="+", default=["off", "on"])
    p.add_argument("--regression", nargs="+", default=["none", "taesd", "vae"])
    p.add_argument("--baseline", nargs="+", default=["yes"], help="also run the three-UNet baseline (yes/no)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of both adapters")
    p.add_argument("--dmd2", nargs="+", default=["none"], choices=list(DMD2_OPTIONS),
                   help="DMD2 rows of the shared design: GAN head on the fake score (real-latent batch of B), "
                        "4-step generator (backward simulation at its deepest, k=3), or both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--isolate", action="store_true", help="each row in its own child process (per-row memory)")
    p.add_argument("--profile", action="store_true", help="print the top operators of one shared-design step")
    args = p.parse_args()
    from diffusers import AutoencoderTiny

    tmp = Path(tempfile.mkdtemp())
    model, res = bench_model(args.model, tmp)
    (tmp / "p.txt").write_text("\n".join(f"benchmark prompt {i}" for i in range(16)) + "\n")
    pairs = make_pairs(model, res, tmp, max(args.batch)) if set(args.regression) - {"none"} else str(tmp / "none")
    real = make_real_latents(model, res, tmp, max(args.batch)) if set(args.dmd2) - {"none", "4step"} else None
    taesd_dir = str(tmp / "taesd")
    AutoencoderTiny(latent_channels=4).save_pretrained(taesd_dir)
    from diffusers import UNet2DConditionModel

    ucfg = UNet2DConditionModel.load_config(model, subfolder="unet")
    latent = [ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"]]
    print(f"command: python benchmarks/train_step.py {' '.join(sys.argv[1:])}")
    print(f"{device_line()}; model {args.model} at {res}px; LoRA rank {args.rank}")
    print(HEADER, flush=True)
    for b, prec, gco, o8, reg in itertools.product(args.batch, args.precision, args.grad_checkpointing,
                                                   args.adamw8bit, args.regression):
        base = dict(model=model, res=res, pairs=pairs, prompts=str(tmp / "p.txt"), taesd=taesd_dir, batch=b,
                    precision=prec, gc=gco, opt8=o8, reg=reg, rank=args.rank, repeats=args.repeats,
                    profile=args.profile, latent=latent, real=real)
        specs = [dict(base, design="shared", dmd2=d) for d in args.dmd2]
        if "yes" in args.baseline and reg == "none":
            specs.append(dict(base, design="three", profile=False))
        for spec in specs:
            if spec["design"] == "three" and "sdxl" in args.model:  # its state alone (> 40 GiB) exceeds the host
                print(format_row(spec, dict(run_row(dict(spec, count_only=True)), not_run=True)), flush=True)
                continue
            if args.isolate:
                r = run_isolated(spec)
            else:
                try:
                    r = run_row(spec)
                except torch.OutOfMemoryError:
                    r = None
                gc.collect()
            if r is None and spec["design"] == "three":
                r = run_row(dict(spec, count_only=True))
            print(format_row(spec, r), flush=True)


if __name__ == "__main__":
    main()
