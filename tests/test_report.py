"""python -m sd_dmd.report: a run's curves and its health rules (docs/HEALTH.md). Each rule fires on a history
made to break it and on no healthy one; a real tiny run writes final/curves.png and the command reads it back."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sd_dmd.outputs import report as rp

ROOT = Path(__file__).resolve().parents[1]

# Measured runs behind the thresholds (docs/HEALTH.md), rounded to 3 digits. A: the DMD recipe, configs/digits_dmd.yaml,
# 200 steps logged every 5 (healthy). B: configs/digits_dmd2_gan.yaml broken on purpose (G lr 1e-3, eps fake loss,
# CFG 3, no EMA, TTUR 1, gan.discriminator_weight 10 = 1000x DMD2's), stopped at step 118, logged every 5.
RUN_A = {
    "loss_dm": [0.0723, 0.112, 0.0684, 0.404, 0.551, 0.426, 0.239, 0.256, 0.145, 0.177, 0.203, 0.265, 0.165, 0.182,
                0.218, 0.198, 0.206, 0.142, 0.196, 0.233, 0.224, 0.288, 0.262, 0.257, 0.239, 0.224, 0.328, 0.31, 0.31,
                0.176, 0.163, 0.241, 0.162, 0.171, 0.196, 0.18, 0.187, 0.184, 0.193, 0.175],
    "loss_fake": [0.399, 0.568, 0.539, 0.472, 0.574, 0.388, 0.393, 0.4, 0.462, 0.337, 0.359, 0.461, 0.444, 0.35, 0.36,
                  0.315, 0.361, 0.415, 0.418, 0.336, 0.412, 0.374, 0.436, 0.412, 0.474, 0.422, 0.339, 0.439, 0.431,
                  0.358, 0.395, 0.364, 0.359, 0.418, 0.363, 0.433, 0.415, 0.348, 0.33, 0.391],
    "dm_real_fake_gap": [0.0911, 0.127, 0.111, 0.251, 0.332, 0.269, 0.19, 0.193, 0.133, 0.144, 0.175, 0.196, 0.144,
                         0.17, 0.182, 0.155, 0.18, 0.134, 0.163, 0.176, 0.166, 0.221, 0.191, 0.205, 0.208, 0.182, 0.226,
                         0.213, 0.202, 0.157, 0.144, 0.183, 0.142, 0.153, 0.148, 0.161, 0.147, 0.148, 0.148, 0.151],
    "eq8_weight": [2.8, 2.73, 2.64, 2.59, 2.46, 2.75, 2.83, 2.99, 2.97, 3.15, 3.04, 3.13, 2.97, 2.67, 2.9, 3.16, 2.87,
                   2.94, 2.88, 3.09, 3.1, 2.81, 2.94, 2.77, 2.56, 2.8, 2.92, 2.97, 3.19, 2.79, 2.93, 3.08, 3.04, 2.86,
                   3.21, 2.91, 3.11, 3.08, 3.2, 2.9],
    "grad_norm_generator": [0.931, 2.16, 0.879, 3.23, 3.88, 2.15, 0.885, 0.632, 0.576, 0.451, 0.763, 0.622, 0.298,
                            0.565, 0.832, 0.443, 0.543, 0.327, 0.923, 0.458, 0.505, 1.43, 0.732, 1.15, 1.74, 0.41, 1.57,
                            1.01, 0.957, 0.832, 0.316, 0.396, 0.378, 0.224, 0.29, 0.299, 0.212, 0.251, 0.273, 0.176],
    "lr_generator": [7.5e-05, 0.00015, 0.000225] + [0.0003] * 37,
}
RUN_B = {
    "loss_dm": [0.23, 0.395, 0.456, 1.37, 4.73, 0.657, 0.219, 0.708, 0.174, 1.57, 0.147, 0.991, 0.31, 0.727, 1.15,
                2.26, 1.3, 1.23, 1.39, 0.988, 0.988, 1.39, 1.09],
    "loss_fake": [0.342, 0.324, 0.62, 0.525, 0.347, 0.266, 0.294, 0.493, 0.507, 0.358, 0.756, 0.379, 0.795, 0.502,
                  0.688, 0.418, 0.442, 0.375, 0.339, 0.358, 0.379, 0.318, 0.406],
    "dm_real_fake_gap": [0.187, 0.286, 0.472, 0.874, 1.02, 0.508, 0.408, 0.765, 0.454, 0.976, 0.635, 1.29, 0.748,
                         1.09, 1.16, 1.08, 0.996, 0.6, 0.742, 0.558, 0.59, 0.663, 0.824],
    "eq8_weight": [2.36, 2.26, 1.52, 1.74, 2.34, 1.87, 1.44, 1.55, 1.37, 1.49, 0.813, 1.18, 1.14, 0.908, 1.27, 1.48,
                   1.37, 1.96, 1.83, 2.07, 1.86, 1.95, 1.5],
    "grad_norm_generator": [0.286, 0.875, 1.2, 1.26, 1.47, 1.13, 2.51, 3.71, 1.71, 9.98, 3.98, 9.49, 1.46, 4.25, 7.9,
                            3.52, 3.12, 2.37, 1.58, 1.78, 2.37, 2.12, 0.854],
    "lr_generator": [0.00025, 0.0005, 0.00075] + [0.001] * 20,
    "gan_d_real_acc": [0.375, 0.406, 0.625, 0.812, 0.656, 0.406, 0.531, 0.938, 0.281, 0.812, 0.875, 0.906, 0.625,
                       0.969, 0.625, 0.844, 0.75, 0.719, 1.0, 0.875, 0.781, 0.875, 0.875],
    "gan_d_fake_acc": [0.625, 0.75, 0.812, 0.156, 0.469, 0.562, 0.531, 0.562, 0.406, 0.625, 0.875, 0.875, 0.969, 0.469,
                       1.0, 0.75, 0.312, 0.938, 0.656, 0.562, 0.969, 0.875, 0.75],
}
# docs/RESULTS.md's discriminator logs (every 50 steps, real / generated accuracy): a healthy GAN run, and the one
# whose discriminator hardly separated (its GAN added nothing: 115.9 digits-FID against 113.4 without it)
RESULTS_X64_SECOND_STAGE = [(0.47, 0.55), (0.69, 0.42), (0.53, 0.77), (0.48, 0.86), (0.81, 0.5), (0.56, 0.84),
                            (0.58, 0.8), (0.77, 0.61), (0.75, 0.7), (0.72, 0.69), (0.53, 0.89), (0.69, 0.91),
                            (0.84, 0.44), (0.52, 0.7), (0.94, 0.47), (0.7, 0.7), (0.55, 0.81), (0.69, 0.67),
                            (0.36, 0.94), (0.77, 0.48), (0.69, 0.72), (0.44, 0.95), (0.72, 0.83), (0.7, 0.77),
                            (0.48, 0.84), (0.72, 0.73), (0.67, 0.72), (0.7, 0.72), (0.67, 0.62), (0.58, 0.78),
                            (0.73, 0.7), (0.69, 0.72), (0.61, 0.83), (0.73, 0.69), (0.7, 0.77), (0.77, 0.56)]
RESULTS_4STEP = [(0.52, 0.66), (0.61, 0.61), (0.81, 0.38), (0.52, 0.81), (0.55, 0.55), (0.64, 0.48), (0.66, 0.41),
                 (0.62, 0.61)]
RESULTS_DMD_GAN_REGRESSION = [(0.53, 0.56), (0.75, 0.22), (0.94, 0.25), (0.69, 0.41), (0.53, 0.56), (0.5, 0.5),
                              (0.56, 0.34), (0.59, 0.31)]


def _measured(run, every=5):
    n = len(run["loss_dm"])
    return [{"step": every * (i + 1), "nonfinite_total": 0, **{k: v[i] for k, v in run.items()}} for i in range(n)]


def _accuracies(pairs, every=50):
    return [{"step": every * (i + 1), "gan_d_real_acc": r, "gan_d_fake_acc": f} for i, (r, f) in enumerate(pairs)]


def healthy(n=40, every=5, warmup=20, gan=False, seed=0):
    """A history shaped like the digits runs' (levels and noise of docs/HEALTH.md's measurements)."""
    rng = random.Random(seed)
    u = lambda: rng.uniform(-1, 1)  # noqa: E731
    out = []
    for i in range(1, n + 1):
        s = i * every
        h = {"step": s, "loss_dm": 0.2 * (1 + 0.15 * u()), "loss_reg": 0.2 * (1 + 0.1 * u()),
             "loss_fake": 0.4 * (1 + 0.15 * u()), "dm_real_fake_gap": 0.17 * (1 + 0.15 * u()),
             "eq8_weight": 2.9 * (1 + 0.05 * u()),
             "grad_norm_generator": 0.6 * (1 + 0.5 * u()), "grad_norm_fake": 0.3 * (1 + 0.5 * u()),
             "lr_generator": 3e-4 * min(1.0, s / warmup), "nonfinite_total": 0, "fake_updates_skipped": 0}
        if gan:
            h.update(gan_d_real_acc=0.68 + 0.15 * u(), gan_d_fake_acc=0.66 + 0.15 * u(),
                     loss_gan_generator=0.8 + 0.1 * u(), loss_gan_discriminator=1.2 + 0.1 * u())
        out.append(h)
    return out


def _scale(history, key, f):
    """``key`` times ``f(fraction of the run)`` in every logged entry."""
    n = len(history)
    for i, h in enumerate(history):
        h[key] *= f(i / (n - 1))
    return history


def _nonfinite_streak():
    h = healthy(every=10)  # 400 steps: 3 events are 0.75%, under the rate threshold: only the streak fires
    for i, e in enumerate(h):
        e["nonfinite_total"] = min(3, max(0, i - 19))
    return h


def _nonfinite_rate():
    h = healthy()  # 200 steps, 5 events, never two logged intervals in a row: 2.5% > 1%
    total = 0
    for i, e in enumerate(h):
        total += i in (3, 10, 17, 24, 31)
        e["nonfinite_total"] = total
    return h


def _oscillating():
    h = healthy()
    for i, e in enumerate(h):
        e["loss_dm"] *= 0.4 if i % 2 else 2.0  # the step asked of G swings x5 between logged steps
    return h


def _gan(real, fake):
    h = healthy(gan=True)
    rng = random.Random(1)
    for e in h:
        e["gan_d_real_acc"] = min(1.0, max(0.0, real + rng.uniform(-0.04, 0.04)))
        e["gan_d_fake_acc"] = min(1.0, max(0.0, fake + rng.uniform(-0.04, 0.04)))
    return h


BROKEN = {
    "nonfinite": [_nonfinite_streak, _nonfinite_rate],
    "fake_behind": [lambda: _scale(healthy(), "dm_real_fake_gap", lambda x: 1 + 2 * x)],  # relative gap 0.5 -> 1.5
    "gap_collapse": [lambda: _scale(healthy(), "dm_real_fake_gap", lambda x: 1 - 0.9 * x)],  # 0.5 -> 0.05
    "fake_loss_rise": [lambda: _scale(healthy(), "loss_fake", lambda x: 1 + 2 * x)],  # x3 over the run
    "g_oscillation": [_oscillating],
    "d_overfit": [lambda: _gan(0.85, 0.8)],
    "d_chance": [lambda: _gan(0.5, 0.5)],
}


def _fired(history):
    return {f.rule for f in rp.check_health(history) if f.fired}


@pytest.mark.parametrize("rule,case", [(r, i) for r, cases in BROKEN.items() for i in range(len(cases))])
def test_each_rule_fires_on_its_broken_history_only(rule, case):
    assert _fired(BROKEN[rule][case]()) == {rule}


def test_no_rule_fires_on_healthy_histories():
    for seed in range(5):
        for gan in (False, True):
            findings = rp.check_health(healthy(gan=gan, seed=seed))
            assert not [f for f in findings if f.fired], rp.format_report(findings)
            judged = {f.rule for f in findings if f.fired is not None}
            assert judged == {f.rule for f in findings} - (set() if gan else {"d_overfit", "d_chance"})


def test_the_measured_runs_on_either_side_of_the_thresholds():
    """The shipped recipe's run fires nothing; the broken run fires fake_behind, g_oscillation and d_overfit; the
    RESULTS.md discriminators: the healthy ones fire nothing, the one near chance fires d_chance."""
    assert _fired(_measured(RUN_A)) == set()
    assert _fired(_measured(RUN_B)) == {"fake_behind", "g_oscillation", "d_overfit"}
    every_50 = [h for h in _measured(RUN_A) if h["step"] % 50 == 0]  # as the shipped config logs: not judged
    assert _fired(every_50) == set()
    assert _fired(_accuracies(RESULTS_X64_SECOND_STAGE)) == _fired(_accuracies(RESULTS_4STEP)) == set()
    assert _fired(_accuracies(RESULTS_DMD_GAN_REGRESSION)) == {"d_chance"}
    # the values docs/HEALTH.md quotes
    a = {f.rule: f.value for f in rp.check_health(_measured(RUN_A))}
    b = {f.rule: f.value for f in rp.check_health(_measured(RUN_B))}
    assert round(a["fake_behind"], 2) == 0.46 and round(b["fake_behind"], 2) == 1.21
    assert round(a["g_oscillation"], 2) == 0.12 and round(b["g_oscillation"], 2) == 0.85
    assert round(b["d_overfit"], 2) == 0.78


def test_few_entries_are_not_judged_and_notes_are_skipped():
    h = healthy(n=5) + [{"step": 10, "note": "resumed at step 10"}]
    by = {f.rule: f for f in rp.check_health(h)}
    assert by["fake_behind"].fired is None and by["g_oscillation"].fired is None and by["d_chance"].fired is None
    assert by["nonfinite"].fired is False


def test_nan_is_not_judged_healthy():
    """Issue 34, defect 3: NaN fails every comparison, so the discriminator rules read all-NaN accuracies as "ok ...
    not saturated / it separates them". Now every rule says "not judged" on NaN (and judges the finite entries)."""
    nan = float("nan")
    by = {f.rule: f for f in rp.check_health(_accuracies([(nan, nan)] * 12))}
    for rule in ("d_overfit", "d_chance"):
        assert by[rule].fired is None and "not judged" in by[rule].message, by[rule]
    report = rp.format_report(rp.check_health(_accuracies([(nan, nan)] * 12)))
    assert "not saturated" not in report and "it separates them" not in report
    mixed = _accuracies([(nan, nan)] * 4 + [(0.99, 0.98)] * 8)  # the finite entries are still judged
    assert {f.rule: f for f in rp.check_health(mixed)}["d_overfit"].fired is True


