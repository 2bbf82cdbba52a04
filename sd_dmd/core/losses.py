"""DMD losses on denoiser callables (DESIGN.md; paper Sec. 4.2, Eq. 7-8).

Each loss returns ``(loss, stats)``; stats are detached python floats for the loop to log.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sd_dmd.core.denoisers import Denoiser
from sd_dmd.core.schedule import NoiseSchedule, append_dims


def _per_sample_mean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(dim=1)


def dmd_loss(x: torch.Tensor, real: Denoiser, fake: Optional[Denoiser], t: torch.Tensor, noise: torch.Tensor,
             schedule: NoiseSchedule, cond: Optional[torch.Tensor] = None,
             sample_weight: Optional[torch.Tensor] = None):
    """Distribution-matching loss for the generator turn.

    grad = ((x - mu_real) - (x - mu_fake)) / mean_{C,H,W}|x - mu_real|  (Eq. 7 with Eq. 8's w_t)
    loss = 0.5 * mse(x, stopgrad(x - grad)), whose gradient w.r.t. x is grad / numel.
    ``fake=None`` drops the fake term (real score only; the paper's Figure 3a, mode-seeking).
    ``sample_weight`` (B,), detached, multiplies each sample's grad: f-distill's h(r) (:func:`f_divergence_weights`).
    """
    x_t = schedule.add_noise(x.detach(), noise, t)
    with torch.no_grad():
        mu_real = real(x_t, t, cond).float()
        xf = x.detach().float()
        mu_fake = xf if fake is None else fake(x_t, t, cond).float()
        p_real = xf - mu_real
        p_fake = xf - mu_fake
        weight = 1.0 / _per_sample_mean(p_real.abs())  # Eq. 8, per sample
        if sample_weight is not None:
            weight = weight * sample_weight.detach().float()
        grad = torch.nan_to_num((p_real - p_fake) * append_dims(weight, x.ndim))
        target = xf - grad
    loss = 0.5 * F.mse_loss(x.float(), target)
    stats = {
        "loss_dm": loss.item(),
        "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item(),
        "eq8_weight": weight.mean().item(),  # Eq. 8's w_t (not the config key dmd.dm_weight)
        "dm_real_fake_gap": (mu_real - mu_fake).abs().mean().item(),
    }
    return loss, stats


# f-distill (Xu et al. 2025, arXiv 2502.15681): the gradient of D_f(p_real || p_fake) is DMD's, each sample weighted
# by h(r) = f''(r) r^2 with r = p_real / p_fake at the noised sample (names and h as in NVlabs/FastGen's f_distill).
F_DIVERGENCE_WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),  # f = -log r: DMD
    "forward_kl": lambda r: r,  # f = r log r: mass-covering
    "js": lambda r: r / (1 + r),  # Jensen-Shannon
    "softened_rkl": lambda r: 1 / (1 + r),
    "squared_hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: 1 + r,
}


def timestep_bins(t: torch.Tensor, n_bins: int, t_range: tuple[int, int]) -> torch.Tensor:
    """The bin (0 .. n_bins-1) of each timestep, ``n_bins`` equal bins over [t_range[0], t_range[1]]."""
    lo, hi = t_range
    width = max(hi - lo, 1) / n_bins
    return ((t.double() - lo) / width).floor().long().clamp(0, n_bins - 1)


def f_divergence_weights(logits: torch.Tensor, t: torch.Tensor, divergence: str, clip: tuple[float, float],
                         bin_ratio: torch.Tensor, mean_h: float, t_range: tuple[int, int]):
    """f-distill's per-sample weights h, and the sums that update the normalisation.

    r = exp(logit) (a head trained with the non-saturating loss estimates log p_real / p_fake), clipped to ``clip``;
    r is divided by ``bin_ratio``'s mean ratio of its timestep bin, h = h_f(r), and h divided by ``mean_h``, so that
    the weighting reshapes the gradient and does not rescale it. Returns (h, sums): sums = (count per bin, sum of the
    clipped r per bin, sum of h before the division by ``mean_h``, the number of samples), to be summed over the
    global batch before the normalisation's next update."""
    if divergence not in F_DIVERGENCE_WEIGHTS:
        raise ValueError(f"unknown divergence '{divergence}' (choose from {sorted(F_DIVERGENCE_WEIGHTS)})")
    r = torch.exp(logits.detach().float().reshape(-1).clamp(-20.0, 20.0)).clamp(*clip)
    idx = timestep_bins(t.to(r.device), len(bin_ratio), t_range)
    h_raw = F_DIVERGENCE_WEIGHTS[divergence](r / bin_ratio.to(r)[idx])
    n_bins = len(bin_ratio)
    sums = (torch.bincount(idx, minlength=n_bins).double(), torch.bincount(idx, weights=r.double(), minlength=n_bins),
            h_raw.double().sum(), float(len(r)))
    return h_raw / mean_h, sums


FAKE_LOSS_WEIGHTINGS = ("eps", "snr+1", "v", "flow")


def native_weighting(prediction_type: str) -> str:
    """The fake-score loss the teacher itself was trained with: eps-MSE for eps teachers, v-MSE for v ones, the
    velocity MSE for flow-matching ones."""
    return {"v_prediction": "v", "flow": "flow"}.get(prediction_type, "eps")


def fake_score_loss(fake: Denoiser, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    schedule: NoiseSchedule, cond: Optional[torch.Tensor] = None, weighting: str = "eps"):
    """Denoising loss of the fake score on generator samples, written on x0 so it works for any denoiser.

    ``eps``: mse(eps_fake(x_t), noise) = SNR * |x0_hat - x|^2 (SD's loss; DMD and DMD2 on SD).
    ``snr+1`` (= ``v``): (SNR + 1) * |x0_hat - x|^2 = mse(v_fake(x_t), v) (v-prediction's loss: v - v_hat =
    (x0_hat - x0) / sigma at fixed x_t, and 1 / sigma^2 = SNR + 1); at high noise the eps loss weights the x0
    error by SNR ~ 0.005 (t = 999), so the fake score hardly learns there, yet Eq. 7 reads its x0 there.
    ``flow``: 1 / sigma^2 * |x0_hat - x|^2 = mse(v_fake(x_t), eps - x), the velocity loss of a flow-matching
    teacher (x0 = x_t - sigma v at fixed x_t).
    """
    if weighting not in FAKE_LOSS_WEIGHTINGS:
        raise ValueError(f"unknown fake-score loss weighting '{weighting}' (choose from {FAKE_LOSS_WEIGHTINGS})")
    x = x.detach()
    x_t = schedule.add_noise(x, noise, t)
    x0_hat = fake(x_t, t, cond).float()
    a, s = schedule.alpha_sigma(t, x)
    snr = (a / s) ** 2
    w = snr if weighting == "eps" else 1.0 / s ** 2 if weighting == "flow" else snr + 1
    loss = (w * (x0_hat - x.float()).pow(2)).mean()
    return loss, {"loss_fake": loss.item()}


def gan_generator_loss(disc: Callable, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       schedule: NoiseSchedule, cond: Optional[torch.Tensor] = None):
    """DMD2's generator GAN term: softplus(-D(x_t)) with x_t the diffused generator sample (diffusion-GAN).

    ``disc`` maps (x_t, t, cond) to one realism logit per sample. The gradient reaches x through D; D's own
    parameters are not this turn's to update (the loop steps only the generator and discards the rest)."""
    logits = disc(schedule.add_noise(x, noise, t), t, cond).float()
    loss = F.softplus(-logits).mean()
    return loss, {"loss_gan_generator": loss.item()}


def input_grad(loss: torch.Tensor, x: torch.Tensor, scale: float = 1.0, retain_graph: bool = False) -> torch.Tensor:
    """d loss / d x alone: autograd visits only the graph between ``loss`` and ``x`` and computes no parameter
    gradient on the way (the discriminator's LoRA and head get none). ``scale`` multiplies the loss before the
    backward and divides the result after (fp16: the loss scale, so that small gradients do not underflow)."""
    (g,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x, retain_graph=retain_graph)
    return g if scale == 1.0 else g / scale


def grad_ratio(g_num: torch.Tensor, g_den: torch.Tensor) -> float:
    """||g_num|| / ||g_den||, norms over the whole tensors (the micro-batch); 0 when both are 0."""
    num, den = g_num.float().norm().item(), g_den.float().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def with_grad(x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``x`` is ``grad``: (x - sg(x)) . sg(grad) + sg(value)."""
    return ((x.float() - x.detach().float()) * grad.detach().float()).sum() + value.detach()


def gan_discriminator_loss(disc: Callable, fake: torch.Tensor, real: torch.Tensor, t_fake: torch.Tensor,
                           t_real: torch.Tensor, noise_fake: torch.Tensor, noise_real: torch.Tensor,
                           schedule: NoiseSchedule, cond_fake: Optional[torch.Tensor] = None,
                           cond_real: Optional[torch.Tensor] = None, r1_weight: float = 0.0,
                           r1_noise: Optional[torch.Tensor] = None):
    """DMD2's discriminator term: softplus(D(fake)) + softplus(-D(real)), each diffused to its own timestep.

    ``fake`` is detached (generator samples); ``real`` are encoded real latents. Stats include how often D is
    right on each side (``gan_d_real_acc``, ``gan_d_fake_acc``): both near 1 on few real images means over-fitting.
    ``r1_weight`` > 0 adds FastGen's approximate R1 (APT): r1_weight * mse(D(real_t), D(real'_t)), real' = real +
    ``r1_noise`` (already times gan.r1_alpha), diffused with the same noise and t; its D features without gradient."""
    lf = disc(schedule.add_noise(fake.detach(), noise_fake, t_fake), t_fake, cond_fake).float()
    lr = disc(schedule.add_noise(real, noise_real, t_real), t_real, cond_real).float()
    loss = F.softplus(lf).mean() + F.softplus(-lr).mean()
    stats = {"loss_gan_discriminator": loss.item(), "gan_d_real_acc": (lr > 0).float().mean().item(),
             "gan_d_fake_acc": (lf < 0).float().mean().item()}
    if r1_weight > 0 and r1_noise is not None:
        lr_alpha = disc(schedule.add_noise(real + r1_noise.to(real.dtype), noise_real, t_real), t_real, cond_real,
                        features_grad=False).float()
        loss_r1 = F.mse_loss(lr, lr_alpha)
        loss = loss + r1_weight * loss_r1
        stats["loss_gan_r1"] = loss_r1.item()
    return loss, stats


class RegressionLoss(torch.nn.Module):
    """l(decode(pred), decode(target)) for DMD's regression stabiliser (Sec. 4.2.4).

    ``decoder`` maps latents to images in [-1, 1]; ``None`` compares the inputs directly.
    """

    def __init__(self, decoder: Optional[Callable] = None):
        super().__init__()
        self.decoder = decoder  # latents -> images in [-1, 1], or None

    def decode(self, x):
        return x if self.decoder is None else self.decoder(x)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            target_img = self.decode(target)
        loss = self.distance(self.decode(pred).float(), target_img.float())
        return loss, {"loss_reg": loss.item()}


class L2Regression(RegressionLoss):
    def distance(self, a, b):
        return F.mse_loss(a, b)


class L1Regression(RegressionLoss):
    def distance(self, a, b):
        return F.l1_loss(a, b)


class LPIPSRegression(RegressionLoss):
    """LPIPS(VGG), the paper's choice. ``pretrained_backbone=False`` keeps random VGG (offline tests)."""

    def __init__(self, decoder: Optional[Callable] = None, net: str = "vgg", pretrained_backbone: bool = True):
        super().__init__(decoder)
        import lpips

        with warnings.catch_warnings():
            # lpips builds its backbone with torchvision's deprecated vgg16(pretrained=...) call; nothing we pass
            # avoids it, so torchvision's two deprecation messages are dropped here (only here)
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        self.lpips.requires_grad_(False).eval()

    def distance(self, a, b):
        return self.lpips(a, b).mean()


def make_regression_loss(kind: str, decoder: Optional[Callable] = None, **kwargs) -> RegressionLoss:
    """``kind`` in {"l2", "l1", "lpips"}."""
    kinds = {"l2": L2Regression, "l1": L1Regression, "lpips": LPIPSRegression}
    if kind not in kinds:
        raise ValueError(f"unknown regression loss '{kind}' (choose from {sorted(kinds)})")
    return kinds[kind](decoder=decoder, **kwargs)
