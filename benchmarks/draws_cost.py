"""What per-sample keyed draws cost a step (issue 34), against one torch stream per process (before).

    python benchmarks/draws_cost.py [--batch 32] [--reps 50]

Per step and process: the generator turn's batch, one fake turn's and one extra (TTUR) fake turn's fresh samples,
without stores or the GAN (their draws are scalars and one more latent per sample); "before" draws the same tensors
from one ``torch.Generator``. Shapes: the digits latent (4x8x8) and SD1.5's at 512 px (4x64x64).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import types

import torch

from sd_dmd.training.draws import Draws


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    n = a.batch
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(seed=0, batch_size=n, gradient_accumulation_steps=1),
                                dmd=types.SimpleNamespace(generator_timesteps=[999], t_min=20, t_max=980))
    print(f"$ python {' '.join(sys.argv)}  ({platform.machine()}, {torch.get_num_threads()} torch threads)")
    print("| latent | per-sample keyed (now) | one torch stream per process (before) |\n|---|---|---|")
    for shape in ((4, 8, 8), (4, 64, 64)):
        d = Draws(cfg, ["a"] * 10, shape, 1000, "cpu", 0)
        g = torch.Generator().manual_seed(0)

        def now():
            d.begin(d.step + 1)
            d.generator_batch(False), d.critic_batch(n, False, 0), d.fresh_samples(n, 1)

        def before():
            for _ in range(4):
                torch.randint(0, 1000, (n,), generator=g), torch.randn((n, *shape), generator=g)

        ms = []
        for f in (now, before):
            f()
            t = time.perf_counter()
            for _ in range(a.reps):
                f()
            ms.append((time.perf_counter() - t) / a.reps * 1e3)
        print(f"| {'x'.join(map(str, shape))}, batch {n} | {ms[0]:.1f} ms/step | {ms[1]:.1f} ms/step |")


if __name__ == "__main__":
    main()
