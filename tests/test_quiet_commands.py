"""The commands that load a LoRA print nothing that asks for no action (issue 29, item 4).

Each command runs in its own interpreter (the logging set-up is the real one) and its stdout + stderr must not hold
diffusers' "No LoRA keys associated to CLIPTextModel ..." warning (our LoRA files hold UNet weights alone) nor the
`kernels` package's "Skipping publisher trust check ..." line (bitsandbytes asking the Hub for a CPU kernel at import).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("No LoRA keys associated", "publisher trust")


def _run(args, cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    return out


def _assert_quiet(out: str) -> None:
    for noise in NOISE:
        assert noise not in out, next(line for line in out.splitlines() if noise in line)


def _save_lora(model_dir, out) -> str:
    from sd_dmd.models.lora import save_lora
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec

    save_lora(DMDModel.from_pretrained(str(model_dir), generator_lora=LoraSpec(rank=4, alpha=8.0),
                                       fake_lora=LoraSpec(rank=4, alpha=4.0)), out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_lora(tiny_pipe_dir, tmp_path_factory):
    return _save_lora(tiny_pipe_dir, tmp_path_factory.mktemp("quiet") / "lora")


def test_sample_command_is_quiet(tiny_pipe_dir, tiny_lora, tmp_path):
    out = _run(["-m", "sd_dmd.sample", "--model", tiny_pipe_dir, "--lora", tiny_lora, "--prompt", "a red cube",
                "--out", str(tmp_path / "o.png")], tmp_path)
    assert "loaded LoRA" in out and (tmp_path / "o.png").is_file()
    _assert_quiet(out)


# sd_dmd.evaluate's own main, in a fresh interpreter; FID's Inception (a download) is swapped for a tiny random
# feature extractor, as tests/test_evaluate.py does. Run twice: the one-step pipeline (lcm) and the teacher's
# scheduler with the LoRA loaded into it (ddim), the two ways build_pipeline loads a LoRA.
EVALUATE = """
import sys
import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

import sd_dmd.evaluation.evaluate as ev
from sd_dmd.evaluate import main


class TinyFeatures(nn.Module):
    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 255.0)


ev.make_fid = lambda feature=2048, weights=None: FrechetInceptionDistance(feature=TinyFeatures(),
                                                                          reset_real_features=False)
model, lora, prompts, ref, out = sys.argv[1:]
common = ["--model", model, "--lora", lora, "--prompts", prompts, "--num_prompts", "2", "--resolution", "16",
          "--eval_resolution", "16", "--batch_size", "2", "--dtype", "fp32", "--clip_pretrained", "none",
          "--reference", ref]
main(common + ["--out_dir", out + "/lcm"])
main(common + ["--out_dir", out + "/ddim", "--scheduler", "ddim", "--steps", "2"])
"""


def test_evaluate_command_is_quiet(tiny_pipe_dir, tiny_lora, tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\n")
    out = _run(["-c", EVALUATE, tiny_pipe_dir, tiny_lora, str(tmp_path / "p.txt"), str(tmp_path / "ref"),
                str(tmp_path / "ev")], tmp_path)
    for sub in ("lcm", "ddim"):
        assert len(list((tmp_path / "ev" / sub / "images").glob("*.png"))) == 2, out[-3000:]
        assert (tmp_path / "ev" / sub / "metrics.json").is_file()
    _assert_quiet(out)


# make demo's evaluation step: sd_dmd.demo.evaluate_lora on a LoRA of the shipped digits teacher (untrained here:
# what is loaded, not what it learnt, is under test), one image per digit, as the demo's table and grid call it.
DEMO = """
import sys
from pathlib import Path

from sd_dmd.demo import evaluate_lora

images, labels, metrics = evaluate_lora(Path(sys.argv[1]), 1, seed=0)
print("images", len(images), "digits_fid" in metrics)
"""


def test_demo_evaluation_step_is_quiet(tmp_path):
    from sd_dmd.data.digits import TEACHER_DIR

    lora = _save_lora(TEACHER_DIR, tmp_path / "lora")
    out = _run(["-c", DEMO, lora], tmp_path)
    assert "images 10 True" in out, out[-3000:]
    _assert_quiet(out)
