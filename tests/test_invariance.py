"""Issue 34: a run that scales out changes only its speed. The invariance matrix.

Each stateful feature trains N = 4 steps of one global batch B = 4 split three ways: 1 process x 1 micro-batch of 4,
1 x 2 of 2 (gradient accumulation), 2 processes x 1 of 2 (gloo on CPU). Every split must write the same
``checkpoint-4/``: every tensor the run saves (both LoRAs, the GAN head, the EMA, every optimiser's state), the LR
schedules' positions and rates, the adaptive GAN weight's smoothed ratio, and the logged history (losses, GAN weight,
gradient ratio, learning rates). A run resumed at step 2 on another split (before the step-down and the GAN's start
at step 3, so the resumed part crosses both) must write the same checkpoint as the run that was never stopped.

How a new stateful part joins: save it in the checkpoint (training/state.py), and the comparison below reads it;
switch it on in one of FEATURES (docs/RELIABILITY.md, "What scales").

Tolerance (``RTOL`` below): the splits add the same per-sample terms in another order (a mean over 4 against the
mean of two means over 2; an all-reduce's sum), so they agree to float32 reassociation, ~1e-7 relative per
reduction, amplified a little by 4 Adam steps. The splits measured 2.4e-6 at most (relative to each tensor's own
scale) on this 2-core machine; RTOL = 1e-4 leaves 40x room, and each planted defect below misses it by orders of
magnitude (printed when the test fails).

Budget: two feature sets cover every stateful part (one with the GAN fixed on the fake score's features, one with
everything else at once), so the matrix costs 2 x (3 runs + 1 resume) + the planted defects, and two 2-process launches.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_dmd.config import load_config
from sd_dmd.training import gan_weight as gan_weight_module
from sd_dmd.training import state as state_module
from sd_dmd.training.config import Config
from sd_dmd.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-3
N, B = 4, 4
SPLITS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes x micro-batches

FEATURES = {
    # regression, DMD2's GAN with fixed weights on the fake score's features, from step 0; f-distill's JS weights
    # (their ratio statistics across steps) and an Anti-CFG fake score in the DM loss (issue 36)
    "gan_fixed": ["--gan.start_step", "0", "--dmd.divergence", "js", "--dmd.fake_guidance", "-0.5"],
    # regression, the adaptive GAN weight on the teacher's features with R1, switched on at step 3; four-step
    # backward simulation; EMA; TTUR 2; the step-down at step 3; gradient checkpointing in its 1 x 2 split
    "gan_adaptive_all": ["--gan.weight_mode", "adaptive", "--gan.target_ratio", "0.5", "--gan.start_step", "3",
                         "--gan.features", "teacher", "--gan.r1_weight", "0.1",
                         "--dmd.generator_timesteps", "999", "749", "499", "249", "--train.ema_decay", "0.9",
                         "--dmd.fake_updates_per_step", "2", "--optim.lr_scheduler", "step_down",
                         "--optim.step_down_at", "0.75", "--optim.step_down_factor", "0.1"],
}

# the adaptive weight's accumulation path (a second backward through G's last call) under gradient checkpointing, as
# users run it at SD scale: the 1 x 2 split of that feature set checkpoints, and must still equal 1 x 1
SPLIT_EXTRA = {("gan_adaptive_all", "1x2"): ["--train.gradient_checkpointing", "true"]}

HARNESS = r'''
import sys
sys.path.insert(0, {root!r})
import torch
import sd_dmd.models.shared_unet as su
su._group_norm = lambda c: torch.nn.GroupNorm(1, c)  # as the fixture below
from sd_dmd.config import load_config
from sd_dmd.training.config import Config
from sd_dmd.training.loop import train
train(load_config(Config, sys.argv[1:])[0], resume="--checkpointing.resume_from" in sys.argv)
'''


@pytest.fixture(autouse=True)
def one_group_head(monkeypatch):
    """The tiny UNet's 64-channel bottleneck leaves 2 numbers per GroupNorm group in the GAN head's last layer (1x1,
    32 groups; DMD2's 1280 channels at SD1.5/SDXL leave 40). Normalising 2 numbers amplifies float32 reassociation
    ~100x per step (measured: the head's gradient 1e-4 relative apart between 1x1 and 1x2 at step 0, 1e-2 at step 1;
    with one group, 9e-7 and 4e-6), which would hide the machinery's behaviour under the head's. The matrix trains
    a one-group head; what it tests (draws, accumulation, reductions, the ratio, schedules, resume) is the same."""
    import sd_dmd.models.shared_unet as su

    monkeypatch.setattr(su, "_group_norm", lambda c: torch.nn.GroupNorm(1, c))


def argv(setup, real, out: Path, feature: str, split: str, *extra) -> list[str]:
    procs, micro = SPLITS[split]
    per = B // (procs * micro)  # samples per micro-batch
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.pairs_dir", setup["pairs"], "--data.prompts", setup["prompts"], "--output_dir", str(out),
            "--gan.real_latents", real, "--train.max_steps", str(N), "--checkpointing.every", "2",
            "--checkpointing.keep_last", "0", "--train.batch_size", str(per),
            "--train.gradient_accumulation_steps", str(micro), "--regression.batch_size", str(per // 2 or 1),
            "--gan.batch_size", str(per), *FEATURES[feature], *SPLIT_EXTRA.get((feature, split), []), *extra]


def run(setup, real, out: Path, feature: str, split: str, *extra, resume: bool = False) -> Path:
    args = argv(setup, real, out, feature, split, *extra)
    if SPLITS[split][0] == 1:
        train(load_config(Config, args)[0], resume=resume)
        return out
    harness = out.parent / "harness.py"
    harness.write_text(HARNESS.format(root=str(ROOT)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(harness), *args,
           *(["--checkpointing.resume_from", "latest"] if resume else [])]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


# ----- the comparison: everything a checkpoint holds --------------------------------------------------------------
IGNORED = {"num_processes", "samples_per_s", "note"}  # how the run was split, its clock, its resume notes


def _close(a: float, b: float, scale: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= RTOL * max(scale, 1e-30))


def _compare_json(a, b, where: str, out: list, worst: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if "note" in a or "note" in b:
            return
        for k in (set(a) | set(b)) - IGNORED:
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'one' if k in a else 'the other'}")
            else:
                _compare_json(a[k], b[k], f"{where}/{k}", out, worst)
    elif isinstance(a, list) and isinstance(b, list):
        a_, b_ = ([h for h in v if not (isinstance(h, dict) and "note" in h)] for v in (a, b))
        if len(a_) != len(b_):
            out.append(f"{where}: {len(a_)} entries against {len(b_)}")
        for i, (x, y) in enumerate(zip(a_, b_)):
            _compare_json(x, y, f"{where}[{i}]", out, worst)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        worst.append((abs(a - b) / max(abs(b), 1e-30) if a != b else 0.0, where))
        if not _close(float(a), float(b), abs(float(b))):
            out.append(f"{where}: {a!r} against {b!r}")
    elif a != b:
        out.append(f"{where}: {a!r} against {b!r}")


def compare_checkpoints(a: Path, b: Path) -> tuple[list[str], float]:
    """Every difference beyond RTOL between two checkpoint directories, and the largest relative difference seen
    (tensors: max |a - b| over max |b|, per tensor; numbers: relative)."""
    diffs, worst = [], []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "config.yaml"}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "config.yaml"}
    if files_a != files_b:
        diffs.append(f"files: {sorted(map(str, files_a ^ files_b))} in one checkpoint only")
    for rel in sorted(files_a & files_b):
        if rel.suffix == ".safetensors":
            ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
            if ta.keys() != tb.keys():
                diffs.append(f"{rel}: other tensors")
                continue
            for k in ta:
                x, y = ta[k].double(), tb[k].double()
                scale, err = y.norm().item(), (x - y).norm().item()
                worst.append((err / max(scale, 1e-30) if err else 0.0, f"{rel}:{k}"))
                if err > RTOL * max(scale, 1e-30):
                    diffs.append(f"{rel}:{k}: |diff| {err:.3g} against |tensor| {scale:.3g} (max |diff| "
                                 f"{(x - y).abs().max().item():.3g})")
        elif rel.suffix == ".json":
            _compare_json(json.loads((a / rel).read_text()), json.loads((b / rel).read_text()), str(rel), diffs,
                          worst)
    top = max(worst, default=(0.0, ""))
    print(f"  largest: {top[1]} {top[0]:.2g}")
    return diffs, top[0]


def assert_same(a: Path, b: Path, what: str) -> float:
    diffs, worst = compare_checkpoints(a, b)
    assert not diffs, f"{what}: {len(diffs)} difference(s) beyond rtol {RTOL}:\n" + "\n".join(diffs[:20])
    return worst


# ----- the matrix ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_split_and_resume_trains_the_same_run(train_setup, real_latents, tmp_path, feature):
    runs = {split: run(train_setup, real_latents, tmp_path / split, feature, split) for split in SPLITS}
    ref = runs["1x1"] / f"checkpoint-{N}"
    worst = {split: assert_same(runs[split] / f"checkpoint-{N}", ref, f"{feature}: {split} against 1x1")
             for split in ("1x2", "2x1")}
    # resumed at step 2 on another split: the 2-process run's checkpoint on 1 process x 2 micro-batches
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["2x1"] / "checkpoint-2", resumed / "checkpoint-2")
    run(train_setup, real_latents, resumed, feature, "1x2", resume=True)
    worst["2x1 -> 1x2 at step 2"] = assert_same(resumed / f"checkpoint-{N}", ref, f"{feature}: resumed against 1x1")
    history = json.loads((resumed / f"checkpoint-{N}" / "trainer_state.json").read_text())["history"]
    assert any("the same global batch of 4" in h.get("note", "") for h in history)
    print(f"{feature}: largest relative difference against 1x1: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))


# ----- each defect of issue 34, planted again: the matrix must see it -----------------------------------------------
class _PerMicroBatch(gan_weight_module.Deferred):
    """Defect 1 as it was: the adaptive ratio updated once per micro-batch, each micro-batch at its own weight."""

    def __call__(self, sq_gan, sq_dm, term):
        self.w = self.weight(sq_gan, sq_dm)
        return self.w

    def finish(self):
        return self.w


def test_the_matrix_catches_a_per_micro_batch_adaptive_ratio(train_setup, real_latents, tmp_path, monkeypatch):
    feature = "gan_adaptive_all"
    ref = run(train_setup, real_latents, tmp_path / "1x1", feature, "1x1") / f"checkpoint-{N}"
    fixed = run(train_setup, real_latents, tmp_path / "fixed", feature, "1x2") / f"checkpoint-{N}"
    assert_same(fixed, ref, "the fix")
    from sd_dmd.training import turns

    monkeypatch.setattr(turns, "Deferred", _PerMicroBatch)
    planted = run(train_setup, real_latents, tmp_path / "planted", feature, "1x2") / f"checkpoint-{N}"
    diffs, worst = compare_checkpoints(planted, ref)
    assert any("gan_weight/ema" in d for d in diffs) and any("gan_weight_generator" in d for d in diffs), diffs
    assert worst > 10 * RTOL, worst
    print(f"planted defect 1: {len(diffs)} difference(s), largest relative {worst:.2g}:", *diffs[:8], sep="\n  ")


def test_a_resume_with_more_fake_updates_per_step_puts_the_fake_schedules_where_the_new_run_is(
        train_setup, real_latents, tmp_path, monkeypatch):
    """Defect 2: 1 -> 2 fake updates per step, resumed at step 2 of 4, just after the step-down (at step 2). The
    fake score's and the head's schedules must stand where an uninterrupted run with 2 stands (position, learning
    rate) right after the resume and at the end; planted again (the saved count read in the new units), the fake
    score and the head run at 4x their rate."""
    from accelerate import Accelerator

    from sd_dmd.training.loop import Trainer

    feature = "gan_fixed"
    extra = ["--optim.lr_scheduler", "step_down", "--optim.step_down_at", "0.5", "--optim.step_down_factor", "0.25"]
    k2, k1 = ["--dmd.fake_updates_per_step", "2"], ["--dmd.fake_updates_per_step", "1"]
    straight = run(train_setup, real_latents, tmp_path / "straight", feature, "1x1", *extra, *k2)
    src = run(train_setup, real_latents, tmp_path / "src", feature, "1x1", *extra, *k1)

    def loaded(ckpt: Path) -> dict:
        """The fake score's and the head's (position, lr) right after loading ``ckpt`` into a k = 2 run."""
        cfg = load_config(Config, argv(train_setup, real_latents, tmp_path / "probe", feature, "1x1", *extra, *k2))[0]
        t = Trainer(cfg, Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
        t.load_checkpoint(ckpt)
        return {"fake": (t.sched_f.last_epoch, t.opt_f.param_groups[0]["lr"]),
                "head": (t.sched_d.last_epoch, t.opt_d.param_groups[0]["lr"])}

    def schedules(run_dir: Path) -> dict:
        st = json.loads((run_dir / f"checkpoint-{N}" / "trainer_state.json").read_text())
        return {k: (st[k]["last_epoch"], st[k]["_last_lr"]) for k in ("sched_fake", "sched_discriminator")}

    want = loaded(straight / "checkpoint-2")
    assert want["fake"][0] == 4 and want["fake"] == want["head"]
    assert loaded(src / "checkpoint-2") == want
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(src / "checkpoint-2", resumed / "checkpoint-2")
    run(train_setup, real_latents, resumed, feature, "1x1", *extra, *k2, resume=True)
    assert schedules(resumed) == schedules(straight)
    history = json.loads((resumed / f"checkpoint-{N}" / "trainer_state.json").read_text())["history"]
    assert any("dmd.fake_updates_per_step 1 -> 2: the fake score's schedule moves from update 2 to 4" in h.get("note", "")
               for h in history)

    monkeypatch.setattr(state_module, "_convert_fake_positions", lambda t, *a: (0, []))
    bad = loaded(src / "checkpoint-2")
    assert bad["fake"][1] == pytest.approx(4 * want["fake"][1]) and bad["head"][1] == pytest.approx(4 * want["head"][1])