def test_warmup_is_dropped_and_a_late_gan_is_marked():
    h = healthy(n=10, every=5, warmup=20)
    assert rp.after_warmup(h)[0]["step"] == 20
    late = healthy(n=4) + healthy(n=8, gan=True)[4:]
    assert rp.gan_start(late) == 25 and rp.gan_start(healthy(gan=True)) is None


@pytest.fixture(scope="module")
def tiny_run(train_setup, tmp_path_factory):
    """A real 4-step tiny run (configs/tiny.yaml: logged every step, checkpoints at 2 and 4)."""
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import train

    out = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(Config, ["--config", str(ROOT / "configs" / "tiny.yaml"),
                               "--model.pretrained_model_name_or_path", train_setup["pipe"],
                               "--regression.pairs_dir", train_setup["pairs"], "--data.prompts",
                               train_setup["prompts"], "--output_dir", str(out)])[0]
    trainer = train(cfg)
    return out, trainer


def test_training_writes_final_curves_and_history(tiny_run):
    out, trainer = tiny_run
    final = out / "final"
    assert (final / rp.CURVES_FILE).stat().st_size > 10_000
    assert json.loads((final / rp.HISTORY_FILE).read_text()) == trainer.history
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4]
    for key in ("loss_dm", "loss_fake", "dm_real_fake_gap", "grad_norm_generator", "grad_norm_fake", "lr_generator",
                "nonfinite_total"):
        assert key in trainer.history[-1], key
    assert not [f for f in rp.check_health(trainer.history) if f.fired]  # a healthy (if short) run


