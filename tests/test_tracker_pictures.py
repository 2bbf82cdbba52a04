"""Pictures in the tracker (issue 37, item 2): the labelled validation grid at every validation, curves.png and the
health report at the end, the resolved config as hyperparameters. Read back from what the trackers wrote: the
TensorBoard event files, and a real W&B run directory in offline mode."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_dmd.config import load_config
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_sEcReT0123456789abcdefTOKEN"


def _run(train_setup, out: Path, tracker: str):
    from sd_dmd.training.loop import train

    cfg = load_config(Config, [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", train_setup["pipe"],
        "--regression.pairs_dir", train_setup["pairs"], "--data.prompts", train_setup["prompts"],
        "--output_dir", str(out), "--train.max_steps", "2", "--checkpointing.every", "0",
        "--logging.validation_every", "1", "--logging.tracker", tracker, "--hub.token", TOKEN])[0]
    return train(cfg)


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = []
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"images": 0, "tensors": 0})
        ea.Reload()
        accs.append(ea)
    return accs


def test_tensorboard_gets_grids_curves_health_and_config(train_setup, tmp_path):
    out = tmp_path / "run"
    _run(train_setup, out, "tensorboard")
    accs = _events(out / "logs")
    images = {tag: [e for ea in accs if tag in ea.Tags()["images"] for e in ea.Images(tag)]
              for tag in ("validation", "samples", "curves")}
    assert [e.step for e in images["validation"]] == [1, 2]  # every validation
    assert [e.step for e in images["samples"]] == [2]  # and the final grid
    last = Image.open(io.BytesIO(images["samples"][0].encoded_image_string))
    assert np.array_equal(np.asarray(last.convert("RGB")), np.asarray(Image.open(out / "final" / "samples.png")
                                                                      .convert("RGB")))  # labelled, as on disk
    assert len(images["curves"]) == 1 and images["curves"][0].step == 2
    texts = [e.tensor_proto.string_val[0] for ea in accs for tag in ea.Tags()["tensors"] if tag.startswith("health")
             for e in ea.Tensors(tag)]
    assert len(texts) == 1 and b"health of run (2 logged steps)" in texts[0], texts
    hparams = [ea for ea in accs if "_hparams_/session_start_info" in ea.summary_metadata]
    assert hparams, "no hyperparameters in the event files"
    from tensorboard.plugins.hparams import plugin_data_pb2

    meta = hparams[0].summary_metadata["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).session_start_info
    assert info.hparams["dmd.real_guidance_scale"].number_value == 3.0
    assert info.hparams["model.resolution"].number_value == 16
    assert info.hparams["hub.token"].string_value == "None"  # a secret never reaches the tracker
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in (out / "logs").rglob("*") if p.is_file())


def test_wandb_offline_run_gets_grids_curves_health_and_config(train_setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the [wandb] extra; make install installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _run(train_setup, out, "wandb")
    runs = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "logs").rglob("*"))
    files = runs[0] / "files"
    media = sorted(p.name for p in (files / "media" / "images").glob("*.png"))
    assert [sum(n.startswith(f"{tag}_") for n in media) for tag in ("validation", "samples", "curves")] == [2, 1, 1]
    assert any(p.name.startswith("health_") for p in (files / "media" / "html").glob("*.html"))
    config = _wandb_config(next(runs[0].glob("run-*.wandb")))
    assert config["dmd.real_guidance_scale"] == 3.0 and config["model.resolution"] == 16
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file: LevelDB's log format (32 KiB blocks of records, each with a
    7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's 7-byte file header ":W&B"."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield Record.FromString(parts)
            parts = b""
        elif kind == 0:
            break


def _wandb_config(path: Path) -> dict:
    import json

    return {item.key: json.loads(item.value_json) for rec in _wandb_records(path) if rec.HasField("config")
            for item in rec.config.update}


def test_wandb_missing_is_a_one_line_error_naming_the_extra(monkeypatch):
    import importlib.util

    from sd_dmd.config import ConfigError
    from sd_dmd.training.preflight import check_tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.tracker: wandb is not installed \(pip install 'sd_dmd\[wandb\]'"):
        check_tracker("wandb")
