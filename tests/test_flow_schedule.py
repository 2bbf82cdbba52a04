"""The flow-matching schedule (issue 38): SD3's training sigmas behind the integer indices, x0 from the velocity, and
the losses unchanged on it. The losses take denoiser callables and read the schedule only through ``add_noise``,
``alpha_sigma`` and ``to_x0``, so the same code, on the same analytic Gaussian case, gives the DMD gradient that
moves the generator's samples towards the real distribution under either schedule."""
import pytest
import torch

from sd_dmd.core.losses import dmd_loss, fake_score_loss, native_weighting
from sd_dmd.core.schedule import FlowMatchSchedule, NoiseSchedule, schedule_of


def _flow(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def test_indices_are_the_teachers_shifted_training_sigmas():
    sch = _flow()
    s = schedule_of(sch)
    assert isinstance(s, FlowMatchSchedule) and s.num_train_timesteps == 1000
    assert torch.equal(s.sigmas, sch.sigmas.flip(0))  # ascending: index 0 least noise
    assert s.sigmas[999] == 1.0 and torch.all(s.sigmas[1:] > s.sigmas[:-1])
    u = (torch.arange(1000, dtype=torch.float64) + 1) / 1000  # shift s / (1 + (shift - 1) s), SD3's shift 3
    assert torch.allclose(s.sigmas.double(), 3 * u / (1 + 2 * u), atol=1e-6)
    t = torch.tensor([0, 20, 500, 999])
    assert torch.equal(s.model_timestep(t), sch.timesteps.flip(0)[t])  # what SD3's transformer is given
    sch.set_timesteps(4)  # a used scheduler still gives the training sigmas
    assert torch.equal(schedule_of(sch).sigmas, s.sigmas)
    assert type(schedule_of(__import__("diffusers").DDPMScheduler())) is NoiseSchedule
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        schedule_of(__import__("diffusers").FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_noising_and_x0_from_the_velocity():
    s = schedule_of(_flow())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    sig = s.sigmas[t].view(-1, 1, 1, 1)
    x_t = s.add_noise(x0, eps, t)
    assert torch.allclose(x_t, (1 - sig) * x0 + sig * eps, atol=1e-6)
    assert torch.allclose(s.to_x0(x_t, eps - x0, t, "flow"), x0, atol=1e-5)  # v = eps - x0
    assert torch.allclose(s.x0_to_eps(x_t[:3], x0[:3], t[:3]), eps[:3], atol=1e-4)
    assert torch.equal(s.add_noise(x0, eps, t)[3], eps[3])  # t = 999: pure noise, the generator's input
    with pytest.raises(ValueError, match="velocity"):
        s.to_x0(x_t, eps, t, "epsilon")


def test_flow_fake_loss_is_the_velocity_mse():
    s = schedule_of(_flow())
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 400, 990])
    v_model = lambda x_t, t_, c: 0.7 * x_t  # noqa: E731 -- any velocity predictor
    fake = lambda x_t, t_, c: s.to_x0(x_t, v_model(x_t, t_, c), t_, "flow")  # noqa: E731
    loss, _ = fake_score_loss(fake, x, t, noise, s, None, native_weighting("flow"))
    x_t = s.add_noise(x, noise, t)
    want = ((v_model(x_t, t, None) - (noise - x)) ** 2).mean()
    assert native_weighting("flow") == "flow" and abs(loss.item() - want.item()) <= 1e-5 * want.item()
    eps_loss, _ = fake_score_loss(fake, x, t, noise, s, None, "eps")  # the check can fail: another weighting
    assert abs(eps_loss.item() - want.item()) > 1e-3


def _gaussian_denoiser(schedule, mu: float, var: float):
    """The exact x0 denoiser of N(mu, var I) data under ``schedule``: E[x0 | x_t], x_t = a x0 + s eps."""
    def denoise(x_t, t, cond=None):
        a, s = schedule.alpha_sigma(t, x_t)
        return mu + a * var / (a * a * var + s * s) * (x_t - a * mu)

    return denoise


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_dmd_gradient_moves_samples_towards_the_real_distribution_under_either_schedule(kind):
    """Real data N(1, 0.25), the generator's N(-1, 0.25): the DM gradient (whose negative the generator follows) is,
    per sample, one constant times (mu_fake - mu_real) at every element, and zero when real and fake agree."""
    s = schedule_of(_flow()) if kind == "flow" else NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 2, 3, 3, generator=g) * 0.5 - 1.0).requires_grad_(True)
    noise, t = torch.randn(4, 2, 3, 3, generator=g), torch.tensor([50, 300, 600, 900])
    real, fake = _gaussian_denoiser(s, 1.0, 0.25), _gaussian_denoiser(s, -1.0, 0.25)
    loss, _ = dmd_loss(x, real, fake, t, noise, s)
    loss.backward()
    step = -x.grad  # what gradient descent on the generator's sample does
    assert torch.all(step > 0)  # every element moves from the fake mean -1 towards the real mean +1
    per = step.flatten(1)
    assert torch.allclose(per, per[:, :1].expand_as(per), rtol=1e-4)  # the same push at every element
    x.grad = None
    same, _ = dmd_loss(x, real, real, t, noise, s)
    same.backward()
    assert x.grad.abs().max() == 0
