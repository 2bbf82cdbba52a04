"""The side-by-side app's generate function, without gradio or a browser (tests/test_app_browser.py has the browser)."""
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error


def make_lora(pipe_dir, out, seed: int = 0):
    """A generator LoRA of the tiny pipeline in final/'s layout (weights + sd_dmd_sampling.json), its lora_B random
    so that it changes the UNet: what training writes, without the training."""
    from sd_dmd.models.lora import save_lora
    from sd_dmd.models.shared_unet import GENERATOR, DMDModel, LoraSpec

    model = DMDModel.from_pretrained(str(pipe_dir), generator_lora=LoraSpec(rank=4, alpha=4.0),
                                     fake_lora=LoraSpec(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_named_parameters(GENERATOR).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_lora(model, out)


@pytest.fixture(scope="module")
def tiny_lora(tiny_pipe_dir, tmp_path_factory):
    return make_lora(tiny_pipe_dir, tmp_path_factory.mktemp("app") / "run" / "final")


@pytest.fixture(scope="module")
def comp(tiny_pipe_dir, tiny_lora):
    from sd_dmd.outputs.app import Comparison

    return Comparison.load(tiny_pipe_dir, str(tiny_lora), teacher_steps=5, guidance=3.0)


def _arrays(images):
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in images]


def test_generate_gives_n_images_each_that_differ_with_positive_times(comp):
    from sd_dmd.outputs.app import make_generate

    teacher, student = comp.generate("a red cube", seed=3, n=4)
    assert len(teacher.images) == len(student.images) == 4
    assert teacher.ms > 0 and student.ms > 0 and teacher.ms_per_image == teacher.ms / 4
    t, s = _arrays(teacher.images), _arrays(student.images)
    assert all(a.shape == (16, 16, 3) for a in t + s)
    assert all(np.abs(a - b).mean() > 1 for a, b in zip(t, s))  # teacher and student differ
    assert np.abs(t[0] - t[1]).mean() > 1 and np.abs(s[0] - s[1]).mean() > 1  # seed and seed+1 differ
    again_t, again_s = comp.generate("a red cube", seed=3, n=4)  # the same seeds: the same images
    assert all(np.array_equal(a, b) for a, b in zip(t + s, _arrays(again_t.images) + _arrays(again_s.images)))
    # what the button returns: two 2x2 grids of the images enlarged nearest-neighbour (16 px x 12), and the times
    t_grid, t_text, s_grid, s_text = make_generate(comp)("a red cube", 3)
    assert t_grid.size == s_grid.size == (2 * 192 + 4, 2 * 192 + 4)
    assert np.array_equal(np.asarray(t_grid)[:192:12, :192:12], t[0].astype(np.uint8))
    assert " ms** for 4 images" in t_text and "x faster" in s_text
    assert comp.teacher_label == "Teacher: 5 PNDM steps, CFG 3" and comp.student_label.endswith("1 step at t = 999")


def test_guidance_and_timesteps_come_from_the_run(tiny_pipe_dir, tiny_lora, tmp_path):
    """With no --guidance the teacher's CFG is the run's real-score guidance (run/config.yaml beside final/); the
    student's timesteps are those recorded beside the LoRA."""
    import json

    from sd_dmd.models.lora import SAMPLING_FILE, resolve_lora
    from sd_dmd.outputs.app import DEFAULT_GUIDANCE, recorded_guidance

    src = resolve_lora(tiny_lora.parent)  # the run directory
    assert recorded_guidance(src) is None  # no config.yaml: the default is used
    (tiny_lora.parent / "config.yaml").write_text("dmd:\n  real_guidance_scale: 1.75\n")
    try:
        assert recorded_guidance(src) == 1.75 and recorded_guidance(resolve_lora(tiny_lora)) == 1.75
    finally:
        (tiny_lora.parent / "config.yaml").unlink()
    assert DEFAULT_GUIDANCE == 7.5
    assert json.loads((tiny_lora / SAMPLING_FILE).read_text())["timesteps"] == [999] == src.timesteps


def test_command_errors_are_one_line(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    from sd_dmd import app

    monkeypatch.chdir(tmp_path)  # no demo_out/ here
    monkeypatch.setattr(app, "demo_lora", lambda: tmp_path / "demo_out" / "run" / "final")
    if "gradio" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("gradio") is None:
            assert_one_line_error(app.main, [], capsys, "pip install '.[app]'")
            return
    assert_one_line_error(app.main, [], capsys, "run `make demo` first")
    assert_one_line_error(app.main, ["--model", tiny_pipe_dir], capsys, "--lora")
    assert_one_line_error(app.main, ["--model", tiny_pipe_dir, "--lora", str(tmp_path / "nope")], capsys,
                          "no such LoRA")


def test_importing_the_package_and_the_app_module_does_not_import_gradio():
    import subprocess

    code = ("import sys, sd_dmd, sd_dmd.app, sd_dmd.outputs.app, sd_dmd.sample, sd_dmd.demo; "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
