"""Loading the model, the LPIPS loss and the package print no warnings (issue 14)."""
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from sd_dmd._warnings import DropMessage

ROOT = Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _quiet(fn, loggers=("diffusers", "transformers", "peft")):
    """Run ``fn``; return (its warnings, the WARNING+ log messages of ``loggers``)."""
    handler = _Records()
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)
    return [str(w.message) for w in caught], [m for m in handler.messages if "Loading" not in m]


def test_model_loads_without_warnings(tiny_pipe_dir):
    from sd_dmd.model import DMDModel, LoraSpec

    for dtype in (torch.float32, torch.bfloat16):  # bf16: loaded with dtype=, not cast with .to()
        caught, logged = _quiet(lambda: DMDModel.from_pretrained(
            tiny_pipe_dir, weight_dtype=dtype, generator_lora=LoraSpec(rank=4, alpha=4.0),
            fake_lora=LoraSpec(rank=4, alpha=4.0)))
        assert caught == [] and logged == [], (caught, logged)


def test_lpips_builds_without_warnings():
    from sd_dmd.losses import make_regression_loss

    caught, _ = _quiet(lambda: make_regression_loss("lpips", pretrained_backbone=False))
    assert caught == [], caught


def test_diffusers_empty_fp32_list_filtered_but_other_messages_kept(tiny_pipe_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    _, logged = _quiet(lambda: unet.to(dtype=torch.float16))  # diffusers warns on any .to(dtype)
    assert not any("float32" in m for m in logged), logged
    drop = DropMessage("There are modules in ", "should be kept in float32: [].")
    record = lambda msg: logging.LogRecord("diffusers", logging.WARNING, __file__, 1, msg, None, None)
    assert not drop.filter(record("There are modules in X that should be kept in float32: []. Casting..."))
    assert drop.filter(record("There are modules in X that should be kept in float32: ['norm']. Casting..."))


def test_import_prints_nothing():
    # bitsandbytes (imported by peft) logs a `kernels` fallback at import on AVX512-bf16 CPUs
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", "import sd_dmd, peft, bitsandbytes, diffusers"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr.strip() == "" and out.stdout == "", out.stderr


def test_four_step_lcm_timesteps_sample_without_the_off_grid_warning():
    """call_kwargs sets LCMScheduler's original_inference_steps so that DMD2's [999, 749, 499, 249] lie on its grid:
    the default grid (50 steps) warns that 749 and 249 leave it; the timesteps run are the same either way."""
    from types import SimpleNamespace

    from diffusers import LCMScheduler

    from sd_dmd.sample import call_kwargs, lcm_original_steps

    ts = [999, 749, 499, 249]
    assert lcm_original_steps(ts) == 4 and lcm_original_steps([999]) == 1 and lcm_original_steps([800]) is None
    plain = LCMScheduler()
    _, logged = _quiet(lambda: plain.set_timesteps(timesteps=ts))
    assert any("749" in m for m in logged), logged  # the warning this test guards against exists
    pipe = SimpleNamespace(scheduler=LCMScheduler())
    kw = call_kwargs(pipe, ts)
    _, logged = _quiet(lambda: pipe.scheduler.set_timesteps(timesteps=kw["timesteps"]))
    assert logged == []
    assert pipe.scheduler.timesteps.tolist() == plain.timesteps.tolist() == ts
