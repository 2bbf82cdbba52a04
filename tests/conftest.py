import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def assert_one_line_error(main, argv, capsys, match):
    """``main(argv)`` exits 2 with one ``error: ...`` line on stderr containing ``match``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and match in err[-1], err


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny random SD pipeline saved in diffusers layout (latents 4x8x8, images 16x16)."""
    from sd_dmd.models.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.fixture
def tiny_model(tiny_pipe_dir):
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec

    return DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                    fake_lora=LoraSpec(rank=4, alpha=4.0), real_guidance_scale=3.0)


@pytest.fixture(scope="session")
def train_setup(tiny_pipe_dir, tmp_path_factory):
    """Inputs of a tiny training run: 4 prompts and an 8-pair store from the tiny pipeline (configs/tiny.yaml)."""
    import generate_pairs

    d = tmp_path_factory.mktemp("train")
    (d / "prompts.txt").write_text("a red cube\ntwo cats on a sofa\na blue sphere\nthe number seven\n")
    generate_pairs.main(["--prompts", str(d / "prompts.txt"), "--pretrained_model_name_or_path", tiny_pipe_dir,
                         "--output_dir", str(d / "pairs"), "--resolution", "16", "--num_inference_steps", "3",
                         "--num_pairs", "8"])
    return {"pipe": tiny_pipe_dir, "pairs": str(d / "pairs"), "prompts": str(d / "prompts.txt"), "dir": d}


@pytest.fixture(scope="session")
def real_latents(tiny_pipe_dir, tmp_path_factory):
    """A real-latent store (DMD2's GAN data) of 8 random 16x16 images with captions, by the tiny pipeline's VAE."""
    import numpy as np
    from PIL import Image

    from sd_dmd import encode_images

    d = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(["a red cube", "a blue sphere"][i % 2])
    encode_images.main(["--images", str(d), "--pretrained_model_name_or_path", tiny_pipe_dir,
                        "--output_dir", str(d / "store"), "--resolution", "16"])
    return str(d / "store")


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub pointed at a local stand-in of the Hub (tests/fake_hub.py), online for this test only, with
    Xet off (files go inline); yields the record of what was created and committed."""
    from huggingface_hub import constants
    from fake_hub import FakeHub

    with FakeHub() as record:
        monkeypatch.setattr(constants, "ENDPOINT", record.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield record
