"""The paper's Figure 3 on a 2D mixture, with the library's own loss code.

    python -m sd_dmd.toy --out DIR

Real distribution: two far-apart Gaussians whose exact denoiser is known at every noise level
(a noised mixture is a mixture). Generator: an MLP from 2D noise whose samples start as a small
cluster near one mode. Fake score: an MLP denoiser trained with ``fake_score_loss`` on generator
samples. Variants: (a) real score only, (b) real - fake (distribution matching), (c) full DMD with
regression toward pairs made by DDIM on the analytic denoiser.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sd_dmd.core.denoisers import EpsDenoiser
from sd_dmd.core.losses import dmd_loss, fake_score_loss, make_regression_loss
from sd_dmd.core.schedule import NoiseSchedule, sample_timesteps


class MixtureDenoiser:
    """Exact E[x0 | x_t] for x0 ~ sum_k pi_k N(mu_k, s^2 I) under x_t = alpha x0 + sigma n."""

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseSchedule):
        self.means = means  # [K, D]
        self.std = std  # per-component isotropic std
        self.schedule = schedule

    def __call__(self, x_t, t, cond=None):
        a, s = self.schedule.alpha_sigma(t, x_t)  # [B, 1]
        var = a**2 * self.std**2 + s**2  # marginal variance of each noised component
        diff = x_t[:, None, :] - a[:, None, :] * self.means[None]  # [B, K, D]
        logits = -0.5 * diff.pow(2).sum(-1) / var  # equal weights, equal variances
        w = logits.softmax(dim=1)  # [B, K]
        post = self.means[None] + (a * self.std**2 / var)[:, None, :] * diff  # per-component E[x0|x_t]
        return (w[..., None] * post).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, len(self.means), (n,), generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator)


def _mlp(d_in: int, d_out: int, width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d_out))


class ToyGenerator(nn.Module):
    """x = start + spread * z + MLP(z); the MLP's last layer starts at zero (a small cluster)."""

    def __init__(self, start=(-1.2, 0.6), spread: float = 0.15):
        super().__init__()
        self.register_buffer("start", torch.tensor(start))
        self.spread = spread
        self.net = _mlp(2, 2)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):
        return self.start + self.spread * z + self.net(z)


class ToyEpsModel(nn.Module):
    """Fake-score network: predicts eps from (x_t, sinusoidal embedding of t)."""

    def __init__(self, t_dim: int = 16, T: int = 1000):
        super().__init__()
        self.t_dim, self.T = t_dim, T
        self.net = _mlp(2 + t_dim, 2)

    def forward(self, x_t, t, cond=None):
        half = self.t_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
        ang = (t.float() / self.T)[:, None] * 1000.0 * freqs[None]
        emb = torch.cat([ang.sin(), ang.cos()], dim=1)
        return self.net(torch.cat([x_t, emb], dim=1))


