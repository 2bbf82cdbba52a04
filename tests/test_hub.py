"""Publishing on the Hub (issue 37, item 1), offline: huggingface_hub's own create_repo / create_branch /
upload_folder talk to a local stand-in of the Hub (tests/fake_hub.py), which records every file that would be
committed, byte for byte. Never the real Hub."""
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from sd_dmd.config import ConfigError, load_config
from sd_dmd.outputs import export
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_sEcReT0123456789abcdefTOKEN"


def _cfg(train_setup, out: Path, *extra):
    return load_config(Config, [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", train_setup["pipe"],
        "--regression.pairs_dir", train_setup["pairs"], "--data.prompts", train_setup["prompts"],
        "--output_dir", str(out), "--train.max_steps", "2", "--checkpointing.every", "1", *extra])[0]


def _everything_written(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


def test_training_pushes_final_and_each_checkpoint(train_setup, tmp_path, fake_hub, capsys):
    from sd_dmd.training.loop import train

    out = tmp_path / "run"
    cfg = _cfg(train_setup, out, "--hub.push", "true", "--hub.model_id", "me/tiny-dmd", "--hub.private", "true",
               "--hub.every_checkpoint", "true", "--hub.token", TOKEN)
    final = train(cfg).final
    printed = capsys.readouterr()
    assert fake_hub.repos == {"me/tiny-dmd": {"private": True}}
    # main: exactly final/ as it is on disk, nothing from checkpoints or optimisers
    on_disk = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert {"pytorch_lora_weights.safetensors", "README.md", "samples.png", "curves.png"} <= set(on_disk)
    assert fake_hub.files("main") == on_disk
    # each checkpoint's generator LoRA on its own branch, as the files a diffusers loader reads
    assert fake_hub.branches == [("me/tiny-dmd", "step-1"), ("me/tiny-dmd", "step-2")]
    for step in (1, 2):
        lora = out / f"checkpoint-{step}" / "generator"
        assert fake_hub.files(f"step-{step}") == {p.name: p.read_bytes() for p in lora.iterdir()}
    assert all(a == f"Bearer {TOKEN}" for a in fake_hub.authorizations)  # the given token was used ...
    assert TOKEN.encode() not in _everything_written(out)  # ... and never written (config.yaml, card, logs)
    assert TOKEN not in printed.out + printed.err
    assert "hub: pushed" in printed.out
    card = (final / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/tiny-dmd")' in card  # the card of a pushed run loads from the Hub


def test_offline_push_fails_in_one_line_after_final_is_safe(train_setup, tmp_path, capsys):
    """conftest keeps HF_HUB_OFFLINE=1: the upload fails, the run does not, and final/ is complete."""
    from sd_dmd.training.loop import train

    out = tmp_path / "run"
    final = train(_cfg(train_setup, out, "--hub.push", "true", "--hub.model_id", "me/tiny-dmd",
                       "--hub.token", TOKEN, "--checkpointing.every", "0")).final
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if line.startswith("hub:")]
    assert len(failed) == 1 and "failed" in failed[0] and "OfflineModeIsEnabled" in failed[0], printed
    assert f"python -m sd_dmd.export {out} --push_to_hub me/tiny-dmd" in failed[0]
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "README.md").is_file()
    assert TOKEN not in printed


def test_export_pushes_a_finished_run_or_a_checkpoint(train_setup, tmp_path, fake_hub, capsys):
    from sd_dmd.training.loop import train

    out = tmp_path / "run"
    train(_cfg(train_setup, out))
    capsys.readouterr()
    export.main([str(out), "--push_to_hub", "me/later"])
    assert "pushed" in capsys.readouterr().out
    assert set(fake_hub.files("main")) == {p.name for p in (out / "final").iterdir()}
    export.main([str(out / "checkpoint-2"), "--push_to_hub", "me/later", "--token", TOKEN])
    assert fake_hub.branches == [("me/later", "step-2")]
    assert set(fake_hub.files("step-2")) == {p.name for p in (out / "checkpoint-2" / "generator").iterdir()}
    assert fake_hub.authorizations[-1] == f"Bearer {TOKEN}"


def test_export_push_errors_are_one_line(train_setup, tmp_path, fake_hub, capsys):
    assert_one_line_error(export.main, [str(tmp_path), "--push_to_hub", "me/x"], capsys,
                          "no final/ (or checkpoint-N/generator/)")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    fake_hub.refuse = True
    assert_one_line_error(export.main, [str(run), "--push_to_hub", "me/x", "--token", TOKEN], capsys,
                          "push of")
    assert fake_hub.commits == []


@pytest.mark.parametrize("extra, key", [
    (["--hub.push", "true"], "hub.model_id: required"),
    (["--hub.every_checkpoint", "true"], "hub.model_id: required"),
    (["--hub.model_id", "not a/valid/id"], "hub.model_id: 'not a/valid/id' is not a Hub repository id"),
])
def test_hub_config_errors_name_the_key(train_setup, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(train_setup, tmp_path / "run", *extra)


def test_token_is_never_in_a_saved_config(train_setup, tmp_path):
    from sd_dmd.config import dump_config
    from sd_dmd.training.tracking import tracker_config

    cfg = _cfg(train_setup, tmp_path / "run", "--hub.token", TOKEN)
    assert cfg.hub.token == TOKEN  # read as given, for the upload
    assert TOKEN not in dump_config(cfg) and "token: null" in dump_config(cfg)
    assert TOKEN not in str(tracker_config(cfg)) and tracker_config(cfg)["hub.token"] == "None"
