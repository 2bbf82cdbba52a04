"""Mixed precision, 8-bit checkpoints, resumes and re-runs that mean what they say (issue 13, items 2, 4, 5)."""
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import assert_one_line_error

import train_text2image
from sd_dmd.config import ConfigError, load_config
from sd_dmd.models.shared_unet import FAKE, GENERATOR
from sd_dmd.training.loop import Trainer, train
from sd_dmd.training.config import Config, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state; a test that changes the mixed precision resets it around itself."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def argv(setup, out, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.pairs_dir", setup["pairs"], "--data.prompts", setup["prompts"], "--output_dir", str(out),
            *extra]


def cfg_of(setup, out, *extra) -> Config:
    return load_config(Config, argv(setup, out, *extra))[0]


def adapters(t):
    return {f"{a}.{k}": p.detach().clone() for a in (GENERATOR, FAKE) for k, p in t.model.adapter_named_parameters(a).items()}


# ----- item 2: 8-bit AdamW + EMA + TTUR 2 + bf16 autocast: save, resume, bit-exact ------------------------
def test_adamw8bit_ema_ttur_bf16_resume_is_bit_exact(setup, tmp_path, fresh_accelerate):
    from bnb_extra import need_bitsandbytes

    need_bitsandbytes()
    opts = ("--optim.optimizer", "adamw8bit", "--train.ema_decay", "0.9", "--dmd.fake_updates_per_step", "2",
            "--train.mixed_precision", "bf16", "--checkpointing.every", "2")
    straight = train(cfg_of(setup, tmp_path / "a", *opts))
    assert straight.acc.mixed_precision == "bf16" and straight.model.weight_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in straight.gen_params + straight.fake_params)  # LoRA stays fp32
    train(cfg_of(setup, tmp_path / "b", *opts, "--train.max_steps", "2"))
    assert (tmp_path / "b" / "checkpoint-2" / "optimizer_generator.safetensors").exists()
    resumed = train(cfg_of(setup, tmp_path / "b", *opts), resume=True)
    a, b = adapters(straight), adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.shadow_params, resumed.ema.shadow_params))
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 4
    # each checkpoint also holds the EMA generator as a LoRA diffusers loads: final/ is the last one's EMA
    from safetensors.torch import load_file

    ema_lora = load_file(str(tmp_path / "a" / "checkpoint-4" / "generator_ema" / "pytorch_lora_weights.safetensors"))
    final = load_file(str(tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors"))
    raw = load_file(str(tmp_path / "a" / "checkpoint-4" / "generator" / "pytorch_lora_weights.safetensors"))
    assert ema_lora.keys() == final.keys() and all(torch.equal(ema_lora[k], final[k]) for k in final)
    assert any(not torch.equal(ema_lora[k], raw[k]) for k in raw)


# ----- item 4: precision is what the user asked for ----------------------------------------------------
def test_precision_follows_accelerate_launch_and_refuses_conflicts(setup, tmp_path):
    cfg = cfg_of(setup, tmp_path, "--model.weight_dtype", "auto")
    resolve_precision(cfg, "bf16")  # accelerate launch --mixed_precision bf16, config left at auto
    assert (cfg.train.mixed_precision, cfg.model.weight_dtype) == ("bf16", "bf16")
    cfg = cfg_of(setup, tmp_path, "--model.weight_dtype", "auto")
    resolve_precision(cfg, None)
    assert (cfg.train.mixed_precision, cfg.model.weight_dtype) == ("no", "fp32")
    with pytest.raises(ConfigError, match="'fp16'.*'bf16'"):
        resolve_precision(cfg_of(setup, tmp_path, "--train.mixed_precision", "fp16"), "bf16")
    for dt in ("fp16", "bf16"):  # half weights without autocast: refused, naming both keys
        with pytest.raises(ConfigError, match=f"model.weight_dtype: {dt}.*train.mixed_precision"):
            resolve_precision(cfg_of(setup, tmp_path, "--model.weight_dtype", dt, "--train.mixed_precision", "no"))
    defaults = Config()
    assert (defaults.train.mixed_precision, defaults.model.weight_dtype) == ("auto", "auto")


def test_launch_precision_reaches_the_accelerator(setup, tmp_path, monkeypatch, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    t = train(cfg_of(setup, tmp_path / "r", "--train.max_steps", "1", "--model.weight_dtype", "auto"))
    assert t.acc.mixed_precision == "bf16" and t.model.weight_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t.gen_params)


def test_fp16_on_cpu_is_refused_not_silently_fp32(setup, tmp_path, fresh_accelerate):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        Trainer(cfg_of(setup, tmp_path, "--train.mixed_precision", "fp16"), Accelerator(mixed_precision="fp16"))


def _with_scaler(t: Trainer, init_scale: float) -> torch.amp.GradScaler:
    """The fp16 plumbing (one GradScaler shared by both prepared optimisers) on CPU: the same objects accelerate
    builds on a GPU, minus autocast."""
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    t.acc.scaler = scaler
    t.opt_g = AcceleratedOptimizer(t.opt_g.optimizer, scaler=scaler)
    t.opt_f = AcceleratedOptimizer(t.opt_f.optimizer, scaler=scaler)
    return scaler


def test_grad_scaler_unscales_before_norm_and_an_overflow_moves_nothing(setup, tmp_path):
    from diffusers.training_utils import EMAModel

    def trainer():
        torch.manual_seed(0)
        t = Trainer(cfg_of(setup, tmp_path, "--optim.max_grad_norm", "0"), Accelerator(mixed_precision="no"),
                    log=lambda *a, **k: None)
        t.ema = EMAModel(t.gen_params, decay=0.9)
        return t

    plain, scaled = trainer(), trainer()
    try:
        _with_scaler(scaled, 2.0 ** 10)
        s_plain, _ = plain.train_step()
        s_scaled, applied = scaled.train_step()
        assert applied
        # the logged norms are the true (unscaled) ones, and the update equals the unscaled run's
        for k in ("grad_norm_generator", "grad_norm_fake"):
            assert s_scaled[k] == pytest.approx(s_plain[k], rel=1e-5), k
        a, b = adapters(plain), adapters(scaled)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
        # an overflowing scale: nothing moves, the scale drops, LR schedule and EMA stay
        scaler = _with_scaler(scaled, 3e38)
        before, lr_steps, ema_steps = adapters(scaled), scaled.sched_g.last_epoch, scaled.ema.optimization_step
        stats, applied = scaled.train_step()
        assert not applied
        after = adapters(scaled)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert scaled.sched_g.last_epoch == lr_steps and scaled.ema.optimization_step == ema_steps
        assert scaler.get_scale() < 3e38
    finally:
        scaled.acc.scaler = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_autocast_training_on_cuda(setup, tmp_path, fresh_accelerate):
    t = train(cfg_of(setup, tmp_path / "r", "--train.mixed_precision", "fp16", "--model.weight_dtype", "auto",
                     "--train.max_steps", "3", "--optim.max_grad_norm", "0"))
    assert t.acc.scaler is not None and t.model.weight_dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in t.gen_params + t.fake_params)
    assert all(torch.isfinite(torch.tensor(h["grad_norm_generator"])) for h in t.history)
    assert max(h["grad_norm_generator"] for h in t.history) < 1e3  # unscaled (a scaled norm is ~65536x larger)


# ----- item 3 (single process): a skipped step is really skipped ---------------------------------------------
def test_nonfinite_teacher_sample_skips_every_update(setup, tmp_path, monkeypatch):
    from diffusers.training_utils import EMAModel

    from sd_dmd.models.shared_unet import DMDModel

    pair = DMDModel.dm_denoisers

    def nan_real(self):
        f, fake = pair(self)

        def g(x_t, t, cond):
            out = f(x_t, t, cond).clone()
            out[0] = float("nan")  # one sample, as an fp16 overflow in the teacher gives
            return out

        return g, fake

    torch.manual_seed(0)
    t = Trainer(cfg_of(setup, tmp_path), Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    t.ema = EMAModel(t.gen_params, decay=0.9)
    t.train_step()
    monkeypatch.setattr(DMDModel, "dm_denoisers", nan_real)
    before = adapters(t)
    sched = (t.sched_g.last_epoch, t.sched_f.last_epoch, t.ema.optimization_step)
    opt_state = {k: v.clone() for st in t.opt_g.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)}
    stats, applied = t.train_step()
    assert not applied
    after = adapters(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (t.sched_g.last_epoch, t.sched_f.last_epoch, t.ema.optimization_step) == sched
    now = {k: v for st in t.opt_g.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)}
    assert all(torch.equal(opt_state[k], now[k]) for k in opt_state)


# ----- item 5: resumes and re-runs never silently change what a directory means ------------------------------
def test_conflicting_resume_fails_before_writing(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_of(setup, out, "--train.max_steps", "2"))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train_text2image.main(argv(setup, out, "--resume", "--lora.generator.rank", "8", "--model.resolution", "32"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "lora.generator.rank: 4 -> 8" in err[-1] and "model.resolution: 16 -> 32" in err[-1]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing written
    t = train(cfg_of(setup, out, "--train.max_steps", "3", "--optim.lr_generator", "1e-4"), resume=True)  # allowed
    assert t.step == 3


def logged_steps(run: Path) -> list:
    """Steps of the loss_dm curve TensorBoard shows for the run (all its event files together)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for f in sorted(run.joinpath("logs").rglob("events.*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        if "loss_dm" in ea.Tags()["scalars"]:
            steps += [e.step for e in ea.Scalars("loss_dm")]
    return steps


def test_overwrite_leaves_nothing_of_the_old_run(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_of(setup, out, "--train.max_steps", "4", "--logging.tracker", "tensorboard",
                 "--logging.validation_every", "1"))
    assert logged_steps(out) == [1, 2, 3, 4] and (out / "validation" / "step-000004.png").exists()
    train(cfg_of(setup, out, "--train.max_steps", "2", "--logging.tracker", "tensorboard"), overwrite=True)
    assert logged_steps(out) == [1, 2]  # not 1, 2, 3, 4, 1, 2 in one curve
    assert not (out / "validation" / "step-000004.png").exists() and not (out / "checkpoint-4").exists()
    (out / "my_notes.txt").write_text("keep me")  # not a run artefact: --overwrite refuses to delete it
    assert_one_line_error(train_text2image.main, argv(setup, out, "--overwrite"), capsys, "my_notes.txt")
    assert (out / "my_notes.txt").exists() and (out / "checkpoint-2").exists()


def test_pairs_made_with_another_guidance_are_refused(setup, tmp_path, capsys):
    assert_one_line_error(train_text2image.main, argv(setup, tmp_path / "g", "--dmd.real_guidance_scale", "1.75"),
                          capsys, "guidance")
    assert not (tmp_path / "g").exists()
    t = train(cfg_of(setup, tmp_path / "ok", "--dmd.real_guidance_scale", "1.75", "--train.max_steps", "1",
                     "--regression.allow_guidance_mismatch", "true"))
    assert t.step == 1


def test_missing_tracker_is_an_error_at_start(setup, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert_one_line_error(train_text2image.main, argv(setup, tmp_path / "w", "--logging.tracker", "wandb"), capsys,
                          "pip install 'sd_dmd[wandb]'")
    assert not (tmp_path / "w").exists()


# ----- issue 25, item 1: several optimisers stepped in one fp16 decision ---------------------------------------
@pytest.mark.parametrize("n_groups", [2, 3])
def test_every_optimiser_in_one_fp16_decision_gets_its_true_gradient(n_groups):
    """The fake LoRA and the GAN head (and any further group) step in one decision: under a GradScaler each
    parameter's applied gradient equals the fp32 run's, and the scale is updated once per decision. SGD at lr 1
    makes the applied gradient readable: the update is -grad."""
    from types import SimpleNamespace

    from accelerate.optimizer import AcceleratedOptimizer

    from sd_dmd.training.turns import apply_gradients

    Accelerator(mixed_precision="no")  # AcceleratedOptimizer reads accelerate's process state
    true_grads = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(n_groups)]

    def run(scale):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        updates = []
        if scaler is not None:
            real_update = scaler.update
            scaler.update = lambda *a: (updates.append(1), real_update(*a))[1]
        params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(n_groups)]
        groups = []
        for p in params:
            opt = AcceleratedOptimizer(torch.optim.SGD([p], lr=1.0), scaler=scaler)
            groups.append(([p], opt, torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda _: 1.0)))
        loss = sum((p * g).sum() for p, g in zip(params, true_grads))  # d loss / d p = g
        (scaler.scale(loss) if scaler is not None else loss).backward()
        acc = SimpleNamespace(scaler=scaler, num_processes=1, device=torch.device("cpu"))
        norm, applied = apply_gradients(acc, groups, {"loss": 1.0}, max_norm=0)
        assert applied
        return [-p.detach().clone() for p in params], norm, len(updates)

    fp32, norm32, _ = run(None)
    for scale in (2.0 ** 10, 2.0 ** 16):
        got, norm, n_updates = run(scale)
        for g, ref in zip(got, fp32):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=0)
        assert norm == pytest.approx(norm32, rel=1e-5)
        assert n_updates == 1
