"""Issue 27: the GAN/DM gradient ratio on G's sample, the adaptive GAN weight, the GAN term's gradient on x alone,
the teacher-feature discriminator and approximate R1."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sd_dmd.config import ConfigError, load_config
from sd_dmd.core.losses import dmd_loss, gan_discriminator_loss, gan_generator_loss
from sd_dmd.core.schedule import NoiseSchedule
from sd_dmd.core.step import GeneratorBatch, generator_loss
from sd_dmd.models.shared_unet import FAKE, GENERATOR
from sd_dmd.training.config import Config, GANConfig
from sd_dmd.training.gan_weight import GANWeight
from sd_dmd.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
S = NoiseSchedule.scaled_linear()


class StubModel:
    """G(z) = theta * z; real x0 = 0.5 x_t; fake x0 = 0.8 x_t; D(x_t) = sum(c * x_t) (one logit per sample)."""

    conditioning_timestep = 999

    def __init__(self, theta=1.0, c=None):
        self.theta = torch.nn.Parameter(torch.tensor(float(theta)))
        self.c = c if c is not None else torch.tensor([[1.0, -2.0], [0.5, 3.0]])
        self.schedule = S

    def encode_prompts(self, prompts):
        return None

    def generate(self, z, cond, t=None):
        return self.theta * z

    def real_denoiser(self):
        return lambda x_t, t, cond: 0.5 * x_t

    def dm_denoisers(self):
        return self.real_denoiser(), self.fake_denoiser()

    def fake_denoiser(self):
        return lambda x_t, t, cond: 0.8 * x_t

    def discriminator(self, features="fake"):
        return lambda x_t, t, cond, features_grad=True: (self.c * x_t).flatten(1).sum(1)


def stub_batch(seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    z, noise, gan_noise = (torch.randn(n, 1, 2, 2, generator=g) for _ in range(3))
    t, gan_t = torch.randint(20, 980, (2, n), generator=g) if n > 1 else (torch.tensor([500]), torch.tensor([300]))
    return GeneratorBatch(["p"] * n, z, t, noise, gan_t=gan_t, gan_noise=gan_noise)


def test_ratio_is_right_on_a_hand_computed_case():
    m, b = StubModel(), stub_batch()
    dm_w, gan_w = 2.0, 0.3
    _, stats, x, _ = generator_loss(m, b, dm_weight=dm_w, gan_weight=gan_w)
    # by hand: x_t = a x + s n; DM: mu_real - mu_fake = -0.3 x_t; grad = (mu_fake - mu_real) / mean|x - mu_real|,
    # d loss_dm / dx = grad / numel. GAN: logit = sum(c x_t'), d softplus(-logit) / dx = -sigmoid(-logit) a' c
    a, s = (v.item() for v in S.alpha_sigma(torch.tensor([500]), x))
    x_t = a * x + s * b.noise
    grad = (0.3 * x_t) / (x - 0.5 * x_t).abs().mean()
    g_dm = dm_w * grad / x.numel()
    a2, s2 = (v.item() for v in S.alpha_sigma(torch.tensor([300]), x))
    logit = (m.c * (a2 * x + s2 * b.gan_noise)).sum()
    g_gan = gan_w * -torch.sigmoid(-logit) * a2 * m.c
    want = (g_gan.norm() / g_dm.norm()).item()
    assert stats["gan_dm_grad_ratio"] == pytest.approx(want, rel=1e-5)
    assert stats["gan_weight_generator"] == gan_w


def test_generator_gradient_is_the_plain_losses_gradient():
    """The GAN term enters as a linear term in x: G's gradient equals backpropagating dm + w * gan as losses."""
    m, b = StubModel(theta=1.3), stub_batch(1)
    loss, _, _, _ = generator_loss(m, b, dm_weight=1.0, gan_weight=0.7)
    (got,) = torch.autograd.grad(loss, m.theta)
    x = m.generate(b.z, None)
    ref = dmd_loss(x, m.real_denoiser(), m.fake_denoiser(), b.t, b.noise, S)[0] + \
        0.7 * gan_generator_loss(m.discriminator(), x, b.gan_t, b.gan_noise, S)[0]
    (want,) = torch.autograd.grad(ref, m.theta)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)


