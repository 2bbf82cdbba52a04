"""LoRA gradients under each precision recipe, against fp32, at SD1.5 shape (issue 13, item 4).

    python benchmarks/precision_grads.py --model sd15            # SD1.5-shaped UNet (random weights), 512 px
    python benchmarks/precision_grads.py --model tiny            # seconds, anywhere

One generator forward (LoRA on every default target, B = 0 as at the start of training) and a DM-shaped loss
0.5 * mse(x, stopgrad(x - g)) over the full latent (4x64x64 at 512 px: the mean divides every gradient by
16384, which is what flushes fp16 gradients to zero without loss scaling). For each recipe: how many LoRA-B
gradient tensors are more than 20% off fp32 (relative L2), the median and worst error, and the fraction of
entries that are exactly zero where fp32's are not.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from common import bench_model, device_line

# (name, base weight dtype, autocast dtype or None, loss scale)
RECIPES = [
    ("fp32", torch.float32, None, 1.0),
    ("pure fp16, no autocast, no scaling (old default: weight_dtype fp16, mixed_precision no; now refused)",
     torch.float16, None, 1.0),
    ("pure bf16, no autocast (now refused)", torch.bfloat16, None, 1.0),
    ("bf16 autocast + bf16 weights (new default with mixed_precision bf16)", torch.bfloat16, torch.bfloat16, 1.0),
    ("fp16 autocast + fp16 weights + loss scale 2^16 (mixed_precision fp16, GPU)", torch.float16, torch.float16,
     2.0 ** 16),
]


def lora_b_grads(path: str, res: int, weight_dtype, autocast, scale: float, seed: int = 0) -> dict:
    from sd_dmd.models.shared_unet import DMDModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    m = DMDModel.from_pretrained(path, weight_dtype=weight_dtype, device=dev)
    side = res // 2 ** (len(m.vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, m.unet.config.in_channels, side, side, generator=g).to(dev)
    direction = torch.randn(z.shape, generator=g).to(dev)
    cond = m.encode_prompts(["a photo of a cat"]).to(weight_dtype)
    ctx = torch.autocast(dev, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        x = m.generate(z, cond)
        loss = 0.5 * torch.nn.functional.mse_loss(x.float(), (x.detach().float() - 0.1 * direction))
    (loss * scale).backward()
    return {n: (p.grad.float() / scale).cpu() for n, p in m.unet.named_parameters()
            if "lora_B" in n and ".generator." in n and p.grad is not None}


def compare(ref: dict, got: dict) -> dict:
    errs, flushed, total = [], 0, 0
    for n, r in ref.items():
        gt = got.get(n, torch.zeros_like(r))
        errs.append(((gt - r).norm() / r.norm().clamp_min(1e-30)).item())
        nz = r != 0
        flushed += int(((gt == 0) & nz).sum())
        total += int(nz.sum())
    errs_t = torch.tensor(errs)
    return {"tensors": len(errs), "over_20pct": int((errs_t > 0.2).sum()), "median": errs_t.median().item(),
            "worst": errs_t.max().item(), "worst_name": list(ref)[int(errs_t.argmax())],
            "flushed_pct": 100.0 * flushed / max(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=["tiny", "sd15"])
    ap.add_argument("--recipes", type=int, nargs="+", default=list(range(len(RECIPES))), help="indices into RECIPES")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, res = bench_model(args.model, Path(tmp))
        ref = lora_b_grads(path, res, *RECIPES[0][1:])
        print(f"# LoRA-B gradients against fp32: model {args.model} ({res} px), {len(ref)} tensors")
        print(device_line())
        print("| recipe | tensors > 20% off | median rel. error | worst (tensor) | entries flushed to 0 |")
        print("|---|---|---|---|---|")
        for i in args.recipes[1:] if args.recipes[0] == 0 else args.recipes:
            name, *spec = RECIPES[i]
            try:
                c = compare(ref, lora_b_grads(path, res, *spec))
            except (RuntimeError, NotImplementedError) as e:  # an op without a kernel for this dtype here
                print(f"| {name} | not run: {str(e).splitlines()[0][:80]} | | | |", flush=True)
                continue
            print(f"| {name} | {c['over_20pct']} of {c['tensors']} | {c['median']:.2%} | {c['worst']:.0%} "
                  f"({c['worst_name'].replace('base_model.model.', '')}) | {c['flushed_pct']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
