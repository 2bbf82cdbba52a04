"""A run's curves and a health check, both read from its logged ``history`` (one dict per logged step, plus
``{"step", "note"}`` entries): ``checkpoint-N/trainer_state.json``'s "history", or ``final/history.json``.

    python -m sd_dmd.report runs/digits                 # final/curves.png, and the health report on stdout
    python -m sd_dmd.report runs/digits/checkpoint-200  # curves.png next to the checkpoint's state

The rules and where each threshold was measured: docs/HEALTH.md. Plain functions on a list of dicts, so a test or a
notebook can call :func:`check_health` and :func:`plot_curves` on any history.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sd_dmd.run_dir import STATE_FILE, list_checkpoints

CURVES_FILE = "curves.png"
HISTORY_FILE = "history.json"  # final/'s copy of the history (checkpoints may be rotated away or switched off)

# ----- the rules' thresholds, measured on digits runs (docs/HEALTH.md: the runs, healthy and broken, and values) --
MIN_ENTRIES = 6  # fewer logged steps after the warm-up than this: a trend rule says "not judged"
NONFINITE_STREAK = 3  # non-finite events in this many logged intervals in a row
NONFINITE_RATE = 0.01  # or more non-finite events than this fraction of the steps
# dm_real_fake_gap * eq8_weight: |mu_real - mu_fake| relative to the real score's own correction |x - mu_real|
FAKE_BEHIND = 0.9  # its median over the last third above this: the fake score's error dominates the DM gradient
GAP_COLLAPSE = 0.2  # below this (under the CFG-only disagreement at step 0): the DM gradient has faded
FAKE_LOSS_RISE = 1.5  # loss_fake, median of the last third / median of the first third
G_OSCILLATION = 0.4  # loss_dm, median |log(next / previous)| over consecutive logged steps: the update size swings
D_WINDOW = 4  # the discriminator rules read the mean over the last half of the GAN's entries, at least this many
D_OVERFIT = 0.74  # balanced accuracy (real + generated) / 2 at least this: it separates them (over-fitting)
D_CHANCE = 0.53  # balanced accuracy below this: it hardly separates them (accuracies ~0.5)


@dataclass
class Finding:
    """One rule's verdict: ``fired`` True (a warning), False (fine) or None (not enough data to judge)."""
    rule: str
    fired: Optional[bool]
    value: Optional[float]
    threshold: str
    message: str