def test_adaptive_weight_reaches_the_target_on_a_toy():
    """A toy generator trained by SGD on dm + w * gan, w set by GANWeight: the logged ratio reaches the target,
    though the ratio at weight 1 moves as G trains and the micro-batches differ."""
    target = 0.25
    gw = GANWeight(GANConfig(weight_mode="adaptive", target_ratio=target, generator_weight=1e-3,
                             discriminator_weight=1e-2, ratio_ema_decay=0.9))
    m = StubModel(theta=2.0)
    opt = torch.optim.SGD([m.theta], lr=0.05)
    ratios, raws = [], []
    for i in range(300):
        loss, stats, _, _ = generator_loss(m, stub_batch(i, n=16), gan_weight=gw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(stats["gan_dm_grad_ratio"])
        raws.append(stats["gan_dm_grad_ratio"] / stats["gan_weight_generator"])
    assert max(raws) / min(raws) > 2  # the quantity to follow does move
    assert sum(ratios[-100:]) / 100 == pytest.approx(target, rel=0.1)
    assert gw.discriminator_weight() == 1e-2  # the discriminator's weight stays as configured ...
    gw.cfg.adaptive_discriminator = True  # ... or follows the generator's at DMD2's 10x
    assert gw.discriminator_weight() == pytest.approx(10 * gw.generator_weight())


def test_fixed_mode_keeps_the_configured_weights():
    gw = GANWeight(GANConfig(generator_weight=0.064, discriminator_weight=0.64))
    assert gw.for_generator() == 0.064 and gw(123.0, 1.0) == 0.064 and gw.discriminator_weight() == 0.64


@pytest.mark.parametrize("args,key", [
    (["--gan.weight_mode", "adaptive"], "gan.target_ratio"),
    (["--gan.weight_mode", "sometimes"], "gan.weight_mode"),
    (["--gan.weight_mode", "adaptive", "--gan.target_ratio", "0.1", "--gan.generator_weight", "0"],
     "gan.generator_weight"),
    (["--gan.weight_mode", "adaptive", "--gan.target_ratio", "0.1", "--dmd.dm_weight", "0"], "dmd.dm_weight"),
    (["--gan.ratio_ema_decay", "1"], "gan.ratio_ema_decay"),
    (["--gan.r1_weight", "-1"], "gan.r1_weight"),
    (["--gan.features", "vae"], "gan.features"),
])
def test_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Config, ["--data.prompts", "p.txt", "--regression.loss", "none", *args])


def test_r1_is_mse_of_real_logits_against_perturbed_real_logits():
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    seen = []

    def disc(x_t, t, cond, features_grad=True):
        seen.append(features_grad)
        return (c * x_t).flatten(1).sum(1)

    g = torch.Generator().manual_seed(0)
    fake, real, nf, nr, r1 = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(5))
    t = torch.tensor([100, 500, 900])
    base, _ = gan_discriminator_loss(disc, fake, real, t, t, nf, nr, S)
    loss, stats = gan_discriminator_loss(disc, fake, real, t, t, nf, nr, S, r1_weight=2.0, r1_noise=0.1 * r1)
    lr = (c * S.add_noise(real, nr, t)).flatten(1).sum(1)
    la = (c * S.add_noise(real + 0.1 * r1, nr, t)).flatten(1).sum(1)
    assert stats["loss_gan_r1"] == pytest.approx(F.mse_loss(lr, la).item(), rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 2.0 * stats["loss_gan_r1"], rel=1e-6)
    assert seen[-1] is False  # the perturbed side's features without gradient (FastGen)


