"""Issue 36, item 3: precision / recall (Kynkäänniemi et al. 2019) and per-prompt LPIPS diversity in
``sd_dmd.evaluate``. Cases with a known answer, and a collapsed generator (one image for every seed and prompt),
which must score recall and diversity near 0. Nothing is downloaded (tiny feature extractor, random LPIPS backbone)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import TinyFeatures, _images

import sd_dmd.evaluation.evaluate as ev
from sd_dmd.evaluation.diversity import lpips_diversity, make_lpips, precision_recall


def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    same = precision_recall(real, torch.randn(300, 8, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8, same
    collapsed = precision_recall(real, real[:1].expand(300, 8) + 0)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.01, collapsed
    far = precision_recall(real, torch.randn(300, 8, generator=g) + 50)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    narrow = precision_recall(real, 0.2 * torch.randn(300, 8, generator=g))  # one mode of the real spread
    assert narrow["precision"] > 0.9 and narrow["recall"] < same["recall"] - 0.3, narrow
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(real[:3], real)


def test_lpips_diversity_is_zero_for_identical_seeds():
    model = make_lpips("alex", pretrained_backbone=False)
    imgs = _images(6, seed=1)
    varied = lpips_diversity([imgs[:3], imgs[3:]], model)
    collapsed = lpips_diversity([imgs[:1].expand(3, -1, -1, -1), imgs[3:4].expand(3, -1, -1, -1)], model)
    assert collapsed["lpips_diversity"] == 0.0 and varied["lpips_diversity"] > 0.01
    assert varied["lpips_diversity_prompts"] == 2 and varied["lpips_diversity_seeds"] == 3


class _Collapsed:
    """A pipeline that paints one image whatever the prompt or seed."""

    def __init__(self, size):
        from diffusers import LCMScheduler

        self.image = Image.fromarray(np.full((size, size, 3), 90, np.uint8))
        self.scheduler = LCMScheduler()

    def __call__(self, prompts, generator=None, **kw):
        return type("Out", (), {"images": [self.image] * len(prompts)})()


@pytest.mark.parametrize("collapsed", [False, True])
def test_evaluate_prints_precision_recall_and_diversity(tiny_pipe_dir, tmp_path, monkeypatch, capsys, collapsed):
    from torchmetrics.image.fid import FrechetInceptionDistance

    monkeypatch.setattr(ev, "make_fid", lambda feature=2048, weights=None: FrechetInceptionDistance(
        feature=TinyFeatures(), reset_real_features=False))
    if collapsed:
        monkeypatch.setattr(ev, "build_pipeline", lambda cfg, device: _Collapsed(cfg.resolution))
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(_images(12, seed=3)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\na cat\n")
    cfg = ev.EvalConfig(model=tiny_pipe_dir, prompts=str(tmp_path / "p.txt"), num_prompts=12, resolution=16,
                        eval_resolution=16, batch_size=4, dtype="fp32", out_dir=str(tmp_path / "ev"),
                        clip_pretrained=None, reference=str(tmp_path / "ref"), diversity_prompts=2,
                        diversity_seeds=3, lpips_pretrained_backbone=False)
    m = ev.evaluate(cfg)
    printed = capsys.readouterr().out
    assert '"recall"' in printed and '"lpips_diversity"' in printed and '"precision"' in printed
    assert len(list((tmp_path / "ev" / "diversity").glob("*.png"))) == 6
    assert {"fid", "precision", "recall", "lpips_diversity"} <= set(m)
    if collapsed:
        assert m["recall"] <= 1 / 12 and m["lpips_diversity"] == 0.0, m
    else:
        assert m["lpips_diversity"] > 0.01, m
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["recall"] == m["recall"] and saved["lpips_diversity"] == m["lpips_diversity"]
