"""train_text2image.py on the tiny offline pipeline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error
import torch
from safetensors.torch import load_file

import train_text2image
from sd_dmd.config import load_config
from sd_dmd.models.shared_unet import FAKE, GENERATOR
from sd_dmd.training.loop import train
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def _argv(setup, out, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.pairs_dir", setup["pairs"], "--data.prompts", setup["prompts"], "--output_dir", str(out),
            *extra]


def _cfg(setup, out, *extra):
    return load_config(Config, _argv(setup, out, *extra))[0]


def _adapters(trainer):
    return {f"{name}.{k}": p.detach().clone() for name in (GENERATOR, FAKE)
            for k, p in trainer.model.adapter_named_parameters(name).items()}


def test_only_adapters_change_and_final_reproduces_generator(setup, tmp_path):
    from sd_dmd.models.shared_unet import DMDModel
    from sd_dmd.outputs.sample import one_step_call_kwargs, one_step_pipeline

    t = train(_cfg(setup, tmp_path / "run", "--logging.validation_every", "2"))
    base = DMDModel.from_pretrained(setup["pipe"])
    trained = dict(t.model.unet.named_parameters())
    fresh = dict(base.unet.named_parameters())
    for n, p in trained.items():
        if "lora_" not in n:
            assert torch.equal(p, fresh[n]), n  # frozen base untouched
    moved = [n for n, p in t.model.adapter_named_parameters(GENERATOR).items() if p.abs().max() > 0 and "lora_B" in n]
    assert moved, "generator LoRA did not train"
    assert any(p.abs().max() > 0 for n, p in t.model.adapter_named_parameters(FAKE).items() if "lora_B" in n)
    # final/ in a fresh pipeline reproduces G(z)
    prompts = ["a red cube", "a blue sphere"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = t.model.generate(z, t.model.encode_prompts(prompts))
    pipe = one_step_pipeline(setup["pipe"], str(t.final))
    out = pipe(prompts, latents=z.clone(), output_type="latent", **one_step_call_kwargs(pipe)).images
    assert (out - ref).abs().max().item() < 1e-4
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "final" / "README.md").exists()
    assert (run / "final" / "lora_kohya.safetensors").exists()
    card = (run / "final" / "README.md").read_text()
    assert "load_lora_weights" in card and "example.invalid" not in card
    # a local teacher is named by its folder, never by its path (the card is published: issue 37)
    assert f"teacher | `{Path(setup['pipe']).name}`" in card and setup["pipe"] not in card and "timesteps=[999]" in card and "lora_kohya.safetensors" in card
    assert "![samples](samples.png)" in card and (run / "final" / "samples.png").is_file()  # inside final/
    assert (run / "validation" / "step-000002.png").exists() and (run / "validation" / "final.png").exists()
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]


def test_resume_reproduces_uninterrupted_run(setup, tmp_path):
    straight = _adapters(train(_cfg(setup, tmp_path / "a")))
    train(_cfg(setup, tmp_path / "b", "--train.max_steps", "2"))
    resumed_trainer = train(_cfg(setup, tmp_path / "b"), resume=True)
    assert resumed_trainer.history[0]["step"] == 1  # history carried over
    resumed = _adapters(resumed_trainer)
    assert straight.keys() == resumed.keys()
    worst = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    assert worst <= 1e-6, worst
    # and a run that is not resumed differs (the check can fail)
    other = _adapters(train(_cfg(setup, tmp_path / "c", "--train.seed", "1")))
    assert max((straight[k] - other[k]).abs().max().item() for k in straight) > 1e-4


def test_resume_on_another_split_of_the_same_global_batch_is_the_uninterrupted_run(setup, tmp_path):
    """Issue 34: draws are keyed by (seed, step, global sample), so a checkpoint saved by 2 processes x 1 sample
    resumed on 1 process x 2 continues exactly as the run that was never stopped (no random state to re-seed), and
    the history says how the split changed. Another global batch continues too, with its own note."""
    import json
    import shutil

    import yaml

    straight = _adapters(train(_cfg(setup, tmp_path / "straight", "--train.max_steps", "4")))
    train(_cfg(setup, tmp_path / "src", "--train.max_steps", "2"))
    shutil.copytree(tmp_path / "src", tmp_path / "split")
    state_file = tmp_path / "split" / "checkpoint-2" / "trainer_state.json"  # as if saved by 2 processes x 1
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "num_processes": 2}))
    saved_cfg = tmp_path / "split" / "checkpoint-2" / "config.yaml"
    tree = yaml.safe_load(saved_cfg.read_text())
    tree["train"]["batch_size"] = 1
    saved_cfg.write_text(yaml.safe_dump(tree))
    resumed = train(_cfg(setup, tmp_path / "split"), resume=True)
    assert all(torch.equal(straight[k], v) for k, v in _adapters(resumed).items())
    note = [h for h in resumed.history if "note" in h]
    assert len(note) == 1 and note[0]["step"] == 2, note
    assert ("on 1 process(es) x 1 micro-batch(es) of 2, saved with 2 process(es) x 1 micro-batch(es) of 1; the same "
            "global batch of 2") in note[0]["note"]
    assert [h["step"] for h in resumed.history if "note" not in h] == [1, 2, 3, 4]

    shutil.copytree(tmp_path / "src", tmp_path / "bigger")
    bigger = train(_cfg(setup, tmp_path / "bigger", "--train.batch_size", "4"), resume=True)
    note = [h["note"] for h in bigger.history if "note" in h]
    assert len(note) == 1 and "global batch 2 -> 4: the schedules, the EMA and the GAN weight go on counting" in note[0]
    assert bigger.sched_g.last_epoch == 4


def test_resume_at_another_learning_rate_uses_it(setup, tmp_path):
    """DMD2's second stage resumes a finished run at a ~20x lower lr. The optimiser's and scheduler's saved state
    both carry the old lr: before this was fixed, the resumed run kept training at 1e-3 and said nothing."""
    train(_cfg(setup, tmp_path / "r", "--train.max_steps", "2", "--optim.warmup_steps", "0"))
    t = train(_cfg(setup, tmp_path / "r", "--train.max_steps", "3", "--optim.lr_generator", "5e-5",
                   "--optim.warmup_steps", "0"), resume=True)
    assert t.opt_g.param_groups[0]["lr"] == pytest.approx(5e-5) and t.sched_g.get_last_lr() == [pytest.approx(5e-5)]
    assert t.opt_f.param_groups[0]["lr"] == pytest.approx(t.cfg.optim.lr_fake)
    assert t.history[-1]["lr_generator"] == pytest.approx(5e-5)
    notes = [h["note"] for h in t.history if "note" in h]
    assert notes == ["resumed at step 2 with optim.lr_generator 0.001 -> 5e-05 (the schedule continues from there)"]


def test_dmd2_second_stage_resumes_a_finished_run_with_the_gan_on(setup, real_latents, tmp_path):
    """DMD2's recipe: a finished run, resumed with the GAN switched on at a lower lr; then that stage resumes too."""
    import json
    import subprocess

    run = tmp_path / "stage"
    train(_cfg(setup, run, "--train.max_steps", "2"))
    gan = ["--gan.real_latents", real_latents, "--gan.start_step", "2", "--optim.lr_generator", "1e-4"]
    t = train(_cfg(setup, run, "--train.max_steps", "4", *gan), resume=True)
    notes = [h["note"] for h in t.history if "note" in h]
    assert notes[0] == "GAN on from step 2: the discriminator head starts fresh", notes
    assert "optim.lr_generator 0.001 -> 0.0001" in notes[1]
    assert "loss_gan_generator" in t.history[-1] and "loss_gan_discriminator" in t.history[-1]
    assert (run / "checkpoint-4" / "gan_head.safetensors").is_file()
    head = {k: v.clone() for k, v in t.model.gan_head.state_dict().items()}
    t2 = train(_cfg(setup, run, "--train.max_steps", "6", *gan), resume=True)  # the head and its optimiser load
    assert not [h for h in t2.history if "note" in h and h["step"] == 4]
    assert any(not torch.equal(head[k], v) for k, v in t2.model.gan_head.state_dict().items())
    assert "GAN (DMD2) | on from step 2" in (run / "final" / "README.md").read_text()
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    # the fresh head's schedule took the fake score's position at the resume (issue 25, item 2): equal lrs
    assert state["sched_discriminator"]["last_epoch"] == state["sched_fake"]["last_epoch"] == 6


