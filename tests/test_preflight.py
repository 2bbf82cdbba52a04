"""sd_dmd.preflight: one line per missing input path, naming the key, the path and the fix."""
import os
from pathlib import Path

import pytest

from sd_dmd.cli import guarded
from sd_dmd.config import ConfigError, load_config
from sd_dmd.training.preflight import PreflightError, check_paths, find_problems
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """cwd = an empty directory, so the configs' relative input paths do not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _cfg(config, *argv):
    return load_config(Config, ["--config", str(ROOT / "configs" / config), *argv])[0]


def test_shipped_tiny_config_names_its_inputs_and_the_command(in_tmp):
    problems = find_problems(_cfg("tiny.yaml"))
    assert [p.split(":")[0] for p in problems] == ["model.pretrained_model_name_or_path", "data.prompts",
                                                  "regression.pairs_dir"]
    for p, path in zip(problems, ["runs/tiny_inputs/pipe", "runs/tiny_inputs/prompts.txt", "runs/tiny_inputs/pairs"]):
        assert path in p and "python -m sd_dmd.tiny" in p and "\n" not in p, p


def test_shipped_tiny_config_passes_after_its_command(in_tmp, tiny_pipe_dir):
    from sd_dmd.tiny import make_tiny_inputs

    (in_tmp / "runs" / "tiny_inputs").mkdir(parents=True)
    os.symlink(tiny_pipe_dir, in_tmp / "runs" / "tiny_inputs" / "pipe")  # the pipeline is built once per session
    make_tiny_inputs(in_tmp / "runs" / "tiny_inputs")
    check_paths(_cfg("tiny.yaml"))


def test_shipped_digits_config_names_the_demo_command(in_tmp):
    problems = find_problems(_cfg("digits.yaml", "--model.pretrained_model_name_or_path",
                                  str(ROOT / "sd_dmd" / "assets" / "digits_teacher")))
    assert len(problems) == 3  # the default (issue 27) reads the teacher's pairs and, for its GAN, the real digits
    assert all("python -m sd_dmd.demo --inputs_only" in p for p in problems), problems
    assert "demo_out/prompts.txt" in problems[0] and "demo_out/pairs" in problems[1]
    assert problems[2].startswith("gan.real_latents: demo_out/real is not a real-latent store")


def test_a_missing_real_latent_store_names_the_command_that_makes_it(in_tmp, tiny_pipe_dir):
    (in_tmp / "p.txt").write_text("a cat\n")
    problems = find_problems(_cfg("tiny.yaml", "--model.pretrained_model_name_or_path", str(tiny_pipe_dir),
                                  "--regression.loss", "none", "--data.prompts", "p.txt",
                                  "--gan.real_latents", "real/laion"))
    assert problems == ["gan.real_latents: real/laion is not a real-latent store (no manifest.json); make it with "
                        "python -m sd_dmd.encode_images --images ... --output_dir real/laion (same VAE and resolution), "
                        "or pass --gan.real_latents DIR"]


def test_local_dir_that_is_not_a_pipeline(in_tmp):
    (in_tmp / "m" / "unet").mkdir(parents=True)
    (in_tmp / "f.bin").write_text("x")
    (in_tmp / "p.txt").write_text("a cat\n")
    base = ["--data.prompts", "p.txt", "--regression.loss", "none"]
    p = find_problems(_cfg("tiny.yaml", "--model.pretrained_model_name_or_path", "m", *base))
    assert p == ["model.pretrained_model_name_or_path: m: missing vae/, scheduler/, text_encoder/, tokenizer/ and no "
                 "model_index.json (not a diffusers pipeline); pass --model.pretrained_model_name_or_path DIR_OR_HUB_ID"]
    p = find_problems(_cfg("tiny.yaml", "--model.pretrained_model_name_or_path", "f.bin", *base))
    assert len(p) == 1 and "f.bin is a file" in p[0]
    p = find_problems(_cfg("tiny.yaml", "--model.pretrained_model_name_or_path", "tiny_pipe", *base))
    assert len(p) == 1 and "tiny_pipe is neither a local directory nor a hub id" in p[0]


def _fake_hub_cache(cache: Path, repo: str, filename: str):
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / filename).write_text("{}")
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("a" * 40)


def test_hub_ids_offline_must_be_cached(in_tmp, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(in_tmp / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    argv = ["--data.prompts", "p.txt", "--regression.pairs_dir", "."]
    (in_tmp / "manifest.json").write_text("{}")
    (in_tmp / "p.txt").write_text("a cat\n")
    problems = find_problems(_cfg("sd15_dmd.yaml", *argv))
    assert [p.split(":")[0] for p in problems] == ["model.pretrained_model_name_or_path", "regression.tiny_vae",
                                                   "regression.lpips_pretrained_backbone"]
    assert "hf download runwayml/stable-diffusion-v1-5" in problems[0] and "HF_HUB_OFFLINE" in problems[0]
    _fake_hub_cache(in_tmp / "hub", "runwayml/stable-diffusion-v1-5", "model_index.json")
    _fake_hub_cache(in_tmp / "hub", "madebyollin/taesd", "config.json")
    (in_tmp / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (in_tmp / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"x")
    assert find_problems(_cfg("sd15_dmd.yaml", *argv)) == []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(in_tmp / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, from_pretrained downloads what is missing
    assert find_problems(_cfg("sd15_dmd.yaml", *argv)) == []


def test_pairs_dir_without_manifest_and_loss_none(in_tmp, tiny_pipe_dir):
    (in_tmp / "p.txt").write_text("a cat\n")
    (in_tmp / "pairs").mkdir()
    argv = ["--model.pretrained_model_name_or_path", tiny_pipe_dir, "--data.prompts", "p.txt"]
    p = find_problems(_cfg("tiny.yaml", *argv, "--regression.pairs_dir", "pairs"))
    assert len(p) == 1 and p[0].startswith("regression.pairs_dir: pairs has no manifest.json") and \
        "python generate_pairs.py --output_dir pairs" in p[0]
    assert find_problems(_cfg("tiny.yaml", *argv, "--regression.loss", "none")) == []
    p = find_problems(_cfg("tiny.yaml", *argv, "--regression.loss", "none", "--checkpointing.resume_from", "ck"))
    assert len(p) == 1 and p[0].startswith("checkpointing.resume_from: ck is not a complete checkpoint")


def test_prompt_globs_and_dirs(in_tmp, tiny_pipe_dir):
    (in_tmp / "d").mkdir()
    argv = ["--model.pretrained_model_name_or_path", tiny_pipe_dir, "--regression.loss", "none"]
    p = find_problems(_cfg("tiny.yaml", *argv, "--data.prompts", "d", "x/*.txt"))
    assert [q.split(":")[:2] for q in p] == [["data.prompts", " d"], ["data.prompts", " x/*.txt"]], p
    (in_tmp / "d" / "a.txt").write_text("a cat\n")
    assert find_problems(_cfg("tiny.yaml", *argv, "--data.prompts", "d", "d/*.txt")) == []


def test_check_paths_error_prints_one_error_line_per_problem(in_tmp, capsys):
    with pytest.raises(PreflightError) as e:
        check_paths(_cfg("tiny.yaml"))
    assert isinstance(e.value, ConfigError) and len(e.value.problems) == 3
    with pytest.raises(SystemExit) as e:
        guarded(check_paths, _cfg("tiny.yaml"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err


def test_lpips_backbone_must_be_cached_offline(tmp_path, monkeypatch):
    from sd_dmd.training.preflight import lpips_backbone_problem

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problem = lpips_backbone_problem("vgg")
    assert problem and "vgg16-397923af.pth" in problem and "lpips_pretrained_backbone false" in problem
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"x")
    assert lpips_backbone_problem("vgg") is None
