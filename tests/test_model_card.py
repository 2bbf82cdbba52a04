"""final/README.md is a hub-ready model card (issue 29, item 3): its YAML block as huggingface_hub reads it, and its
loading snippet run as written (on CPU) against a LoRA from a short tiny run."""
import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from sd_dmd.config import load_config
from sd_dmd.data.digits import TEACHER_DIR
from sd_dmd.outputs.model_card import write_model_card
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]
SD15 = "runwayml/stable-diffusion-v1-5"


def _card(tmp_path, model, *extra) -> ModelCard:
    """The card write_model_card writes for a run of configs/tiny.yaml on teacher ``model`` (no training needed)."""
    cfg = load_config(Config, ["--config", str(ROOT / "configs" / "tiny.yaml"),
                               "--model.pretrained_model_name_or_path", str(model), *extra])[0]
    final = tmp_path / "final"
    final.mkdir(exist_ok=True)
    write_model_card(cfg, final, [{"step": 1, "loss_dm": 0.5}], has_samples=False)
    return ModelCard.load(final / "README.md")


def _yaml_values(card: ModelCard) -> list[str]:
    return [str(v) for v in yaml.safe_load(card.data.to_yaml()).values() for v in (v if isinstance(v, list) else [v])]


def _teacher(tmp_path, pipeline_name=None, unet_name=None, readme=None) -> Path:
    """A local teacher folder's config files (what the card reads), recording the given ``_name_or_path``."""
    d = tmp_path / "teacher"
    (d / "unet").mkdir(parents=True)
    for rel, name in (("model_index.json", pipeline_name), ("unet/config.json", unet_name)):
        data = json.loads((TEACHER_DIR / rel).read_text())
        if name is not None:
            data["_name_or_path"] = name
        (d / rel).write_text(json.dumps(data))
    if readme is not None:
        (d / "README.md").write_text(readme)
    return d


def test_hub_teacher_gives_its_id_license_and_hub_fields(tmp_path):
    card = _card(tmp_path, SD15)
    d = card.data
    assert d.base_model == SD15 and d.license == "creativeml-openrail-m"
    assert d.library_name == "diffusers" and d.pipeline_tag == "text-to-image"
    assert {"lora", "text-to-image", "one-step"} <= set(d.tags)
    assert f'from_pretrained("{SD15}"' in card.text
    few = _card(tmp_path, "CompVis/stable-diffusion-v1-4", "--dmd.generator_timesteps", "999", "499").data
    assert few.license == "creativeml-openrail-m" and "few-step" in few.tags


def test_local_teacher_never_gives_a_path(tmp_path):
    """The demo's teacher (sd_dmd/assets/digits_teacher) records no hub id and no license: neither is written,
    and no local path appears in the metadata."""
    d = _card(tmp_path, TEACHER_DIR).data
    assert d.base_model is None and d.license is None
    assert d.library_name == "diffusers" and d.pipeline_tag == "text-to-image"
    assert not any("/" in v and not v.startswith(("http://", "https://")) for v in _yaml_values(_card(tmp_path,
                                                                                                     TEACHER_DIR)))
    # a pipeline saved after loading from a local folder records that folder: still no base_model
    d = _card(tmp_path, _teacher(tmp_path, "/home/someone/sd15", "/home/someone/sd15/unet")).data
    assert d.base_model is None and d.license is None


def test_local_teacher_gives_the_hub_id_it_records(tmp_path):
    # model_index.json: diffusers writes the id a pipeline was loaded by when it saves it
    d = _card(tmp_path / "a", _teacher(tmp_path / "a", SD15, "/cache/x/unet")).data
    assert d.base_model == SD15 and d.license == "creativeml-openrail-m"
    # unet/config.json: a pipeline loaded by id records its Hugging Face cache path
    cached = "/root/.cache/huggingface/hub/models--CompVis--stable-diffusion-v1-4/snapshots/abc123/unet"
    d = _card(tmp_path / "b", _teacher(tmp_path / "b", "/data/copy", cached)).data
    assert d.base_model == "CompVis/stable-diffusion-v1-4" and d.license == "creativeml-openrail-m"
    # a hub id whose license we do not know: the id, no license
    d = _card(tmp_path / "c", _teacher(tmp_path / "c", "someone/custom-sd")).data
    assert d.base_model == "someone/custom-sd" and d.license is None


def test_local_teacher_license_from_its_own_card(tmp_path):
    d = _card(tmp_path, _teacher(tmp_path, readme="---\nlicense: mit\n---\n# my teacher\n")).data
    assert d.license == "mit" and d.base_model is None


