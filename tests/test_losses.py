import math

import pytest
import torch

from sd_dmd.core.denoisers import CFGDenoiser, EpsDenoiser
from sd_dmd.core.losses import (dmd_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss,
                            make_regression_loss)
from sd_dmd.core.schedule import NoiseSchedule, sample_timesteps

S = NoiseSchedule.scaled_linear()


def shrink(c):
    """A simple denoiser: x0_hat = c * x_t."""
    return lambda x_t, t, cond: c * x_t


def _setup(seed=0, shape=(4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    t = sample_timesteps(shape[0], 20, 980, generator=g)
    noise = torch.randn(shape, generator=g)
    return x, t, noise


def test_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(S.alphas_cumprod, sch.alphas_cumprod.float(), atol=1e-6)
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(S.add_noise(x0, n, t), sch.add_noise(x0, n, t), atol=1e-5)
    x_t = S.add_noise(x0, n, t)
    assert torch.allclose(S.eps_to_x0(x_t, n, t), x0, atol=1e-3)
    assert torch.allclose(S.x0_to_eps(x_t, x0, t), n, atol=1e-4)


def test_sample_timesteps_range_and_error():
    t = sample_timesteps(10000, 20, 980, generator=torch.Generator().manual_seed(0))
    assert t.min() == 20 and t.max() == 980
    with pytest.raises(ValueError, match="t_min"):
        sample_timesteps(2, 500, 100)


def test_dmd_gradient_matches_formula():
    x, t, noise = _setup()
    real, fake = shrink(0.5), shrink(0.8)
    loss, stats = dmd_loss(x, real, fake, t, noise, S)
    loss.backward()
    x_t = S.add_noise(x.detach(), noise, t)
    p_real, p_fake = x.detach() - real(x_t, t, None), x.detach() - fake(x_t, t, None)
    w = p_real.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = (p_real - p_fake) / w / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-7, rtol=1e-5)
    assert x.grad.abs().max() > 0
    assert set(stats) >= {"loss_dm", "dm_grad_norm"}


def test_dmd_gradient_zero_when_real_equals_fake():
    x, t, noise = _setup(1)
    loss, _ = dmd_loss(x, shrink(0.7), shrink(0.7), t, noise, S)
    loss.backward()
    assert x.grad.abs().max() == 0


def test_descent_moves_toward_real_prediction():
    target = torch.full((4, 3, 5, 5), 2.0)
    real = lambda x_t, t, c: target  # noqa: E731 - real denoiser always predicts 2
    fake = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    x, t, noise = _setup(2)
    before = (x.detach() - target).abs().mean()
    opt = torch.optim.SGD([x], lr=50.0)
    for _ in range(5):
        opt.zero_grad()
        loss, _ = dmd_loss(x, real, fake, t, noise, S)
        loss.backward()
        opt.step()
    assert (x.detach() - target).abs().mean() < before * 0.8


def test_fake_score_loss_prefers_true_noise_predictor():
    """Data ~ N(m, s^2): the exact x0 denoiser is known, so the true eps beats a perturbed one."""
    m, s = 0.7, 0.3
    x = m + s * torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))

    def exact(x_t, t, cond, bias=0.0):
        a, sig = S.alpha_sigma(t, x_t)
        return m + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * m) + bias

    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(4096, 0, 999, generator=g)
    n = torch.randn(x.shape, generator=g)
    good, _ = fake_score_loss(exact, x, t, n, S)
    bad, _ = fake_score_loss(lambda *a: exact(*a, bias=0.1), x, t, n, S)
    assert good < bad
    # and it equals the eps-MSE of the eps form of the same denoiser
    eps_model = lambda x_t, t, c: S.x0_to_eps(x_t, exact(x_t, t, c), t)  # noqa: E731
    x_t = S.add_noise(x, n, t)
    assert math.isclose(good.item(), (eps_model(x_t, t, None) - n).pow(2).mean().item(), rel_tol=1e-4)


def test_cfg_batched_equals_separate():
    calls = []

    def den(x_t, t, cond):
        calls.append(len(x_t))
        return x_t * cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    uncond = torch.randn(1, 7, 8)
    cond = torch.randn(3, 7, 8)
    x_t, t = torch.randn(3, 4, 2, 2), torch.tensor([10, 20, 30])
    out = CFGDenoiser(den, 3.0, uncond)(x_t, t, cond)
    u, c = den(x_t, t, uncond.expand(3, 7, 8)), den(x_t, t, cond)
    assert torch.allclose(out, u + 3.0 * (c - u), atol=1e-6)
    assert calls[0] == 6  # one batched forward


def test_eps_denoiser_roundtrip():
    x0, n, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([100, 900])
    den = EpsDenoiser(lambda x_t, t, c: n, S)
    assert torch.allclose(den(S.add_noise(x0, n, t), t), x0, atol=1e-3)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_regression_losses(kind):
    loss_fn = make_regression_loss(kind)
    a = torch.zeros(2, 3, 8, 8, requires_grad=True)
    b = torch.ones(2, 3, 8, 8)
    loss, stats = loss_fn(a, b)
    assert loss.item() == pytest.approx(1.0) and stats["loss_reg"] == pytest.approx(1.0)
    loss.backward()
    assert a.grad.abs().sum() > 0
    assert loss_fn(b, b)[0].item() == 0