# ----- reading a run ---------------------------------------------------------------------------------------
def split_history(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(logged steps, notes), each sorted by step."""
    entries = sorted((h for h in history if "note" not in h), key=lambda h: h["step"])
    notes = sorted((h for h in history if "note" in h), key=lambda h: h["step"])
    return entries, notes


def _last_step(history: list[dict]) -> int:
    return max((h["step"] for h in history), default=-1)


def find_history(path: str | Path) -> tuple[list[dict], Path, Path]:
    """``(history, where it was read, where curves.png goes by default)`` for a run or checkpoint directory.

    A checkpoint: its ``trainer_state.json``, the picture next to it. A run: the newest of ``final/history.json``
    and the latest complete checkpoint's state (the one reaching the later step; ``final/`` on a tie); the picture
    goes into ``final/`` when the run has one, else next to that checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (give a run's output_dir or one of its checkpoint-N/)")
    if (path / STATE_FILE).is_file():
        return _read_history(path / STATE_FILE), path / STATE_FILE, path
    if (path / HISTORY_FILE).is_file():  # final/ itself
        return _read_history(path / HISTORY_FILE), path / HISTORY_FILE, path
    candidates = []
    final = path / "final"
    if (final / HISTORY_FILE).is_file():
        candidates.append(final / HISTORY_FILE)
    ckpts = list_checkpoints(path)
    if ckpts:
        candidates.append(ckpts[-1][1] / STATE_FILE)
    if not candidates:
        raise FileNotFoundError(f"{path}: no history: neither final/{HISTORY_FILE} nor a complete checkpoint-N/ "
                                f"(with {STATE_FILE}); give a run's output_dir or one of its checkpoints")
    read = [(_read_history(c), c) for c in candidates]
    history, source = max(read, key=lambda hc: _last_step(hc[0]))  # max keeps the first (final/) on a tie
    out = final if final.is_dir() else source.parent
    return history, source, out


def _read_history(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise FileNotFoundError(f"{path}: not JSON ({e})") from None
    history = data.get("history") if isinstance(data, dict) else data
    if not isinstance(history, list) or not all(isinstance(h, dict) and "step" in h for h in history):
        raise FileNotFoundError(f"{path}: no history (a list of {{'step': ...}} entries)")
    return history


# ----- the picture -----------------------------------------------------------------------------------------
PANELS = [  # (title, keys, log scale); a panel is drawn when the history has any of its keys
    ("distribution-matching loss", ("loss_dm",), False),
    ("regression loss", ("loss_reg",), False),
    ("fake-score loss", ("loss_fake",), False),
    ("real-fake gap: dm_real_fake_gap, and relative (x eq8_weight)", ("dm_real_fake_gap", "relative_gap"), False),
    ("gradient norms (before clipping)", ("grad_norm_generator", "grad_norm_fake"), True),
    ("learning rate (generator)", ("lr_generator",), False),
    ("GAN losses", ("loss_gan_generator", "loss_gan_discriminator"), False),
    ("discriminator accuracy", ("gan_d_real_acc", "gan_d_fake_acc"), False),
    ("GAN / DM gradient norm on x", ("gan_dm_grad_ratio",), True),
    ("f-divergence weights: mean, std (dmd.divergence)", ("f_weight_mean", "f_weight_std"), False),
    ("density ratio p_real/p_fake: lowest and highest bin mean", ("f_ratio_bin_min", "f_ratio_bin_max"), True),
    ("non-finite events (total)", ("nonfinite_total",), False),
]


def gan_start(entries: list[dict]) -> Optional[int]:
    """The first logged step with GAN stats when the run logged steps without them before (GAN switched on late)."""
    for i, h in enumerate(entries):
        if "gan_d_real_acc" in h:
            return h["step"] if i > 0 else None
    return None


def _panels(entries: list[dict]) -> list[tuple[str, list[str], bool]]:
    panels = []
    for name, keys, log in PANELS:
        keys = [k for k in keys if any(k in h for h in entries)]
        if not keys or (keys == ["nonfinite_total"] and not any(h.get("nonfinite_total") for h in entries)):
            continue  # the non-finite panel only when something was non-finite
        panels.append((name, keys, log))
    return panels


def _marks(entries: list[dict], notes: list[dict]) -> list[tuple[int, str]]:
    marks = [(n["step"], str(n["note"])) for n in notes]
    start = gan_start(entries)
    if start is not None and not any("GAN on" in text for _, text in marks):
        marks.append((start, f"GAN on from step {start} (its first logged stats)"))
    return sorted(marks)


def _draw(ax, entries: list[dict], keys: list[str], log: bool, marks, xlim: tuple[float, float]) -> None:
    from matplotlib.ticker import NullFormatter

    for k in keys:
        pts = [(h["step"], h[k]) for h in entries if k in h and _finite(h[k])]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None, lw=1.2, label=k)
    if keys[0].startswith("gan_d_"):
        ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_ylim(-0.02, 1.02)
    if "relative_gap" in keys:  # the healthy band of the relative gap (docs/HEALTH.md)
        ax.axhline(GAP_COLLAPSE, color="grey", lw=0.8, ls="--", label="relative_gap: healthy band")
        ax.axhline(FAKE_BEHIND, color="grey", lw=0.8, ls="--")
    if log and all(h[k] > 0 for k in keys for h in entries if k in h and _finite(h[k])):
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    for step, _ in marks:
        ax.axvline(step, color="tab:red", lw=0.9, ls=":")
    ax.set_xlim(*xlim)  # every panel on the run's whole range, so that the steps line up
    ax.locator_params(axis="x", nbins=6)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(keys) > 1 or keys[0].startswith("gan_d_"):
        ax.legend(fontsize=7)


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """One figure, a labelled panel per curve family, against step; notes as red dotted lines, listed below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot: no global state, no display
    from matplotlib.figure import Figure

    entries, notes = split_history(history)
    entries = [dict(h, relative_gap=h["dm_real_fake_gap"] * h["eq8_weight"]) if "eq8_weight" in h and
               "dm_real_fake_gap" in h else h for h in entries]  # what the fake_behind / gap_collapse rules read
    marks = _marks(entries, notes)
    panels = _panels(entries)
    rows = max(1, math.ceil(len(panels) / 2))
    footer = [f"step {step}: {text[:120]}" for step, text in marks][:8]
    fig = Figure(figsize=(11, 2.6 * rows + 0.25 * len(footer) + 0.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    steps = [h["step"] for h in entries] + [step for step, _ in marks]
    pad = max(1.0, 0.02 * (max(steps) - min(steps)))
    for ax, (name, keys, log) in zip(axes, panels):
        _draw(ax, entries, keys, log, marks, (min(steps) - pad, max(steps) + pad))
        ax.set_title(name, fontsize=10, y=1.0, pad=4)  # a fixed y skips matplotlib's title placement (slow)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    height = fig.get_figheight()  # fixed margins, in inches: tight_layout would measure every label (slow)
    bottom = (0.25 * len(footer) + 0.55) / height
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - (0.75 if title else 0.35) / height, bottom=bottom,
                        hspace=0.5, wspace=0.18)
    for i, line in enumerate(footer):
        fig.text(0.01, (0.25 * (len(footer) - i) - 0.12) / height, line, fontsize=8, color="tab:red")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ----- the health check ------------------------------------------------------------------------------------
def after_warmup(entries: list[dict]) -> list[dict]:
    """The entries from the first one at the generator's peak learning rate (drops a linear warm-up's ramp)."""
    lrs = [h.get("lr_generator") for h in entries]
    if not entries or any(v is None for v in lrs):
        return entries
    peak = max(lrs)
    first = next(i for i, v in enumerate(lrs) if v >= 0.999 * peak)
    return entries[first:]


def _series(entries: list[dict], key: str) -> list[float]:
    return [h[key] for h in entries if key in h and _finite(h[key])]


def _thirds_ratio(values: list[float]) -> float:
    n = max(1, len(values) // 3)
    first, last = statistics.median(values[:n]), statistics.median(values[-n:])
    return last / first if first > 0 else math.inf


def rule_nonfinite(entries: list[dict]) -> Finding:
    totals = [(h["step"], h["nonfinite_total"]) for h in entries if "nonfinite_total" in h]
    thr = f"rose in >= {NONFINITE_STREAK} logged intervals in a row, or > {NONFINITE_RATE:.0%} of the steps"
    if not totals:
        return Finding("nonfinite", None, None, thr, "no nonfinite_total logged")
    streak = best = 0
    prev = 0
    for _, total in totals:
        streak = streak + 1 if total > prev else 0
        best, prev = max(best, streak), total
    total = totals[-1][1]
    rate = total / max(1, totals[-1][0])
    fired = best >= NONFINITE_STREAK or rate > NONFINITE_RATE
    msg = (f"{total:g} non-finite events by step {totals[-1][0]} ({rate:.1%} of the steps; longest streak "
           f"{best} logged interval(s)): " + ("losses or gradients keep going non-finite; lower the learning "
                                             "rates, check the precision (fp16 loss scale) and the data" if fired
                                             else "fine"))
    return Finding("nonfinite", fired, float(rate), thr, msg)


def _not_judged(rule: str, thr: str, n: int, what: str) -> Finding:
    return Finding(rule, None, None, thr, f"{n} logged {what} after the warm-up (< {MIN_ENTRIES}): not judged")


def relative_gap(entries: list[dict]) -> list[float]:
    """dm_real_fake_gap * eq8_weight per entry: the fake score's disagreement with the real one, in units of the
    real score's own correction mean|x - mu_real| (Eq. 8's weight is its inverse): scale-free."""
    return [h["dm_real_fake_gap"] * h["eq8_weight"] for h in entries
            if _finite(h.get("dm_real_fake_gap")) and _finite(h.get("eq8_weight"))]


def _last_third(values: list[float]) -> float:
    return statistics.median(values[-max(1, len(values) // 3):])


def rule_fake_behind(entries: list[dict]) -> Finding:
    thr = f"dm_real_fake_gap * eq8_weight, median of the last third > {FAKE_BEHIND:g}"
    v = relative_gap(after_warmup(entries))
    if len(v) < MIN_ENTRIES:
        return _not_judged("fake_behind", thr, len(v), "dm_real_fake_gap and eq8_weight")
    r = _last_third(v)
    fired = r > FAKE_BEHIND
    msg = (f"the fake score disagrees with the real one by {r:.2f}x the real score's own correction: " +
           ("the fake score is falling behind the generator and its error drives the DM gradient; lower "
            "optim.lr_generator, raise dmd.fake_updates_per_step, check dmd.fake_loss_weighting (snr+1) and that "
            "the GAN weight does not swamp the fake loss" if fired else "it keeps up"))
    return Finding("fake_behind", fired, r, thr, msg)


def rule_gap_collapse(entries: list[dict]) -> Finding:
    thr = f"dm_real_fake_gap * eq8_weight, median of the last third < {GAP_COLLAPSE:g}"
    v = relative_gap(after_warmup(entries))
    if len(v) < MIN_ENTRIES:
        return _not_judged("gap_collapse", thr, len(v), "dm_real_fake_gap and eq8_weight")
    r = _last_third(v)
    fired = r < GAP_COLLAPSE
    msg = (f"relative real-fake gap {r:.2f}: " +
           ("below the guidance-only disagreement of step 0: the real and fake scores agree, the DM gradient has "
            "faded and the generator hardly learns from it (a fake score copying the teacher, or no guidance)"
            if fired else "the distribution-matching signal holds"))
    return Finding("gap_collapse", fired, r, thr, msg)


def rule_fake_loss_rising(entries: list[dict]) -> Finding:
    thr = f"loss_fake, median of the last third / first third > {FAKE_LOSS_RISE:g}"
    v = _series(after_warmup(entries), "loss_fake")
    if len(v) < MIN_ENTRIES:
        return _not_judged("fake_loss_rise", thr, len(v), "loss_fake")
    r = _thirds_ratio(v)
    fired = r > FAKE_LOSS_RISE
    msg = (f"loss_fake went x{r:.2f} from the first third of the run to the last: " +
           ("the fake score denoises the generator's samples ever worse; raise optim.lr_fake or "
            "dmd.fake_updates_per_step" if fired else "steady"))
    return Finding("fake_loss_rise", fired, r, thr, msg)


def _median_abs_log_step(values: list[float]) -> float:
    steps = [abs(math.log(b / a)) for a, b in zip(values, values[1:]) if a > 0 and b > 0]
    return statistics.median(steps) if steps else math.nan


def rule_g_oscillation(entries: list[dict]) -> Finding:
    thr = f"loss_dm, median |log(next / previous)| over logged steps > {G_OSCILLATION:g}"
    w = after_warmup(entries)
    v = _series(w, "loss_dm")
    if len(v) < MIN_ENTRIES:
        return _not_judged("g_oscillation", thr, len(v), "loss_dm")
    r = _median_abs_log_step(v)
    g = _series(w, "grad_norm_generator")
    also = f"; grad_norm_generator's: {_median_abs_log_step(g):.2f}" if len(g) > 1 else ""
    fired = r > G_OSCILLATION
    msg = (f"loss_dm (the size of the step asked of G's samples) changes by a factor e^{r:.2f} from one logged "
           f"step to the next{also}: " +
           ("the generator's updates swing; lower optim.lr_generator, keep an EMA of G (train.ema_decay)" if fired
            else "steady"))
    return Finding("g_oscillation", fired, r, thr, msg)


def _gan_window(entries: list[dict]) -> list[dict]:
    gan = [h for h in entries if _finite(h.get("gan_d_real_acc")) and _finite(h.get("gan_d_fake_acc"))]
    return gan[-max(D_WINDOW, len(gan) // 2):] if len(gan) >= D_WINDOW else []


def _balanced(w: list[dict]) -> tuple[float, float, float]:
    real = statistics.fmean(h["gan_d_real_acc"] for h in w)
    fake = statistics.fmean(h["gan_d_fake_acc"] for h in w)
    return real, fake, (real + fake) / 2


def rule_d_overfit(entries: list[dict]) -> Finding:
    thr = f"balanced accuracy (real + generated) / 2 over the last half >= {D_OVERFIT:g}"
    w = _gan_window(entries)
    if not w:
        return Finding("d_overfit", None, None, thr, f"fewer than {D_WINDOW} logged steps with the GAN: not judged")
    real, fake, bal = _balanced(w)
    fired = bal >= D_OVERFIT
    msg = (f"discriminator accuracy {real:.2f} on real / {fake:.2f} on generated (last {len(w)} logged steps): " +
           ("it separates them more easily than in any healthy run: it is heading for over-fitting the real set "
            "and a saturated gradient to the generator; lower gan.discriminator_weight, use more real images"
            if fired else "not saturated"))
    return Finding("d_overfit", fired, bal, thr, msg)


def rule_d_chance(entries: list[dict]) -> Finding:
    thr = f"balanced accuracy over the last half < {D_CHANCE:g}"
    w = _gan_window(entries)
    if not w:
        return Finding("d_chance", None, None, thr, f"fewer than {D_WINDOW} logged steps with the GAN: not judged")
    real, fake, bal = _balanced(w)
    fired = bal < D_CHANCE
    msg = (f"discriminator balanced accuracy {bal:.2f} ({real:.2f} real / {fake:.2f} generated, last {len(w)} "
           f"logged steps): " +
           ("it hardly separates real from generated: the GAN term adds little; raise gan.discriminator_weight and "
            "gan.generator_weight (docs/RESULTS.md: x64 on digits)" if fired else "it separates them"))
    return Finding("d_chance", fired, bal, thr, msg)


RULES = (rule_nonfinite, rule_fake_behind, rule_gap_collapse, rule_fake_loss_rising, rule_g_oscillation,
         rule_d_overfit, rule_d_chance)


def check_health(history: list[dict]) -> list[Finding]:
    """Every rule's :class:`Finding` on ``history`` (notes are ignored; the GAN rules judge only GAN runs)."""
    entries, _ = split_history(history)
    return [_nan_not_judged(rule(entries)) for rule in RULES]