# What a reader fills in, each exactly once: the LoRA folder, and the teacher's folder name (a local teacher has no
# hub id) by its path. Nothing else: the snippet picks CUDA/fp16 or CPU/fp32 by itself.
def _runnable(code: str, lora_dir: Path, teacher: str) -> str:
    for old, new in (('"path/to/this/folder"', repr(str(lora_dir))), (f'"{Path(teacher).name}"', repr(teacher))):
        assert code.count(old) == 1, (old, code)
        code = code.replace(old, new)
    return code


ABSOLUTE = re.compile(r"(?<![\w:/.~-])(?:~|/)[\w.-]+/")  # "/x/..." or "~/...", not a URL or "docs/x"


@pytest.mark.parametrize("timesteps", [["999"], ["999", "499"]])
def test_card_snippet_runs_and_holds_no_path(train_setup, real_latents, tmp_path, timesteps):
    from sd_dmd.training.loop import train

    prompts = ["a tiny red cube", 'a "quoted" blue sphere']
    cfg = load_config(Config, [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", train_setup["pipe"],
        "--regression.pairs_dir", train_setup["pairs"], "--data.prompts", train_setup["prompts"],
        "--output_dir", str(tmp_path / "run"), "--train.max_steps", "1", "--checkpointing.every", "0",
        "--gan.real_latents", real_latents, "--logging.validation_prompts", *prompts,
        "--dmd.generator_timesteps", *timesteps])[0]
    final = train(cfg).final
    text = (final / "README.md").read_text()
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model is None and train_setup["pipe"] not in text  # a local tiny teacher
    for local in (str(tmp_path), train_setup["pipe"], real_latents, str(Path.home()), str(ROOT)):
        assert local not in text
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text)
    assert Path(train_setup["pipe"]).name in text and "replace it with that folder's path" in text
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert len(blocks) == 1, card.text
    assert f'pipe({json.dumps(prompts[0])},' in blocks[0]  # the run's own first validation prompt
    ns = {}
    exec(compile(_runnable(blocks[0], final, train_setup["pipe"]), str(final / "README.md"), "exec"), ns)
    assert ns["image"].size == (16, 16)
    sched = ns["pipe"].scheduler
    assert type(sched).__name__ == "LCMScheduler" and sched.timesteps.tolist() == [int(t) for t in timesteps]


def test_notes_lose_their_paths(tmp_path):
    from sd_dmd.outputs.model_card import without_paths

    assert without_paths("resumed from /data/runs/x/checkpoint-5 at step 5 (see docs/HEALTH.md, "
                         "https://hf.co/a/b, ~/w/c)") == ("resumed from checkpoint-5 at step 5 (see docs/HEALTH.md, "
                                                         "https://hf.co/a/b, c)")


def test_sd35_card_gives_its_community_license_and_tags(tmp_path):
    card = _card(tmp_path, "stabilityai/stable-diffusion-3.5-medium")
    d = card.data
    assert (d.license, d.license_name) == ("other", "stabilityai-ai-community")
    assert d.license_link == "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"


@pytest.mark.parametrize("timesteps", [[999], [999, 499]])
def test_sd3_card_snippet_runs_the_trainers_sigmas(tmp_path, timesteps):
    """The SD3 card's snippet, run as written on a tiny SD3 pipeline and a LoRA: FlowMatchLCMScheduler at exactly the
    trainer's sigmas (tests/test_families.py checks that these sample as the trainer does)."""
    import torch

    from sd_dmd.models.lora import save_lora
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec
    from sd_dmd.models.tiny import build_tiny_sd3_pipeline

    pipe_dir = str(build_tiny_sd3_pipeline(tmp_path / "sd3"))
    m = DMDModel.from_pretrained(pipe_dir, generator_lora=LoraSpec(4, 4.0), fake_lora=LoraSpec(4, 4.0))
    m.generator_timesteps = timesteps
    save_lora(m, tmp_path / "final")
    cfg = load_config(Config, ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path",
                               pipe_dir, "--dmd.generator_timesteps", *map(str, timesteps)])[0]
    write_model_card(cfg, tmp_path / "final", [], has_samples=False, pipeline="StableDiffusion3Pipeline")
    card = ModelCard.load(tmp_path / "final" / "README.md")
    assert "stable-diffusion-3" in card.data.tags and "lora_transformer_" in card.text
    code = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)[0]
    ns = {}
    exec(compile(_runnable(code, tmp_path / "final", pipe_dir), "README.md", "exec"), ns)
    sched = ns["pipe"].scheduler
    assert type(sched).__name__ == "FlowMatchLCMScheduler"
    assert torch.allclose(sched.sigmas[:-1], m.schedule.sigmas[timesteps], atol=1e-6)