def test_a_fresh_gan_head_follows_the_fake_scores_decaying_schedule(setup, real_latents, tmp_path):
    """The head's scheduler is built at step 0, before the checkpoint loads: with a decaying schedule it used to
    restart at the peak lr while the fake score's had decayed."""
    run, sched = tmp_path / "r", ("--optim.lr_scheduler", "cosine", "--optim.warmup_steps", "0")
    train(_cfg(setup, run, "--train.max_steps", "2", *sched))
    t = train(_cfg(setup, run, "--train.max_steps", "4", *sched, "--gan.real_latents", real_latents,
                   "--gan.start_step", "2"), resume=True)
    lr_fake, lr_head = t.opt_f.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"]
    assert lr_head == pytest.approx(lr_fake) and lr_fake < t.cfg.optim.lr_fake


def test_a_gan_switched_on_mid_run_follows_the_fake_scores_step_down(setup, real_latents, tmp_path):
    """DMD2's two SD1.5 stages in one run (configs/sd15_dmd2_gan.yaml): the lr steps down where gan.start_step
    switches the GAN on. The head's schedule only stepped while the GAN was on, so it used to start at the peak
    (x20 the fake score's lr at SD1.5's factor)."""
    t = train(_cfg(setup, tmp_path / "r", "--train.max_steps", "4", "--optim.lr_scheduler", "step_down",
                   "--optim.step_down_at", "0.75", "--optim.step_down_factor", "0.05", "--optim.warmup_steps", "0",
                   "--gan.real_latents", real_latents, "--gan.start_step", "3"))
    lr_fake, lr_head = t.opt_f.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"]
    assert lr_fake == pytest.approx(0.05 * t.cfg.optim.lr_fake) and lr_head == pytest.approx(lr_fake)
    assert t.sched_d.last_epoch == t.sched_f.last_epoch


