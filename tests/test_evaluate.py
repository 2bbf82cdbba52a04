"""Evaluation metrics where the answer is known, with tiny random feature extractors (nothing downloaded)."""
import json

import pytest
import torch
import torch.nn as nn

from sd_dmd.evaluation.evaluate import (EvalConfig, clip_score, evaluate, fid_between, load_clip, make_fid, read_captions,
                             set_reference_stats)


class TinyFeatures(nn.Module):
    """A fixed random conv feature extractor taking uint8 images (stands in for Inception)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 255.0)


def _images(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200
    return (base + torch.rand(n, 3, 32, 32, generator=g) * 55).clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero():
    imgs = _images()
    assert abs(fid_between(imgs, imgs, feature=TinyFeatures())) < 1e-3


def test_fid_grows_with_shift():
    ref = _images()
    gen = _images(seed=1)
    fids = [fid_between((gen.int() + s).clamp(0, 255).to(torch.uint8), ref, feature=TinyFeatures())
            for s in (0, 30, 90)]
    assert fids[0] < fids[1] < fids[2], fids


def test_precomputed_statistics_match_image_reference():
    ref, gen = _images(), _images(seed=2)
    with torch.no_grad():
        feats = TinyFeatures()(ref).double()
    mu, sigma = feats.mean(0), torch.cov(feats.T)
    fid = make_fid(TinyFeatures())
    set_reference_stats(fid, mu.numpy(), sigma.numpy(), len(ref))
    fid.update(gen, real=False)
    assert float(fid.compute()) == pytest.approx(fid_between(gen, ref, feature=TinyFeatures()), rel=1e-4)


@pytest.fixture(scope="module")
def clip():
    return load_clip("ViT-B-32", None)  # random weights, nothing downloaded


def test_clip_score_identical_for_identical_pairs(clip):
    model, size, tok = clip
    imgs = _images(4)
    caps = ["a red cube", "a dog", "a red cube", "a tree"]
    a = clip_score(imgs, caps, model, size, tok)
    b = clip_score(imgs, caps, model, size, tok, batch=1)
    assert a == pytest.approx(b, abs=1e-4)
    one = clip_score(imgs[:1], caps[:1], model, size, tok)
    same = clip_score(imgs[[0, 0]], [caps[0], caps[0]], model, size, tok)
    assert one == pytest.approx(same, abs=1e-4)
    other = clip_score(imgs[:1], ["an entirely different caption about ships"], model, size, tok)
    assert other != pytest.approx(one, abs=1e-6)


def test_read_coco_captions(tmp_path):
    ann = {"annotations": [{"image_id": i, "caption": f" caption {i} "} for i in range(50)]}
    (tmp_path / "c.json").write_text(json.dumps(ann))
    a = read_captions(str(tmp_path / "c.json"), 10, seed=0)
    assert a == read_captions(str(tmp_path / "c.json"), 10, seed=0) and len(set(a)) == 10
    assert a[0].startswith("caption")


def test_evaluate_generates_resumably(tiny_pipe_dir, tmp_path, monkeypatch):
    import sd_dmd.evaluation.evaluate as ev
    from torchmetrics.image.fid import FrechetInceptionDistance

    # an evaluation must compute something: FID against a tiny reference, with a tiny feature extractor
    monkeypatch.setattr(ev, "make_fid", lambda feature=2048, weights=None: FrechetInceptionDistance(
        feature=TinyFeatures(), reset_real_features=False))
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(_images(4)):
        from PIL import Image

        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\na cat\n")
    cfg = EvalConfig(model=tiny_pipe_dir, prompts=str(tmp_path / "p.txt"), num_prompts=5, resolution=16,
                     eval_resolution=16, batch_size=2, dtype="fp32", out_dir=str(tmp_path / "ev"),
                     clip_pretrained=None, reference=str(tmp_path / "ref"))
    m = evaluate(cfg)
    files = sorted((tmp_path / "ev" / "images").glob("*.png"))
    assert m["num_images"] == 5 and len(files) == 5
    stamp = files[0].stat().st_mtime_ns
    files[-1].unlink()
    evaluate(cfg)
    assert files[0].stat().st_mtime_ns == stamp and files[-1].exists()
