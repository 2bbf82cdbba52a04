from dataclasses import dataclass

import pytest
import yaml

from sd_dmd.config import ConfigError, field, from_dict, load_config, save_config


@dataclass
class Dmd:
    real_guidance_scale: float = field(3.0, "CFG scale of the real score")
    t_min: int = field(20, "lowest DM timestep")
    loss: str = field("l2", "loss name")


@dataclass
class Cfg:
    dmd: Dmd = field(default_factory=Dmd, help="dmd group")
    name: str = field("run", "run name")
    flag: bool = field(False, "a flag")
    prompts: list[str] = field(default_factory=list, help="files")


def test_defaults():
    cfg, _ = load_config(Cfg, [])
    assert cfg.dmd.real_guidance_scale == 3.0 and cfg.name == "run"


def test_precedence_defaults_yaml_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"dmd": {"real_guidance_scale": 1.75, "t_min": 5}, "name": "y"}))
    cfg, _ = load_config(Cfg, ["--config", str(p)])
    assert (cfg.dmd.real_guidance_scale, cfg.dmd.t_min, cfg.name, cfg.dmd.loss) == (1.75, 5, "y", "l2")
    cfg, _ = load_config(Cfg, ["--config", str(p), "--dmd.real_guidance_scale", "3", "--prompts", "a", "b"])
    assert cfg.dmd.real_guidance_scale == 3.0 and isinstance(cfg.dmd.real_guidance_scale, float)
    assert cfg.dmd.t_min == 5 and cfg.prompts == ["a", "b"]


def test_unknown_key_yaml_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"dmd": {"real_guidance": 2}}))
    with pytest.raises(ConfigError, match=r"dmd\.real_guidance"):
        load_config(Cfg, ["--config", str(p)])


def test_unknown_key_cli_names_key():
    with pytest.raises(ConfigError, match=r"dmd\.nope"):
        load_config(Cfg, ["--dmd.nope", "1"])


def test_unknown_group():
    with pytest.raises(ConfigError, match="zzz"):
        from_dict(Cfg, {"zzz": {"a": 1}})


@pytest.mark.parametrize("key,value", [("dmd.t_min", "abc"), ("flag", "3"), ("dmd.t_min", "1.5"), ("flag", "maybe")])
def test_wrong_type_names_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Cfg, [f"--{key}", value])


def test_wrong_type_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dmd:\n  real_guidance_scale: high\n")
    with pytest.raises(ConfigError, match=r"dmd\.real_guidance_scale"):
        load_config(Cfg, ["--config", str(p)])


def test_group_given_a_scalar():
    with pytest.raises(ConfigError, match="dmd"):
        from_dict(Cfg, {"dmd": 3})


def test_saved_config_round_trips(tmp_path):
    cfg, _ = load_config(Cfg, ["--dmd.t_min", "7", "--flag", "true"])
    save_config(cfg, tmp_path / "config.yaml")
    again, _ = load_config(Cfg, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, ["--config", str(tmp_path / "nope.yaml")])


def test_every_shipped_config_loads_and_says_what_it_trains():
    """Each configs/*.yaml parses and validates; the DMD2 ones switch on what their names promise."""
    from pathlib import Path

    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config

    root = Path(__file__).resolve().parents[1] / "configs"
    cfgs = {p.stem: load_config(Config, ["--config", str(p)])[0] for p in sorted(root.glob("*.yaml"))}
    assert {"digits", "digits_dmd", "digits_dmd2", "digits_dmd2_gan", "digits_dmd2_4step", "sd15_dmd", "sd15_dmd2",
            "sd15_dmd2_gan", "sd15_dmd2_4step", "sdxl_dmd2", "sdxl_dmd2_4step", "sd35_dmd2", "sd35_dmd2_4step",
            "tiny"} <= cfgs.keys()
    for name, c in cfgs.items():  # DMD2's SDXL runs and both SD3.5 runs have the GAN
        gan = "gan" in name or "4step" in name or "sdxl" in name or "sd35" in name or name == "digits"  # digits: the
        assert bool(c.gan.real_latents) == gan, name  # default's GAN
        if "sd35" in name:  # no published SD3.5 GAN weight: the gradient-ratio mode sets it; T5 never loaded
            assert c.gan.weight_mode == "adaptive" and c.gan.target_ratio > 0 and c.data.text_cache, name
        elif gan and not name.startswith("digits"):  # SD1.5/SDXL keep DMD2's published weights
            assert c.gan.weight_mode == "fixed" and c.gan.discriminator_weight == 1e-2, name
        assert len(c.dmd.generator_timesteps) == (4 if "4step" in name else 1), name
        if "dmd2" in name:  # sdxl_dmd2 and sd35_dmd2 keep DMD2's regression pre-training of its one-step SDXL, in
            one_step_regression = name in ("sdxl_dmd2", "sd35_dmd2")  # the same run
            assert (c.regression.loss == "none") != one_step_regression and c.dmd.fake_updates_per_step > 1, name
        if "sdxl" in name:
            assert c.model.resolution == 1024 and c.gan.generator_weight == 5e-3 and c.dmd.real_guidance_scale == 8
    assert cfgs["sdxl_dmd2"].dmd.generator_timesteps == [399]
    # DMD2's two SD1.5 stages in one run: stage 1's lr, then lr / 20 with the GAN on from the same step
    one_run, stage1 = cfgs["sd15_dmd2_gan"], cfgs["sd15_dmd2"]
    assert one_run.optim.lr_generator == stage1.optim.lr_generator and one_run.optim.lr_scheduler == "step_down"
    at = int(one_run.optim.step_down_at * one_run.train.max_steps)
    assert at == stage1.train.max_steps == one_run.gan.start_step and one_run.optim.step_down_factor == 1 / 20


def test_step_down_schedule_is_the_second_stage_in_one_run():
    """optim.lr_scheduler step_down: warm-up as constant_with_warmup, then x factor from step_down_at of the run."""
    import torch

    from sd_dmd.training.build import step_down_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = step_down_schedule(opt, warmup=10, at=1200, factor=1 / 3)
    lrs = []
    for _ in range(1300):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and abs(lrs[5] - 0.15) < 1e-9 and lrs[10] == lrs[1199] == 0.3 and abs(lrs[1200] - 0.1) < 1e-9
    from sd_dmd.training.config import Config

    with pytest.raises(ConfigError, match="optim.step_down_at"):
        load_config(Config, ["--optim.step_down_at", "1.5"])
