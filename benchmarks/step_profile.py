"""Where a training step's time goes: per turn, in UNet forward-equivalents, in kernels against Python/dispatch, and
against what its FLOPs would take at this machine's matmul rate (issue 35).

    python benchmarks/step_profile.py                                   # the digits default step (configs/digits.yaml)
    python benchmarks/step_profile.py --model sd15 --resolution 256     # SD1.5-shaped step on CPU, batch 1
    python benchmarks/step_profile.py --steps 6 --train.one_call_roles false   # extra arguments: config overrides
    python benchmarks/step_profile.py --ab        # one Trainer, steps alternated: both issue-35 features off / on

For the digits it needs demo_out/ (``python -m sd_dmd.demo --inputs_only`` and ``python -m sd_dmd.encode_images
--source digits --output_dir demo_out/real``). ``--model sd15`` builds an SD1.5-shaped pipeline with random weights
(DMD + TTUR 1, no regression, no GAN: the row docs/BENCHMARKS.md's training-step table has).

Columns:
- turn times: medians over ``--steps`` timed steps after ``--warmup`` steps (the generator turn; the fake turns);
- f(B): one forward of the plain UNet (adapters off, no grad) at the training batch; forward-equivalents = step / f(B);
- UNet passes: samples through conv_in per step (full forwards and the GAN head's half-UNet alike) over B;
- in aten ops: the self time of every aten operator in one profiled step (torch.profiler); the rest of the wall time
  is Python, module dispatch and autograd bookkeeping outside any operator;
- FLOPs: torch.utils.flop_counter over one step (matmuls and convolutions, forward and backward); at-matmul-rate = that
  many FLOPs at the fp32 rate of a 1024x1024 matmul measured in the same run; FLOP rate = FLOPs / step time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_model, device_line, sync, time_call


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def build(args, overrides, tmp: Path):
    from accelerate import Accelerator

    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config, resolve_precision
    from sd_dmd.training.loop import Trainer

    if args.model == "digits":
        argv = ["--config", str(ROOT / "configs" / "digits.yaml")]
    else:
        path, _ = bench_model(args.model, tmp)
        (tmp / "p.txt").write_text("\n".join(f"benchmark prompt {i}" for i in range(16)) + "\n")
        argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", path,
                "--model.resolution", str(args.resolution), "--data.prompts", str(tmp / "p.txt"),
                "--regression.loss", "none", "--train.batch_size", "1", "--dmd.fake_updates_per_step", "1",
                "--lora.generator.rank", "64", "--lora.generator.alpha", "64", "--lora.fake.rank", "64",
                "--lora.fake.alpha", "64", "--gan.real_latents", "null"]
    cfg, _ = load_config(Config, argv + ["--output_dir", str(tmp / "run"), "--logging.tracker", "none",
                                         "--train.max_steps", "1000"] + overrides)
    resolve_precision(cfg)
    return Trainer(cfg, Accelerator(mixed_precision=cfg.train.mixed_precision), log=lambda *a, **k: None)


def timed_step(t) -> dict:
    """One training step, its two kinds of turn timed apart (what turns.train_step does, in the same order)."""
    from sd_dmd.training import turns

    sync()
    t0 = time.perf_counter()
    _, applied, samples = turns.generator_turn(t)
    sync()
    t1 = time.perf_counter()
    for k in range(t.cfg.dmd.fake_updates_per_step):
        turns.fake_turn(t, samples if k == 0 else None, k)
    sync()
    t2 = time.perf_counter()
    t.step += 1
    return {"generator turn": t1 - t0, "fake turns": t2 - t1, "step": t2 - t0}


def forward_time(t, repeats: int = 5) -> float:
    m, b = t.model, t.cfg.train.batch_size
    x = torch.randn(b, *t.latent_shape, device=m.device, dtype=m.unet.dtype)
    cond = m.encode_prompts(["a handwritten digit one"] * b).to(m.unet.dtype)
    ts = torch.full((b,), 500, device=m.device)
    m.unet.disable_adapters()
    try:
        with torch.no_grad():
            return time_call(lambda: m.unet(x, ts, **m.text.unet_kwargs(cond)), repeats, warmup=2)
    finally:
        m.unet.enable_adapters()


def count_passes(t) -> float:
    """Samples through conv_in in one step (every UNet forward and every GAN-head bottleneck), over the batch."""
    seen = []
    h = t.model.unet.conv_in.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[0]))
    try:
        timed_step(t)
    finally:
        h.remove()
    return sum(seen) / t.cfg.train.batch_size, len(seen)


def step_flops(t) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        timed_step(t)
    return fc.get_total_flops()


def profile_step(t, top: int):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        wall = timed_step(t)["step"]
    events = prof.key_averages()
    aten = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    rows = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:top]
    return wall, aten, [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in rows]


def ab(t, steps: int) -> None:
    """Steps alternated on one Trainer between train.lora_merge + train.one_call_roles off and on (machine drift hits
    both alike); prints the medians and their ratio."""
    times: dict = {False: [], True: []}
    for i in range(2 * steps + 2):
        on = bool(i % 2)
        t.model.set_lora_merge(on)
        t.model.one_call_roles = on
        r = timed_step(t)
        if i >= 2:
            times[on].append(r)
    print("| features | generator turn (s) | fake turns (s) | step (s) |\n|---|---|---|---|")
    med = {}
    for on in (False, True):
        med[on] = {k: statistics.median(r[k] for r in times[on]) for k in times[on][0]}
        print(f"| lora_merge + one_call_roles {'on' if on else 'off'} | {med[on]['generator turn']:.3f} | "
              f"{med[on]['fake turns']:.3f} | {med[on]['step']:.3f} |")
    print(f"\noff / on: step {med[False]['step'] / med[True]['step']:.2f}x "
          f"({steps} steps each, alternated, after one warm-up each)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=["digits", "tiny", "medium", "sd15"])
    p.add_argument("--resolution", type=int, default=256, help="for --model sd15/medium/tiny")
    p.add_argument("--steps", type=int, default=8, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=10, help="operators listed")
    p.add_argument("--label", default="", help="a name for this row (e.g. before / after)")
    p.add_argument("--ab", action="store_true", help="alternate the issue-35 features off / on, step by step")
    args, overrides = p.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = build(args, overrides, Path(tmp))
        if args.ab:
            print(f"command: python benchmarks/step_profile.py {' '.join(__import__('sys').argv[1:])}")
            print(device_line() + f"; model {args.model}, batch {t.cfg.train.batch_size}")
            return ab(t, args.steps)
        for _ in range(args.warmup):
            timed_step(t)
        runs = [timed_step(t) for _ in range(args.steps)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        f_b = forward_time(t)
        passes, calls = count_passes(t)
        flops = step_flops(t)
        wall, aten, ops = profile_step(t, args.top)
        rate = matmul_gflops()
    b = t.cfg.train.batch_size
    print(f"command: python benchmarks/step_profile.py {' '.join(__import__('sys').argv[1:])}")
    print(device_line() + f"; model {args.model}, batch {b}, fake updates {t.cfg.dmd.fake_updates_per_step}")
    print(f"matmul rate (1024^2 fp32): {rate:.0f} GFLOP/s\n")
    print("| row | generator turn (s) | fake turns (s) | step (s) | f(B) (s) | fwd-equivalents | UNet passes (calls) "
          "| in aten ops | outside (Python/dispatch) | step GFLOP | at matmul rate (s) | FLOP rate / matmul rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.label or args.model} | {med['generator turn']:.3f} | {med['fake turns']:.3f} | {med['step']:.3f} "
          f"| {f_b:.4f} | {med['step'] / f_b:.1f} | {passes:.1f} ({calls}) | {aten / wall:.0%} | {1 - aten / wall:.0%} "
          f"| {flops / 1e9:.1f} | {flops / 1e9 / rate:.3f} | {flops / 1e9 / med['step'] / rate:.0%} |")
    print(f"\nprofiled step: {wall:.3f} s wall, {aten:.3f} s in aten ops; top operators by self time:")
    print("| operator | calls | self (s) | share of the step |\n|---|---|---|---|")
    for name, count, s in ops:
        print(f"| {name} | {count} | {s:.3f} | {s / wall:.0%} |")


if __name__ == "__main__":
    main()
