"""Loading the model, the LPIPS loss and the package print no warnings (issue 14)."""
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from net_guard import SOURCE

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
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec

    for dtype in (torch.float32, torch.bfloat16):  # bf16: loaded with dtype=, not cast with .to()
        caught, logged = _quiet(lambda: DMDModel.from_pretrained(
            tiny_pipe_dir, weight_dtype=dtype, generator_lora=LoraSpec(rank=4, alpha=4.0),
            fake_lora=LoraSpec(rank=4, alpha=4.0)))
        assert caught == [] and logged == [], (caught, logged)


def test_lpips_builds_without_warnings():
    from sd_dmd.core.losses import make_regression_loss

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


# Run in a child process: a socket guard records every connection and name lookup and refuses it; then the imports
# and each command's --help run in-process, each command's stdout captured. HF_HUB_OFFLINE is *not* set, so a
# dependency that would reach the Hub (bitsandbytes >= 0.50 fetching `kernels` at import, issue 25) is caught here.
_GUARDED = SOURCE + r"""
import contextlib, io, json, runpy, sys
import sd_dmd, peft, bitsandbytes, diffusers, transformers
import bitsandbytes.optim  # what adamw8bit uses
helps = {}
for kind, target in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [target, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:  # alter_sys: the module is sys.modules["__main__"] while it runs, as with python -m
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    helps[target] = [code, out.getvalue()[:40]]
print(json.dumps({"tried": tried, "helps": helps}))
"""

COMMANDS = [("path", "generate_pairs.py"), ("path", "train_text2image.py")] + [
    ("module", f"sd_dmd.{m}") for m in ("encode_images", "cache_text", "sample", "evaluate", "export", "demo", "toy", "tiny",
                                        "verify_store", "report", "app")]


def test_import_and_every_help_print_nothing_and_open_no_connection():
    import json

    from bnb_extra import bitsandbytes_path, need_bitsandbytes

    need_bitsandbytes()  # the child imports it
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *bitsandbytes_path()])  # the [adamw8bit] extra
    out = subprocess.run([sys.executable, "-c", _GUARDED, json.dumps(COMMANDS)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["tried"] == [], result["tried"]  # no connection, no name lookup
    for _, target in COMMANDS:
        code, text = result["helps"][target]
        assert code in (0, None) and text.startswith("usage:"), (target, code, text)


def test_the_guard_sees_a_connection():
    """The guard above is not blind: a plain connection attempt is recorded and refused."""
    code = _GUARDED.split("import sd_dmd")[0] + (
        "try:\n    socket.create_connection(('huggingface.co', 443))\nexcept OSError:\n    pass\nprint(tried)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "huggingface.co" in out.stdout, out


def test_four_step_lcm_timesteps_sample_without_the_off_grid_warning():
    """call_kwargs sets LCMScheduler's original_inference_steps so that DMD2's [999, 749, 499, 249] lie on its grid:
    the default grid (50 steps) warns that 749 and 249 leave it; the timesteps run are the same either way."""
    from types import SimpleNamespace

    from diffusers import LCMScheduler

    from sd_dmd.outputs.sample import call_kwargs, lcm_original_steps

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