def test_lpips_regression_with_decoder():
    decoder = lambda z: torch.tanh(z.repeat_interleave(4, -1).repeat_interleave(4, -2)[:, :3])  # noqa: E731
    loss_fn = make_regression_loss("lpips", decoder=decoder, pretrained_backbone=False)
    a = torch.randn(2, 4, 16, 16, requires_grad=True)
    b = torch.randn(2, 4, 16, 16)
    loss, _ = loss_fn(a, b)
    loss.backward()
    assert loss.item() > 0 and a.grad.abs().sum() > 0
    assert loss_fn(b, b)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_regression_loss():
    with pytest.raises(ValueError, match="unknown regression loss"):
        make_regression_loss("ssim")


def test_fake_score_loss_snr_plus_one_is_the_v_loss_and_weights_high_noise():
    """``snr+1`` equals the v-prediction MSE of the same denoiser; at t = 999 its weight on an x0 error is
    ~1, about 200x the eps loss's, which is why it teaches the fake score the high-noise end Eq. 7 reads."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 4, generator=g)
    n = torch.randn(x.shape, generator=g)
    t = sample_timesteps(512, 0, 999, generator=g)
    off = lambda x_t, t, c: S.eps_to_x0(x_t, torch.zeros_like(x_t), t) * 0.9  # noqa: E731  some imperfect denoiser
    loss, _ = fake_score_loss(off, x, t, n, S, weighting="snr+1")
    x_t = S.add_noise(x, n, t)
    a, s = S.alpha_sigma(t, x)
    v_true = a * n - s * x
    v_hat = a * S.x0_to_eps(x_t, off(x_t, t, None), t) - s * off(x_t, t, None)
    assert math.isclose(loss.item(), (v_hat - v_true).pow(2).mean().item(), rel_tol=1e-4)
    hi = torch.full((512,), 999)
    biased = lambda x_t, t, c: x + 0.1  # noqa: E731  the same x0 error at every t
    eps_hi, _ = fake_score_loss(biased, x, hi, n, S)
    v_hi, _ = fake_score_loss(biased, x, hi, n, S, weighting="snr+1")
    assert v_hi > 100 * eps_hi
    with pytest.raises(ValueError, match="snr\\+1"):
        fake_score_loss(biased, x, hi, n, S, weighting="x0")


def test_gan_discriminator_loss_falls_on_separable_data():
    """DMD2's D loss on toy latents: fake around -1, real around +1, diffused to low t; a linear D learns them."""
    g = torch.Generator().manual_seed(0)
    fake = torch.randn(64, 4, 2, 2, generator=g) * 0.3 - 1
    real = torch.randn(64, 4, 2, 2, generator=g) * 0.3 + 1
    w = torch.zeros(16, requires_grad=True)
    disc = lambda x_t, t, cond: x_t.flatten(1) @ w  # noqa: E731
    opt = torch.optim.SGD([w], lr=0.5)
    losses = []
    for _ in range(60):
        t_f, t_r = (sample_timesteps(64, 0, 200, generator=g) for _ in range(2))
        n_f, n_r = (torch.randn(64, 4, 2, 2, generator=g) for _ in range(2))
        loss, stats = gan_discriminator_loss(disc, fake, real, t_f, t_r, n_f, n_r, S)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-6)  # D = 0: softplus(0) twice
    assert losses[-1] < 0.2 * losses[0], losses[-1]
    assert stats["gan_d_real_acc"] > 0.9 and stats["gan_d_fake_acc"] > 0.9


def test_gan_generator_gradient_is_the_softplus_formula_through_x():
    x, t, noise = _setup(shape=(4, 3, 2, 2))
    w = torch.randn(12, generator=torch.Generator().manual_seed(1))
    disc = lambda x_t, t, cond: x_t.flatten(1) @ w  # noqa: E731
    loss, stats = gan_generator_loss(disc, x, t, noise, S)
    loss.backward()
    a, _ = S.alpha_sigma(t, x)
    logits = S.add_noise(x.detach(), noise, t).flatten(1) @ w
    expected = (-torch.sigmoid(-logits))[:, None] * w[None] / 4 * a.flatten(1)  # d softplus(-D)/dx, mean over 4
    assert torch.allclose(x.grad.flatten(1), expected, atol=1e-6)
    assert stats["loss_gan_generator"] == pytest.approx(torch.nn.functional.softplus(-logits).mean().item())


def test_auto_fake_loss_weighting_is_the_teachers_own_loss():
    """``auto``: eps-MSE for an eps teacher, v-MSE for a v one; v-MSE on x0 is the (SNR + 1)-weighted x0 error, which
    equals mse(v_hat, v) computed from the denoiser's x0 (the check is independent of the weighting code)."""
    from types import SimpleNamespace

    from sd_dmd.core.losses import fake_score_loss
    from sd_dmd.core.schedule import NoiseSchedule
    from sd_dmd.core.step import CriticBatch, critic_loss

    sched = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])

    def fake(x_t, tt, cond):
        return 0.5 * x_t  # any denoiser

    for pred, want in (("epsilon", "eps"), ("v_prediction", "v")):
        model = SimpleNamespace(prediction_type=pred, fake_denoiser=lambda: fake, schedule=sched)
        got, _ = critic_loss(model, x, None, CriticBatch(t=t, noise=noise), "auto")
        ref, _ = fake_score_loss(fake, x, t, noise, sched, None, want)
        assert torch.allclose(got, ref)
    a, s = sched.alpha_sigma(t, x)
    x_t = sched.add_noise(x, noise, t)
    v = a * noise - s * x  # the v target: alpha eps - sigma x0
    eps_hat = (x_t - a * fake(x_t, t, None)) / s  # the denoiser's x0 as eps, then as v
    v_hat = a * eps_hat - s * fake(x_t, t, None)
    got, _ = fake_score_loss(fake, x, t, noise, sched, None, "v")
    assert torch.allclose(got, (v_hat - v).pow(2).mean(), rtol=1e-4)
