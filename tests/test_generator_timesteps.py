"""Few-step timesteps that diffusers' LCMScheduler samples differently from the trainer are refused (issue 25, item 5).

The trainer's few-step sampler (``DMDModel.sample``, backward simulation) takes the generator's x0 at each timestep;
LCMScheduler, which the model card, ``sd_dmd_sampling.json`` and ``sd_dmd.sample`` hand the LoRA to, returns
c_skip * x_t + c_out * x0. The two agree to within 1e-4 per unit of latent from t = 7 up; below, training is refused.
"""
from types import SimpleNamespace

import pytest
import torch

from sd_dmd.config import ConfigError
from sd_dmd.core.schedule import NoiseSchedule
from sd_dmd.training.config import Config

ALLOWED = [[999], [999, 749, 499, 249], [999, 7]]
REFUSED = [[999, 2], [999, 499, 0], [999, 6], [3]]
TOL = 1e-4  # the tolerance the refusal promises: |LCM's sample - trainer's x0| per unit of latent


def _config(ts) -> Config:
    c = Config()
    c.data.prompts = ["prompts.txt"]
    c.regression.loss = "none"
    c.dmd.generator_timesteps = list(ts)
    return c


def _refused(ts) -> bool:
    try:
        _config(ts).validate()
    except ConfigError as e:
        assert "dmd.generator_timesteps" in str(e), e
        return True
    return False


@pytest.mark.parametrize("ts", REFUSED)
def test_refusal_names_the_key_the_timestep_and_the_smallest_allowed_one(ts):
    with pytest.raises(ConfigError) as e:
        _config(ts).validate()
    msg = str(e.value)
    assert msg.startswith("dmd.generator_timesteps"), msg
    assert f"[{min(ts)}]" in msg, msg  # the offending timestep
    assert "smallest allowed timestep is 7" in msg, msg


@pytest.mark.parametrize("ts", ALLOWED)
def test_default_and_dmd2_timesteps_pass(ts):
    c = _config(ts)
    c.validate()
    assert c.dmd.generator_timesteps == ts and c.dmd.conditioning_timestep == ts[0]


def test_one_step_conditioning_timestep_is_checked_too():
    c = Config()
    c.data.prompts = ["prompts.txt"]
    c.regression.loss = "none"
    c.dmd.conditioning_timestep = 3
    with pytest.raises(ConfigError, match=r"dmd\.generator_timesteps.*dmd\.conditioning_timestep.*smallest allowed "
                                          r"timestep is 7"):
        c.validate()


def test_smallest_allowed_timestep_follows_lcms_scalings():
    from diffusers import LCMScheduler

    from sd_dmd.core.schedule import lcm_x0_deviation, smallest_lcm_timestep

    s = LCMScheduler()
    for t in (0, 1, 2, 6, 7, 249, 999):
        c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(t)
        assert lcm_x0_deviation(t) == pytest.approx(c_skip + abs(1 - c_out), rel=1e-12, abs=1e-15)
    assert smallest_lcm_timestep() == 7
    assert lcm_x0_deviation(7) <= TOL < lcm_x0_deviation(6)


def _lcm_vs_trainer(ts, x0_of, x_t0, seed=0) -> float:
    """Max |denoised - x0| over a full LCMScheduler run at ``ts`` (SD's noise schedule), where at each step the
    "UNet" predicts the epsilon whose trainer x0 = (x_t - sigma_t eps) / alpha_t is ``x0_of(x_t, t)``."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(timesteps=ts)
    sched_ns = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(seed)
    x, worst = x_t0.double(), 0.0
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        target = x0_of(x, int(t))
        eps = sched_ns.x0_to_eps(x, target, tt)
        x0 = sched_ns.eps_to_x0(x, eps, tt)  # the trainer's x0 (DMDModel.generate)
        out = sched.step(eps, t, x, generator=g)
        worst = max(worst, (out.denoised - x0).abs().max().item())
        x = out.prev_sample
    return worst


@pytest.mark.parametrize("ts", ALLOWED + REFUSED)
def test_validation_refuses_exactly_where_lcmscheduler_leaves_the_trainers_x0(ts):
    """The worst case for unit-scale latents, x_t = -x0 = +-1, at each timestep of the list: diffusers' own sample
    is within 1e-4 of the trainer's x0 for every list validation accepts, and further for every one it refuses.
    (LCM's ``denoised`` at t depends on t, x_t and the UNet's output only, so one-step runs at each t cover a
    few-step run's steps.)"""
    sign = torch.randint(0, 2, (2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    diff = max(_lcm_vs_trainer([t], lambda x_t, t: -sign, sign) for t in ts)
    if _refused(ts):
        assert diff > TOL, (ts, diff)
    else:
        assert diff <= TOL, (ts, diff)


@pytest.mark.parametrize("ts,refused", [([999, 749, 499, 249], False), ([999, 2], True)])
def test_sd_like_latents_sample_as_in_the_trainer_only_where_validation_allows(ts, refused):
    """Unit-variance latents (SD's scaled latents) through a full 2- or 4-step LCMScheduler run with re-noising."""
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    diff = _lcm_vs_trainer(ts, lambda x_t, t: x0, torch.randn(2, 4, 16, 16, dtype=torch.float64))
    assert _refused(ts) == refused
    assert (diff > TOL) == refused, (ts, diff)


def test_call_kwargs_refuses_such_timesteps_for_lcmscheduler():
    from diffusers import LCMScheduler

    from sd_dmd.outputs.sample import call_kwargs

    pipe = SimpleNamespace(scheduler=LCMScheduler())
    with pytest.raises(ConfigError, match=r"timesteps: .*\[2\].*smallest allowed timestep is 7"):
        call_kwargs(pipe, [999, 2])
    assert call_kwargs(pipe, [999, 7])["timesteps"] == [999, 7]


def test_sample_cli_refuses_such_timesteps(tiny_pipe_dir, tmp_path, capsys):
    from sd_dmd.outputs import sample

    with pytest.raises(SystemExit) as e:
        sample.main(["--model", tiny_pipe_dir, "--prompt", "a cat", "--timesteps", "999", "2", "--dtype", "fp32",
                     "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --timesteps: timestep [2]" in last and "smallest allowed timestep is 7" in last, last
    assert not (tmp_path / "x.png").exists()


def test_evaluation_refuses_such_timesteps_too():
    from sd_dmd.config import ConfigError
    from sd_dmd.evaluation.evaluate import EvalConfig

    cfg = EvalConfig(scheduler="lcm", timesteps=[999, 2], clip_pretrained="x")
    with pytest.raises(ConfigError, match=r"timesteps: timestep \[2\].*smallest allowed timestep is 7"):
        cfg.validate()
