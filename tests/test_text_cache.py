"""Prompt conditionings cached to disk (issue 38, ``data.text_cache``): the cache holds what the model encodes (up to
the rounding that depends on which prompts shared an encoder call) (SD3's CLIP-L/G + T5 tokens and pooled embedding; SDXL's zeroed unconditional branch), training from it
loads no text encoder and equals training with the encoders loaded, a resume keeps complete shards, and a cache
that lacks a prompt or was made for other prompts is refused in one line before anything is written."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "two cats on a sofa", "a blue sphere", "the number seven", "a red cube"]
VALIDATION = ["a red cube", "a blue sphere"]  # configs/tiny.yaml's


@pytest.fixture(scope="module", params=["sd3", "sdxl"])
def pipe_dir(request, tmp_path_factory):
    from sd_dmd.models.tiny import build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

    build = build_tiny_sd3_pipeline if request.param == "sd3" else build_tiny_sdxl_pipeline
    return str(build(tmp_path_factory.mktemp(request.param) / "pipe"))


@pytest.fixture(scope="module")
def cache(pipe_dir, tmp_path_factory):
    from sd_dmd import cache_text

    d = tmp_path_factory.mktemp("cache")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cache_text.main(["--pretrained_model_name_or_path", pipe_dir, "--prompts", str(d / "prompts.txt"),
                     "--extra_prompts", *VALIDATION, "--output_dir", str(d / "cache"), "--dtype", "fp32",
                     "--shard_size", "2", "--batch_size", "3"])
    return d


def _model(pipe_dir, **kw):
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec

    return DMDModel.from_pretrained(pipe_dir, generator_lora=LoraSpec(4, 4.0), fake_lora=LoraSpec(4, 4.0), **kw)


def test_the_cache_holds_what_the_model_encodes(pipe_dir, cache):
    from sd_dmd.data.text_cache import UNCOND, TextCache

    c = TextCache(cache / "cache")
    m = _model(pipe_dir)
    assert len(c) == 1 + 4 and c.manifest["num_items"] == 5  # the unconditional item + 4 unique prompts
    prompts = list(dict.fromkeys(PROMPTS))
    # the encoders' outputs depend on the batch they ran in by float rounding only (the cache ran batches of 2)
    assert torch.allclose(c.lookup(prompts), m.encode_prompts(prompts), rtol=0, atol=1e-5)
    assert torch.allclose(c.lookup([UNCOND]), m.uncond_embedding, rtol=0, atol=1e-5)
    assert not torch.allclose(c.lookup(prompts[:1]), m.encode_prompts(prompts[1:2]), atol=1e-2)  # it can fail
    if m.family.name == "sdxl":  # SDXL base's unconditional branch is zeros, not the encoding of ""
        assert torch.equal(c.lookup([UNCOND])[:, :-1], torch.zeros_like(m.uncond_embedding[:, :-1]))
    with pytest.raises(Exception, match="no conditioning for 1 prompt"):
        c.lookup(["a prompt nobody cached"])


def test_a_resume_keeps_complete_shards_and_other_prompts_are_refused(pipe_dir, cache, tmp_path, capsys):
    import shutil

    from conftest import assert_one_line_error

    from sd_dmd import cache_text
    from sd_dmd.data.store import shard_path

    out = tmp_path / "c"
    shutil.copytree(cache / "cache", out)
    keep = shard_path(out, 0).stat().st_mtime_ns
    before = shard_path(out, 1).read_bytes()
    shard_path(out, 1).unlink()
    shard_path(out, 2).write_bytes(b"torn")
    common = ["--pretrained_model_name_or_path", pipe_dir, "--prompts", str(cache / "prompts.txt"), "--output_dir",
              str(out), "--dtype", "fp32", "--shard_size", "2", "--batch_size", "3"]
    cache_text.main(common + ["--extra_prompts", *VALIDATION])
    assert shard_path(out, 0).stat().st_mtime_ns == keep and shard_path(out, 1).read_bytes() == before
    assert shard_path(out, 2).read_bytes() == shard_path(cache / "cache", 2).read_bytes()
    assert_one_line_error(cache_text.main, common + ["--extra_prompts", "a green pyramid"], capsys,
                          "(num_items, prompts_sha256 differ)")


def _train(pipe_dir, cache, out, *extra):
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import train

    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", pipe_dir,
            "--regression.loss", "none", "--data.prompts", str(cache / "prompts.txt"), "--output_dir", str(out),
            "--train.max_steps", "2", *extra]
    return train(load_config(Config, argv)[0])


def test_training_from_the_cache_equals_training_with_the_encoders(pipe_dir, cache, tmp_path, monkeypatch):
    """Bit-equal adapters after 2 steps (GAN off, regression off). The encoders' outputs depend on which prompts share
    a call by float rounding, which Adam's normalised steps magnify for near-zero gradients, so both sides encode one
    prompt per call here: the cache with --batch_size 1, the live run with its conditioner's encode wrapped to do
    the same. What is compared is then exactly the cache's plumbing (the closeness of batched encodings is the test
    above)."""
    from sd_dmd import cache_text
    from sd_dmd.models.family import SD3Text, SDXLText

    for cls in (SD3Text, SDXLText):
        orig = cls.encode
        monkeypatch.setattr(cls, "encode", lambda self, prompts, orig=orig: torch.cat([orig(self, [p])
                                                                                       for p in prompts]))
    cache_text.main(["--pretrained_model_name_or_path", pipe_dir, "--prompts", str(cache / "prompts.txt"),
                     "--extra_prompts", *VALIDATION, "--output_dir", str(tmp_path / "cache1"), "--dtype", "fp32",
                     "--batch_size", "1"])
    live = _train(pipe_dir, cache, tmp_path / "live")
    cached = _train(pipe_dir, cache, tmp_path / "cached", "--data.text_cache", str(tmp_path / "cache1"))
    assert cached.model.text_encoders == [] and len(live.model.text_encoders) >= 2  # no T5, no CLIP loaded
    for name in ("generator", "fake"):
        a, b = live.model.adapter_named_parameters(name), cached.model.adapter_named_parameters(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(p.abs().sum() > 0 for k, p in b.items() if "lora_B" in k)  # it did train
    card = json.loads((tmp_path / "cached" / "final" / "sd_dmd_sampling.json").read_text())
    assert card["timesteps"] == [999]


def test_a_cache_without_the_runs_prompts_is_refused_before_anything_is_written(pipe_dir, cache, tmp_path, capsys):
    from conftest import assert_one_line_error

    import train_text2image

    (tmp_path / "other.txt").write_text("a green pyramid\n")
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", pipe_dir,
            "--regression.loss", "none", "--data.prompts", str(tmp_path / "other.txt"), "--output_dir",
            str(tmp_path / "run"), "--data.text_cache", str(cache / "cache")]
    assert_one_line_error(train_text2image.main, argv, capsys, "lacks 1 of the data.prompts (e.g. 'a green pyramid')")
    assert not (tmp_path / "run" / "final").exists()