# ----- on the tiny pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def trainer(setup, real_latents, *extra, ckpt=False) -> Trainer:
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.loss", "none", "--data.prompts", setup["prompts"], "--output_dir",
            str(setup["dir"] / "unused"), "--optim.max_grad_norm", "0", "--optim.lr_generator", "0",
            "--optim.lr_fake", "0", "--gan.real_latents", real_latents, "--gan.generator_weight", "0.5",
            "--train.gradient_checkpointing", str(ckpt).lower(), "--train.batch_size", "2", *extra]
    torch.manual_seed(0)
    t = Trainer(load_config(Config, argv)[0], Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in (GENERATOR, FAKE):
            for _, p in sorted(t.model.adapter_named_parameters(name).items()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in t.model.gan_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return t


def _old_loss(model, batch, **kw):
    """The generator loss before issue 27: the GAN term backpropagated as a loss through D's parameters."""
    from sd_dmd.core.step import backward_simulate

    cond = model.encode_prompts(batch.prompts)
    x = backward_simulate(model, batch.z, cond, [model.conditioning_timestep], 0, None)
    loss, _ = dmd_loss(x, model.real_denoiser(), model.fake_denoiser(), batch.t, batch.noise, model.schedule, cond)
    loss_gan, _ = gan_generator_loss(model.discriminator(), x, batch.gan_t, batch.gan_noise, model.schedule, cond)
    return loss + kw["gan_weight"] * loss_gan, {}, x.detach(), cond


@pytest.mark.parametrize("ckpt", [False, True])
def test_generator_turn_leaves_no_critic_gradients_and_the_same_generator_gradient(setup, real_latents, ckpt,
                                                                                   monkeypatch):
    from sd_dmd.training import turns

    t = trainer(setup, real_latents, ckpt=ckpt)
    applied = []
    inner = t.opt_g.step
    t.opt_g.step = lambda *a, **k: (applied.append([p.grad.detach().clone() for p in t.gen_params]), inner(*a, **k))
    _, ok, _ = turns.generator_turn(t)
    assert ok
    assert all(p.grad is None for p in t.fake_params + t.head_params)  # the GAN term built none
    with monkeypatch.context() as mp:
        mp.setattr(turns, "generator_loss", _old_loss)
        turns.generator_turn(t)  # (this one clears what it built on the critic before applying)
    new, old = (torch.cat([g.flatten() for g in grads]) for grads in applied)
    assert old.norm() > 0
    assert ((new - old).norm() / old.norm()).item() <= 1e-6


def test_teacher_features_ignore_the_fake_lora(setup, real_latents):
    t = trainer(setup, real_latents, "--gan.features", "teacher")
    m = t.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *t.latent_shape, generator=g)
    tt, cond = torch.tensor([10, 700]), m.encode_prompts(["a red cube", "a blue sphere"])
    with torch.no_grad():
        teacher0, fake0 = m.discriminator("teacher")(x, tt, cond), m.discriminator("fake")(x, tt, cond)
        for p in m.adapter_parameters(FAKE):
            p.mul_(2.0)
        teacher1, fake1 = m.discriminator("teacher")(x, tt, cond), m.discriminator("fake")(x, tt, cond)
    assert torch.equal(teacher0, teacher1) and not torch.allclose(fake0, fake1)
    stats, applied = t.train_step()  # both turns run on the teacher's features; the head alone learns from D
    assert applied and "gan_dm_grad_ratio" in stats and "loss_gan_discriminator" in stats


def test_r1_and_adaptive_run_in_a_step(setup, real_latents):
    t = trainer(setup, real_latents, "--gan.r1_weight", "10", "--gan.weight_mode", "adaptive",
                "--gan.target_ratio", "0.1")
    stats, applied = t.train_step()
    assert applied and stats["loss_gan_r1"] >= 0
    assert stats["gan_dm_grad_ratio"] == pytest.approx(0.1, rel=1e-4)  # first step: EMA = this measurement
    assert t.gan_weight.state_dict()["ema"] > 0


def test_adaptive_ema_survives_a_resume(setup, real_latents, tmp_path):
    """The smoothed ratio is part of the checkpoint: a resumed adaptive run continues from it, not from scratch."""
    import json

    from sd_dmd.training.loop import train

    def cfg(steps):
        argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path",
                setup["pipe"], "--regression.loss", "none", "--data.prompts", setup["prompts"], "--output_dir",
                str(tmp_path / "run"), "--gan.real_latents", real_latents, "--gan.weight_mode", "adaptive",
                "--gan.target_ratio", "0.2", "--train.max_steps", str(steps), "--checkpointing.every", "2",
                "--logging.every", "1"]
        return load_config(Config, argv)[0]

    t = train(cfg(2))
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["gan_weight"]["ema"] == pytest.approx(t.gan_weight.ema) and t.gan_weight.ema > 0
    t2 = train(cfg(3), resume=True)
    d = t2.cfg.gan.ratio_ema_decay
    last = t2.history[-1]["gan_dm_grad_ratio"] / t2.history[-1]["gan_weight_generator"]  # step 3's measurement
    assert t2.gan_weight.ema == pytest.approx(d * t.gan_weight.ema + (1 - d) * last, rel=1e-4)