def _nan_not_judged(f: Finding) -> Finding:
    """A verdict on a NaN is no verdict (NaN fails every comparison, so a rule would read it as healthy)."""
    if f.value is None or not math.isnan(f.value):
        return f
    return Finding(f.rule, None, None, f.threshold, f"{f.message.split(':')[0]}: NaN: not judged")


def format_report(findings: list[Finding], source: Path | str = "", entries: Optional[int] = None) -> str:
    fired = [f for f in findings if f.fired]
    head = f"health of {source}" + (f" ({entries} logged steps)" if entries is not None else "") + ": "
    head += (f"{len(fired)} warning(s)" if fired else "no warning") + " (rules: docs/HEALTH.md)"
    tag = {True: "WARN", False: "ok", None: "-"}
    lines = [head] + [f"  {tag[f.fired]:<4} {f.rule:<14} {f.message}  [fires when {f.threshold}]" for f in findings]
    return "\n".join(lines)


# ----- what training and the command call ----------------------------------------------------------------
def save_final_curves(final: Path, history: list[dict], log=print) -> Optional[Path]:
    """``final/history.json`` and ``final/curves.png`` at the end of training. A picture that cannot be drawn is
    logged, never raised: the LoRA is already saved by then."""
    final = Path(final)
    try:
        (final / HISTORY_FILE).write_text(json.dumps(history, indent=1, default=float))
        return plot_curves(history, final / CURVES_FILE, title=final.parent.name)
    except Exception as e:  # noqa: BLE001 - the run's results matter more than its picture
        log(f"warning: {final / CURVES_FILE} not written ({type(e).__name__}: {e})")
        return None


