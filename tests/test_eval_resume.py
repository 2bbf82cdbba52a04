"""evaluate: a resumed out_dir must hold the same model's images; 'none' skips CLIP; something must be computed."""
import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from sd_dmd.evaluation import evaluate as ev
from sd_dmd.models.lora import save_lora
from sd_dmd.models.shared_unet import GENERATOR


@pytest.fixture
def tiny_fid(monkeypatch):
    """FID with a tiny random feature extractor (the Inception weights are not available offline)."""
    from test_evaluate import TinyFeatures
    from torchmetrics.image.fid import FrechetInceptionDistance

    monkeypatch.setattr(ev, "make_fid", lambda feature=2048, weights=None: FrechetInceptionDistance(
        feature=TinyFeatures(), reset_real_features=False))


@pytest.fixture
def setup(tiny_pipe_dir, tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\na cat\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")

    def lora(seed):  # a LoRA written to the same path each time, as a training run rewrites final/
        g = torch.Generator().manual_seed(seed)
        for p in tiny_model.adapter_parameters(GENERATOR):
            p.data = torch.randn(p.shape, generator=g) * 0.3
        save_lora(tiny_model, tmp_path / "run" / "final", GENERATOR)
        return str(tmp_path / "run" / "final")

    argv = ["--model", tiny_pipe_dir, "--prompts", str(tmp_path / "p.txt"), "--num_prompts", "3", "--resolution", "16",
            "--eval_resolution", "16", "--batch_size", "2", "--dtype", "fp32", "--out_dir", str(tmp_path / "ev"),
            "--reference", str(ref), "--clip_pretrained", "none"]
    return {"argv": argv, "lora": lora, "out": tmp_path / "ev"}


def _pixels(out):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}


def test_clip_none_skips_clip(setup, tiny_fid):
    ev.main(setup["argv"] + ["--lora", setup["lora"](1)])
    m = json.loads((setup["out"] / "metrics.json").read_text())
    assert m["num_images"] == 3 and "fid" in m and "clip_score" not in m


def test_nothing_to_compute_fails_before_generating(setup, capsys):
    argv = [a for a in setup["argv"] if a not in ("--reference",) and not a.endswith("ref")]
    assert_one_line_error(ev.main, argv, capsys, "nothing to compute")
    assert not setup["out"].exists()


def test_resume_with_another_lora_or_timestep_is_refused_then_overwrite_starts_over(setup, tiny_fid, capsys):
    out, argv = setup["out"], setup["argv"]
    ev.main(argv + ["--lora", setup["lora"](1)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora_sha256"] and manifest["num_captions"] == 3 and manifest["steps"] == 1
    first = _pixels(out)
    ev.main(argv + ["--lora", setup["lora"](1)])  # same weights rewritten: resumes
    assert {k: v.tobytes() for k, v in _pixels(out).items()} == {k: v.tobytes() for k, v in first.items()}
    # new weights at the same path, and another t*: both named, nothing touched
    new = setup["lora"](2)
    capsys.readouterr()
    assert_one_line_error(ev.main, argv + ["--lora", new, "--conditioning_timestep", "900"], capsys,
                          f"made with other settings (lora_sha256 {manifest['lora_sha256'][:12]} -> ")
    assert_one_line_error(ev.main, argv + ["--lora", new, "--conditioning_timestep", "900"], capsys,
                          "; conditioning_timestep 999 -> 900); pass --overwrite")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # --overwrite: the old images go, the new model's come
    ev.main(argv + ["--lora", new, "--overwrite"])
    after = _pixels(out)
    assert after.keys() == first.keys() and all(not np.array_equal(after[k], first[k]) for k in first)
    assert json.loads((out / "manifest.json").read_text())["lora_sha256"] != manifest["lora_sha256"]


def test_images_without_manifest_are_refused(setup, tiny_fid, capsys):
    out = setup["out"]
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(out / "images" / "000000.png")
    assert_one_line_error(ev.main, setup["argv"], capsys, "no manifest.json")


def test_unknown_clip_tag_fails_before_generating(setup, capsys):
    argv = setup["argv"][:-1] + ["not_a_tag"]
    assert_one_line_error(ev.main, argv, capsys, "'not_a_tag' is neither a file nor a pretrained tag")
    assert not (setup["out"] / "images").exists()


def test_fid_weights_unavailable_fails_before_generating(setup, monkeypatch, capsys):
    import urllib.error

    def offline(feature=2048, weights=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ev, "make_fid", offline)
    assert_one_line_error(ev.main, setup["argv"], capsys, "FID Inception weights could not be loaded (URLError")
    assert not (setup["out"] / "images").exists()


def test_clip_tag_must_be_cached_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from sd_dmd.evaluation.evaluate import EvalError, check_clip_cached

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EvalError, match="not in the Hugging Face cache"):
        check_clip_cached("ViT-B-32", "laion2b_s34b_b79k")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, open_clip downloads it when needed
    check_clip_cached("ViT-B-32", "laion2b_s34b_b79k")