def test_ema_switched_on_at_resume_starts_from_the_resumed_generator(setup, tmp_path):
    """The EMA is built before the checkpoint loads; a checkpoint without one must not hand final/ the untrained
    adapter (B = 0). Re-exporting a finished run with the EMA on, no step follows: final/ is the checkpoint's G."""
    run = tmp_path / "r"
    train(_cfg(setup, run, "--train.max_steps", "2"))
    saved = load_file(str(run / "checkpoint-2" / "generator" / "pytorch_lora_weights.safetensors"))
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0
    t = train(_cfg(setup, run, "--train.max_steps", "2", "--train.ema_decay", "0.9"), resume=True)
    final = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in saved)
    assert [h["note"] for h in t.history if "note" in h] == [
        "EMA on from step 2: it starts from the resumed generator (the checkpoint has none)"]


def test_four_step_run_records_and_samples_its_timesteps(setup, tmp_path):
    import json

    run = tmp_path / "four"
    t = train(_cfg(setup, run, "--train.max_steps", "2", "--dmd.generator_timesteps", "999", "749", "499", "249"))
    assert json.loads((run / "final" / "sd_dmd_sampling.json").read_text())["timesteps"] == [999, 749, 499, 249]
    assert json.loads((run / "checkpoint-2" / "generator" / "sd_dmd_sampling.json").read_text())["timesteps"] == [
        999, 749, 499, 249]
    card = (run / "final" / "README.md").read_text()
    assert "num_inference_steps=4, timesteps=[999, 749, 499, 249]" in card and "**4 steps**" in card
    assert "LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=4)" in card
    res = subprocess.run([sys.executable, "-m", "sd_dmd.sample", "--model", setup["pipe"], "--lora", str(run),
                          "--prompt", "a red cube", "--out", str(tmp_path / "s.png")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sampling 4 step(s) at timesteps [999, 749, 499, 249]" in res.stdout
    assert "not on the original" not in res.stderr, res.stderr[-2000:]  # LCMScheduler's off-grid warning
    assert (tmp_path / "s.png").is_file()
    # --resume may not change what the generator is
    with pytest.raises(SystemExit):
        train_text2image.main(_argv(setup, run, "--train.max_steps", "3", "--resume"))


def test_adamw8bit_and_lpips_paths(setup, tmp_path):
    from bnb_extra import need_bitsandbytes
    from diffusers import AutoencoderTiny

    need_bitsandbytes()
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    t = train(_cfg(setup, tmp_path / "r8", "--optim.optimizer", "adamw8bit", "--regression.loss", "lpips",
                   "--regression.decoder", "taesd", "--regression.tiny_vae", str(tmp_path / "taesd"),
                   "--regression.lpips_pretrained_backbone", "false", "--train.max_steps", "1"))
    assert type(t.opt_g.optimizer).__name__ == "AdamW8bit"
    h = t.history[-1]
    assert torch.isfinite(torch.tensor(h["loss_reg"])) and h["loss_reg"] > 0
    t = train(_cfg(setup, tmp_path / "vae", "--regression.loss", "lpips", "--regression.decoder", "vae",
                   "--regression.lpips_pretrained_backbone", "false", "--train.max_steps", "1", "--train.ema_decay",
                   "0.9"))
    assert t.history[-1]["loss_reg"] > 0


def test_gradient_checkpointing_same_result(setup, tmp_path):
    """Checkpointing (UNet and, for LPIPS regression, the VAE decoder) recomputes; it must not change the update."""
    args = ("--regression.loss", "lpips", "--regression.decoder", "vae", "--regression.lpips_pretrained_backbone",
            "false", "--train.max_steps", "2")
    plain = train(_cfg(setup, tmp_path / "plain", *args))
    ckpt = train(_cfg(setup, tmp_path / "ckpt", *args, "--train.gradient_checkpointing", "true"))
    assert ckpt.model.unet.is_gradient_checkpointing and ckpt.model.vae.decoder.gradient_checkpointing
    assert not plain.model.vae.decoder.gradient_checkpointing
    a, b = _adapters(plain), _adapters(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # the steps did update the adapters


def test_ttur_without_regression(setup, tmp_path):
    t = train(_cfg(setup, tmp_path / "d2", "--regression.loss", "none", "--dmd.fake_updates_per_step", "3",
                   "--train.max_steps", "2"))
    assert "loss_reg" not in t.history[-1]
    assert t.sched_f.last_epoch == 6  # 3 fake updates per generator step


def test_two_processes_keep_adapters_identical(setup, tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from safetensors.torch import save_file
from sd_dmd.config import load_config
from sd_dmd.training.loop import train
from sd_dmd.training.config import Config
from sd_dmd.models.shared_unet import GENERATOR, FAKE
cfg = load_config(Config, sys.argv[1:])[0]
t = train(cfg)
r = t.acc.process_index
save_file({{f"{{a}}.{{k}}": p.detach().contiguous() for a in (GENERATOR, FAKE)
           for k, p in t.model.adapter_named_parameters(a).items()}}, f"{{cfg.output_dir}}/rank{{r}}.safetensors")
json.dump(t.history, open(f"{{cfg.output_dir}}/history{{r}}.json", "w"))
""")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(harness),
           *_argv(setup, out, "--train.max_steps", "3")]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "generator" in k and "lora_B" in k)
    import json

    h0, h1 = (json.loads((out / f"history{r}.json").read_text()) for r in (0, 1))
    assert all(torch.isfinite(torch.tensor(v)) for h in h0 for k, v in h.items())
    # every rank logs the global batch's means (issue 34): the same history but for its own clock
    assert [{k: v for k, v in h.items() if k != "samples_per_s"} for h in h0] == \
        [{k: v for k, v in h.items() if k != "samples_per_s"} for h in h1]


def _fails(argv, capsys, match):
    assert_one_line_error(train_text2image.main, argv, capsys, match)


@pytest.mark.parametrize("extra,match", [
    (["--dmd.t_min", "500", "--dmd.t_max", "400"], "t_min"),
    (["--dmd.real_guidance_scale", "-1"], "real_guidance_scale"),
    (["--model.resolution", "20"], "multiple of 8"),
    (["--lora.generator.rank", "0"], "lora.generator.rank"),
    (["--dmd.nope", "1"], "dmd.nope"),
    (["--train.max_steps", "many"], "train.max_steps"),
])
def test_bad_config_one_line_error(setup, tmp_path, capsys, extra, match):
    _fails(_argv(setup, tmp_path / "x", *extra), capsys, match)
    assert not (tmp_path / "x").exists()


def test_refuses_other_run_dir_and_other_store(setup, tmp_path, capsys, tiny_pipe_dir):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.yaml").write_text("output_dir: busy\n")
    _fails(_argv(setup, out), capsys, "--resume")
    assert (out / "config.yaml").read_text() == "output_dir: busy\n"
    _fails(_argv(setup, tmp_path / "y", "--model.resolution", "32"), capsys, "resolution")


def test_dry_run_prints_config(setup, tmp_path, capsys):
    assert train_text2image.main(_argv(setup, tmp_path / "z", "--dry-run")) == 0
    assert "real_guidance_scale: 3.0" in capsys.readouterr().out
    assert not (tmp_path / "z").exists()
