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
    from sd_dmd.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.fixture
def tiny_model(tiny_pipe_dir):
    from sd_dmd.model import DMDModel, LoraSpec

    return DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                    fake_lora=LoraSpec(rank=4, alpha=4.0), real_guidance_scale=3.0)
