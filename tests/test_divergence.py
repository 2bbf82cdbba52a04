"""Issue 36, items 1 and 2: f-distill's divergence weighting of the DM gradient, and where the fake score's guidance
goes in the DM loss. Hand-computed cases, the weights' reach (never the head's or the fake score's gradient), and
today's loss reproduced bit for bit."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sd_dmd.config import ConfigError, load_config
from sd_dmd.core.losses import F_DIVERGENCE_WEIGHTS, dmd_loss, f_divergence_weights
from sd_dmd.core.schedule import NoiseSchedule
from sd_dmd.core.step import GeneratorBatch, critic_loss, generator_loss, CriticBatch
from sd_dmd.models.shared_unet import FAKE, GENERATOR
from sd_dmd.training.config import Config
from sd_dmd.training.divergence import DivergenceWeights

ROOT = Path(__file__).resolve().parents[1]

# r = exp(logit) clipped to [0.1, 20] -> [0.1, 1, 4, 20]; t -> bins [0, 1, 0, 1] of 2 over [0, 1000]; bin mean ratios
# [1, 2] -> r / bin = [0.1, 0.5, 4, 10]; then h(r) / mean_h with mean_h = 2. Each row worked out by hand.
LOGITS = torch.log(torch.tensor([0.05, 1.0, 4.0, 30.0]))
T = torch.tensor([100, 600, 100, 900])
HAND = {
    "reverse_kl": [0.5, 0.5, 0.5, 0.5],
    "forward_kl": [0.05, 0.25, 2.0, 5.0],
    "js": [0.1 / 1.1 / 2, 0.5 / 1.5 / 2, 0.4, 10 / 11 / 2],
    "softened_rkl": [1 / 1.1 / 2, 1 / 1.5 / 2, 0.1, 1 / 11 / 2],
    "squared_hellinger": [math.sqrt(0.1) / 2, math.sqrt(0.5) / 2, 1.0, math.sqrt(10) / 2],
    "jeffreys": [0.55, 0.75, 2.5, 5.5],
}


@pytest.mark.parametrize("divergence", sorted(F_DIVERGENCE_WEIGHTS))
def test_weights_hand_computed(divergence):
    h, (count, r_sum, h_sum, n) = f_divergence_weights(LOGITS, T, divergence, (0.1, 20.0),
                                                       torch.tensor([1.0, 2.0]), 2.0, (0, 1000))
    assert torch.allclose(h, torch.tensor(HAND[divergence]), rtol=1e-6), (divergence, h)
    assert count.tolist() == [2, 2] and torch.allclose(r_sum, torch.tensor([4.1, 21.0], dtype=torch.float64))
    assert n == 4 and math.isclose(h_sum.item(), 2 * sum(HAND[divergence]), rel_tol=1e-6)


def _state(divergence="js", ema=0.5):
    return SimpleNamespace(divergence=divergence, ratio_clip=[0.1, 20.0], ratio_bins=2, ratio_ema=ema, t_min=0,
                           t_max=1000)


def test_normalisation_learns_from_the_steps_before_and_split_batches_agree():
    whole, split = DivergenceWeights(_state()), DivergenceWeights(_state())
    h0, _ = whole.weights(LOGITS, T)
    assert torch.equal(h0, torch.ones(4))  # the first step only measures
    split.weights(LOGITS[:2], T[:2])
    split.weights(LOGITS[2:], T[2:])
    s_whole, s_split = whole.finish(), split.finish()
    assert whole.state_dict() == split.state_dict() and s_whole == s_split
    assert s_whole == pytest.approx({"f_weight_mean": 1.0, "f_weight_std": 0.0, "f_ratio_bin_min": 4.1 / 2,
                                     "f_ratio_bin_max": 10.5}, rel=1e-6)
    assert torch.allclose(whole.bin_ratio, torch.tensor([4.1 / 2, 21.0 / 2], dtype=torch.float64))
    h1, _ = whole.weights(LOGITS, T)
    r_n = torch.tensor([0.1, 1, 4, 20]) / torch.tensor([2.05, 10.5, 2.05, 10.5])
    r0 = torch.tensor([0.1, 1, 4, 20])  # step 0's h, before any bin statistics: js(r) = r / (1 + r)
    expect = F_DIVERGENCE_WEIGHTS["js"](r_n) / (r0 / (1 + r0)).mean()
    assert torch.allclose(h1, expect.float(), rtol=1e-5), (h1, expect)
    restored = DivergenceWeights(_state())
    restored.load_state_dict(whole.state_dict())
    assert restored.state_dict() == whole.state_dict()


def test_sample_weight_of_ones_is_todays_loss_bit_for_bit():
    sched = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g).requires_grad_()
    noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([100, 500, 900])
    real = lambda x_t, t, c: x_t * 0.5  # noqa: E731 - two fixed denoisers
    fake = lambda x_t, t, c: x_t * 0.4 + 0.1  # noqa: E731
    (gx,) = torch.autograd.grad(dmd_loss(x, real, fake, t, noise, sched)[0], x)
    loss1, _ = dmd_loss(x, real, fake, t, noise, sched, sample_weight=torch.ones(3))
    (g1,) = torch.autograd.grad(loss1, x)
    assert torch.equal(g1, gx)
    w = torch.tensor([0.5, 2.0, 0.0])
    (gw,) = torch.autograd.grad(dmd_loss(x, real, fake, t, noise, sched, sample_weight=w)[0], x)
    # each sample's gradient, weighted (to float32's cancellation in x - (x - grad): 1e-3 of the largest entry)
    assert (gw - gx * w.view(3, 1, 1, 1)).abs().max() <= 1e-3 * gx.abs().max()
    assert (gw[2] == 0).all() and (gx[2] != 0).any()


@pytest.fixture
def gan_model(tiny_model):
    tiny_model.add_gan_head(16)
    g = torch.Generator().manual_seed(1)
    for name in (GENERATOR, FAKE):
        for p in tiny_model.adapter_parameters(name):
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return tiny_model


def _batch():
    g = torch.Generator().manual_seed(2)
    return GeneratorBatch(prompts=["a red cube", "two cats on a sofa", "a blue sphere"],
                          z=torch.randn(3, 4, 8, 8, generator=g), t=torch.tensor([100, 500, 900]),
                          noise=torch.randn(3, 4, 8, 8, generator=g))


def test_weights_reach_only_the_generator(gan_model):
    m = gan_model
    div = DivergenceWeights(_state("forward_kl"))
    bins = torch.tensor([1.5, 0.5], dtype=torch.float64)
    div.seen, div.bin_ratio, div.mean_h = True, bins.clone(), 1.7
    for p in m.unet.parameters():
        p.grad = None
    loss, stats, _, _ = generator_loss(m, _batch(), divergence=div)
    loss.backward()
    s = div.finish()
    assert s["f_weight_std"] > 0 and s["f_ratio_bin_min"] <= s["f_ratio_bin_max"]
    head = list(m.gan_head.parameters())
    assert all(p.grad is None for p in head + m.adapter_parameters(FAKE))
    g_weighted = [p.grad.clone() for p in m.adapter_parameters(GENERATOR)]
    # the same gradient from dmd_loss with the weights computed by hand from the head's logits
    for p in m.unet.parameters():
        p.grad = None
    b = _batch()
    cond = m.encode_prompts(b.prompts)
    x = m.generate(b.z, cond)
    with torch.no_grad():
        logits = m.discriminator("fake")(m.schedule.add_noise(x.detach(), b.noise, b.t), b.t, cond)
    h, _ = f_divergence_weights(logits, b.t, "forward_kl", (0.1, 20.0), bins, 1.7, (0, 1000))
    real, fake = m.dm_denoisers()
    dmd_loss(x, real, fake, b.t, b.noise, m.schedule, cond, sample_weight=h)[0].backward()
    for a, e in zip(g_weighted, (p.grad for p in m.adapter_parameters(GENERATOR))):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("one_call, w, conditioning", [(True, -0.5, "text"), (False, -0.5, "text"), (True, 0.7, "text"),
                                                       (False, 0.0, "none"), (True, 0.0, "none")])
def test_fake_guidance_placement(tiny_model, one_call, w, conditioning):
    m = tiny_model
    g = torch.Generator().manual_seed(3)
    for p in m.adapter_parameters(FAKE):
        p.data = torch.randn(p.shape, generator=g) * 0.05
    b = _batch()
    cond = m.encode_prompts(b.prompts)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        f_c = m.fake_denoiser()(x_t, b.t, cond)
        f_u = m.fake_denoiser()(x_t, b.t, m.uncond_embedding.expand(3, *cond.shape[1:]))
        real_ref = m.real_denoiser()(x_t, b.t, cond)
    m.one_call_roles, m.fake_guidance, m.fake_conditioning = one_call, w, conditioning
    real, fake = m.dm_denoisers()
    out_real, out_fake = real(x_t, b.t, cond), fake(x_t, b.t, cond)
    expect = f_u if conditioning == "none" else f_c + w * (f_c - f_u)  # hand-written: cond + w (cond - uncond)
    assert torch.allclose(out_fake, expect, rtol=1e-4, atol=1e-5)  # rows batched otherwise: float32 order
    assert torch.allclose(out_real, real_ref, rtol=1e-4, atol=1e-5)  # the teacher's score is untouched
    # the fake score's own training is unchanged
    batch = CriticBatch(t=b.t, noise=torch.randn(3, 4, 8, 8, generator=g))
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    loss_placed, _ = critic_loss(m, x0, cond, batch)
    m.fake_guidance, m.fake_conditioning = 0.0, "text"
    assert torch.equal(loss_placed, critic_loss(m, x0, cond, batch)[0])


def _cfg(*extra):
    return load_config(Config, ["--config", str(ROOT / "configs" / "tiny.yaml"), *extra])[0]


def test_divergence_without_the_gan_head_is_a_config_error():
    with pytest.raises(ConfigError, match="dmd.divergence: js reads the density ratio from the GAN head"):
        _cfg("--dmd.divergence", "js")
    with pytest.raises(ConfigError, match="dmd.fake_guidance: needs dmd.fake_conditioning text"):
        _cfg("--dmd.fake_guidance", "-0.5", "--dmd.fake_conditioning", "none")
    with pytest.raises(ConfigError, match="dmd.ratio_clip"):
        _cfg("--dmd.divergence", "js", "--gan.real_latents", "x", "--dmd.ratio_clip", "2", "1")
    assert _cfg("--dmd.divergence", "js", "--gan.real_latents", "x").dmd.divergence == "js"


def test_curves_draw_the_weights_spread_when_logged(tmp_path):
    from sd_dmd.outputs.report import _panels, plot_curves

    history = [{"step": s, "loss_dm": 1.0, "f_weight_mean": 1.0, "f_weight_std": 0.1 * s, "f_ratio_bin_min": 0.5,
                "f_ratio_bin_max": 2.0 + s} for s in range(1, 6)]
    titles = [name for name, _, _ in _panels(history)]
    assert any(t.startswith("f-divergence weights") for t in titles) and any(t.startswith("density ratio") for t in
                                                                             titles)
    assert not any(t.startswith("f-divergence") for t, _, _ in _panels([{k: v for k, v in h.items()
                                                                         if not k.startswith("f_")} for h in history]))
    assert plot_curves(history, tmp_path / "curves.png").is_file()