def test_report_command_on_a_run_and_on_a_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    (out / "final" / rp.CURVES_FILE).unlink()
    run = subprocess.run([sys.executable, "-m", "sd_dmd.report", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / "final" / rp.CURVES_FILE).is_file()
    assert "health of" in run.stdout and "no warning" in run.stdout and "fake_behind" in run.stdout, run.stdout
    assert str(out / "final" / rp.HISTORY_FILE) in run.stdout  # final/'s history reaches step 4, as checkpoint-4's
    # a checkpoint: the picture next to it; --out elsewhere
    assert rp.main([str(out / "checkpoint-2")]) == 0
    assert (out / "checkpoint-2" / rp.CURVES_FILE).is_file()
    assert rp.main([str(out / "checkpoint-2"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def test_report_reads_the_latest_checkpoint_without_final_and_exits_1_on_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    for step, hist in ((100, healthy(n=20)), (200, _oscillating())):
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"step": step, "history": hist}))
    assert rp.main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "WARN g_oscillation" in out and "checkpoint-200" in out
    assert (run / "checkpoint-200" / rp.CURVES_FILE).is_file() and not (run / "final").exists()


def test_no_history_is_a_one_line_error(tmp_path, capsys):
    from conftest import assert_one_line_error

    assert_one_line_error(rp.main, [str(tmp_path)], capsys, "no history")
    assert_one_line_error(rp.main, [str(tmp_path / "missing")], capsys, "no such directory")