def report(path: str | Path, out: Optional[str | Path] = None, log=print) -> tuple[Path, list[Finding]]:
    """Draw the curves of the run or checkpoint at ``path`` and print the health report; (picture, findings)."""
    history, source, default_dir = find_history(path)
    entries, _ = split_history(history)
    if not entries:
        raise FileNotFoundError(f"{source}: the history has no logged step yet")
    out = Path(out) if out is not None else default_dir / CURVES_FILE
    picture = plot_curves(history, out, title=str(Path(path).resolve().name))
    findings = check_health(history)
    log(format_report(findings, source, len(entries)))
    log(f"curves: {picture}")
    return picture, findings


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Draw a run's training curves (curves.png) and print a health report "
                                            "from its logged history (rules: docs/HEALTH.md). Exit 0: no warning; "
                                            "1: some rule fired; 2: no history there.")
    p.add_argument("path", type=Path, help="a run's output_dir (reads final/history.json or its latest checkpoint) "
                                           "or one checkpoint-N/")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where to write the picture (default: the run's final/{CURVES_FILE}, else "
                        f"{CURVES_FILE} in the checkpoint read)")
    args = p.parse_args(argv)
    from sd_dmd.cli import guarded

    _, findings = guarded(report, args.path, args.out)
    return 1 if any(f.fired for f in findings) else 0
