"""``sample --lora`` takes every layout training writes: run dir, final/, checkpoint-N/, kohya file."""
import json

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image

from sd_dmd.models.lora import KOHYA_FILE, LORA_FILE, export_kohya, resolve_lora, save_lora
from sd_dmd.models.shared_unet import FAKE, GENERATOR, DMDModel, LoraSpec
from sd_dmd.outputs import sample


def _randomize(model, name, seed, scale=0.3):
    import torch

    g = torch.Generator().manual_seed(seed)
    for p in model.adapter_parameters(name):
        p.data = (torch.randn(p.shape, generator=g) * scale).float()


@pytest.fixture(scope="module")
def run_dir(tiny_pipe_dir, tmp_path_factory):
    """What training leaves: final/ (diffusers + kohya, weights A) and checkpoint-5/ (weights B)."""
    m = DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                 fake_lora=LoraSpec(rank=4, alpha=4.0))
    run = tmp_path_factory.mktemp("run") / "run"
    _randomize(m, GENERATOR, seed=1)
    save_lora(m, run / "final", GENERATOR)
    export_kohya(m, run / "final" / KOHYA_FILE, GENERATOR)
    _randomize(m, GENERATOR, seed=2)
    ckpt = run / "checkpoint-5"
    save_lora(m, ckpt / "generator", GENERATOR)
    save_lora(m, ckpt / "fake", FAKE)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5}))
    return run


def test_resolve_every_layout(run_dir):
    cases = {run_dir: (run_dir / "final" / LORA_FILE, "run directory"),
             run_dir / "final": (run_dir / "final" / LORA_FILE, "LoRA directory"),
             run_dir / "checkpoint-5": (run_dir / "checkpoint-5" / "generator" / LORA_FILE, "checkpoint"),
             run_dir / "final" / KOHYA_FILE: (run_dir / "final" / KOHYA_FILE, "kohya"),
             run_dir / "final" / LORA_FILE: (run_dir / "final" / LORA_FILE, "diffusers")}
    for given, (file, form) in cases.items():
        src = resolve_lora(given)
        assert src.file == file and form in src.form, (given, src)


def _sample(capsys, tiny_pipe_dir, out, lora=None, extra=()):
    argv = ["--model", tiny_pipe_dir, "--prompt", "a red cube", "--prompt", "a cat", "--out", str(out), *extra]
    sample.main(argv + (["--lora", str(lora)] if lora is not None else []))
    printed = capsys.readouterr().out
    return np.asarray(Image.open(out)).astype(np.int16), printed


def test_sample_loads_each_form_and_says_which(run_dir, tiny_pipe_dir, tmp_path, capsys):
    base, _ = _sample(capsys, tiny_pipe_dir, tmp_path / "base.png")
    outs = {}
    for name, lora in {"run": run_dir, "final": run_dir / "final", "kohya": run_dir / "final" / KOHYA_FILE,
                       "ckpt": run_dir / "checkpoint-5"}.items():
        outs[name], printed = _sample(capsys, tiny_pipe_dir, tmp_path / f"{name}.png", lora)
        assert f"loaded LoRA {resolve_lora(lora)}" in printed, printed
    assert np.abs(outs["final"] - base).max() > 10  # the LoRA is really applied
    assert np.abs(outs["run"] - outs["final"]).max() == 0  # the run directory means its final/
    assert np.abs(outs["kohya"] - outs["final"]).max() <= 1  # the same weights in kohya keys (8-bit rounding)
    assert np.abs(outs["ckpt"] - outs["final"]).max() > 10  # the checkpoint's own generator/, not final/


def test_sample_height_width(tiny_pipe_dir, run_dir, tmp_path, capsys):
    img, _ = _sample(capsys, tiny_pipe_dir, tmp_path / "hw.png", run_dir, ["--height", "32", "--width", "24"])
    assert img.shape[:2] == (2 * 32, 24)  # one row per prompt


def test_not_a_lora_is_one_line(run_dir, tiny_pipe_dir, tmp_path, capsys):
    import shutil

    argv = ["--model", tiny_pipe_dir, "--prompt", "x", "--out", str(tmp_path / "x.png"), "--lora"]
    (tmp_path / "empty").mkdir()
    assert_one_line_error(sample.main, argv + [str(tmp_path / "empty")], capsys, f"no {LORA_FILE} here")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir / "checkpoint-5", unfinished / "checkpoint-5")
    assert_one_line_error(sample.main, argv + [str(unfinished)], capsys, "no final/ yet, pass one of its "
                                                                         "checkpoints: checkpoint-5")
    assert_one_line_error(sample.main, argv + [str(tmp_path / "nope")], capsys, "no such LoRA")
