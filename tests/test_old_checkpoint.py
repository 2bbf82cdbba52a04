"""A checkpoint written before the package layout (issue 26; tests/data/README.md) resumes with today's code: adapters,
optimisers, schedules, EMA, GAN head, RNG stream and history load as saved, and training continues."""
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from sd_dmd.config import load_config
from sd_dmd.models.shared_unet import GENERATOR
from sd_dmd.training.config import Config
from sd_dmd.training.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "checkpoint-2-before-layout"


def test_a_checkpoint_written_before_the_layout_resumes(train_setup, real_latents, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoint-2")
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path",
            train_setup["pipe"], "--regression.pairs_dir", train_setup["pairs"], "--data.prompts",
            train_setup["prompts"], "--output_dir", str(run), "--train.ema_decay", "0.9",
            "--dmd.fake_updates_per_step", "2", "--gan.real_latents", real_latents]
    # the machine that wrote it had other paths: its saved config points at this one's (a resume compares the keys
    # that shape the adapters, the model path among them)
    saved = yaml.safe_load((run / "checkpoint-2" / "config.yaml").read_text())
    saved["model"]["pretrained_model_name_or_path"] = train_setup["pipe"]
    (run / "checkpoint-2" / "config.yaml").write_text(yaml.safe_dump(saved))

    t = Trainer(load_config(Config, argv)[0], Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    t.load_checkpoint(run / "checkpoint-2")
    assert t.step == 2 and [h["step"] for h in t.history if "note" not in h] == [1, 2]
    lora = load_file(str(FIXTURE / "generator" / "pytorch_lora_weights.safetensors"))
    mine = {k: v for k, v in t.model.adapter_named_parameters(GENERATOR).items()}
    assert len(mine) == len(lora) > 0
    assert all(any(torch.equal(v, p) for p in mine.values()) for v in lora.values())
    ema = load_file(str(FIXTURE / "ema_generator.safetensors"))
    assert all(torch.equal(ema[str(i)], p) for i, p in enumerate(t.ema.shadow_params))
    head = load_file(str(FIXTURE / "gan_head.safetensors"))
    assert all(torch.equal(head[k], v) for k, v in t.model.gan_head.state_dict().items())
    assert t.opt_g.optimizer.state and t.sched_g.last_epoch == 2 and t.sched_d.last_epoch == 4

    resumed = train(load_config(Config, argv + ["--train.max_steps", "3"])[0], resume=True)
    assert [h["step"] for h in resumed.history if "note" not in h] == [1, 2, 3]
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