@torch.no_grad()
def ddim_sample(denoiser, z: torch.Tensor, schedule: NoiseSchedule, steps: int = 50) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, probability-flow ODE) from x_T = z, as DDIMScheduler.step."""
    ts = torch.linspace(schedule.num_train_timesteps - 1, 0, steps).round().long()
    x = z
    for i, t in enumerate(ts):
        tb = t.repeat(len(x))
        x0 = denoiser(x, tb, None)
        if i + 1 == len(ts):
            return x0
        eps = schedule.x0_to_eps(x, x0, tb)
        a, s = schedule.alpha_sigma(ts[i + 1].repeat(len(x)), x)
        x = a * x0 + s * eps
    return x


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets (random unit projections)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    return (pa - pb).pow(2).mean().sqrt().item()


@dataclass
class ToySettings:
    steps: int = 1500  # generator updates per variant
    fake_updates: int = 5  # fake-score updates per generator update (TTUR)
    fake_warmup: int = 300  # fake updates on the initial generator before training
    batch: int = 256
    lr_gen: float = 1e-3
    lr_fake: float = 1e-3
    lambda_reg: float = 0.25  # the paper's lambda_reg
    num_pairs: int = 1024
    t_min: int = 20  # 0.02 T
    t_max: int = 980  # 0.98 T
    seed: int = 0


def train_variant(variant: str, real: MixtureDenoiser, schedule: NoiseSchedule, s: ToySettings):
    """variant in {"a", "b", "c"}; returns the trained generator."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    gen, fake_net = ToyGenerator(), ToyEpsModel()
    fake = EpsDenoiser(fake_net, schedule)
    opt_g = torch.optim.Adam(gen.parameters(), lr=s.lr_gen)
    opt_f = torch.optim.Adam(fake_net.parameters(), lr=s.lr_fake)
    if variant == "c":
        z_ref = torch.randn(s.num_pairs, 2, generator=g)
        y_ref = ddim_sample(real, z_ref, schedule)
        reg = make_regression_loss("l2")

    def fake_step():
        with torch.no_grad():
            x = gen(torch.randn(s.batch, 2, generator=g))
        t = sample_timesteps(s.batch, 0, schedule.num_train_timesteps - 1, generator=g)
        loss, _ = fake_score_loss(fake, x, t, torch.randn(x.shape, generator=g), schedule)
        opt_f.zero_grad()
        loss.backward()
        opt_f.step()

    if variant != "a":
        for _ in range(s.fake_warmup):
            fake_step()
    for _ in range(s.steps):
        x = gen(torch.randn(s.batch, 2, generator=g))
        t = sample_timesteps(s.batch, s.t_min, s.t_max, generator=g)
        noise = torch.randn(x.shape, generator=g)
        loss, _ = dmd_loss(x, real, None if variant == "a" else fake, t, noise, schedule)
        if variant == "c":
            idx = torch.randint(0, s.num_pairs, (s.batch,), generator=g)
            loss_reg, _ = reg(gen(z_ref[idx]), y_ref[idx])
            loss = loss + s.lambda_reg * loss_reg
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if variant != "a":
            for _ in range(s.fake_updates):
                fake_step()
    return gen


def evaluate(samples: torch.Tensor, real: MixtureDenoiser, real_samples: torch.Tensor) -> dict:
    nearest = torch.cdist(samples, real.means).argmin(dim=1)
    frac = [(nearest == k).float().mean().item() for k in range(len(real.means))]
    return {"mode_fractions": frac, "sliced_wasserstein2": sliced_wasserstein(samples, real_samples)}


def plot(results: dict, real_samples: torch.Tensor, init: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"a": "(a) real score only", "b": "(b) real - fake (no regression)", "c": "(c) DMD: real - fake + regression"}
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), sharex=True, sharey=True)
    for ax, (name, res) in zip(axes, results.items()):
        ax.scatter(*real_samples[:2000].T, s=3, c="tab:blue", alpha=0.25, label="real")
        ax.scatter(*init[:500].T, s=3, c="tab:gray", alpha=0.5, label="generator at init")
        ax.scatter(*res["samples"][:1000].T, s=3, c="tab:orange", alpha=0.6, label="generator after training")
        m = res["metrics"]
        fr = ", ".join(f"{f:.0%}" for f in m["mode_fractions"])
        ax.set_title(f"{titles[name]}\nmodes {fr} | SW2 {m['sliced_wasserstein2']:.3f}", fontsize=10)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-2.0, 2.0)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, settings: ToySettings | None = None, variants=("a", "b", "c")) -> dict:
    s = settings or ToySettings()
    out.mkdir(parents=True, exist_ok=True)
    schedule = NoiseSchedule.scaled_linear()
    real = MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), std=0.2, schedule=schedule)
    g = torch.Generator().manual_seed(1234)
    real_samples = real.sample(4096, g)
    z_eval = torch.randn(4096, 2, generator=g)
    results = {}
    for v in variants:
        t0 = time.time()
        gen = train_variant(v, real, schedule, s)
        with torch.no_grad():
            samples = gen(z_eval)
        results[v] = {"samples": samples, "metrics": {**evaluate(samples, real, real_samples),
                                                        "train_seconds": round(time.time() - t0, 1)}}
        print(f"variant ({v}): {results[v]['metrics']}", flush=True)
    with torch.no_grad():
        init = ToyGenerator()(z_eval)
    metrics = {v: r["metrics"] for v, r in results.items()}
    metrics["distance"] = "sliced 2-Wasserstein (256 projections) to 4096 real samples; lower is better"
    metrics["initial"] = evaluate(init, real, real_samples)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot(results, real_samples, init, out / "figure3.png")
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description="Reproduce DMD Figure 3 on a 2D two-mode mixture.")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--steps", type=int, default=ToySettings.steps, help="generator steps per variant")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    run(args.out, ToySettings(steps=args.steps, seed=args.seed))
    print(f"wrote {args.out / 'figure3.png'} and {args.out / 'metrics.json'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
