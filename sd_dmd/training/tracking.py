"""Pictures and text in the experiment tracker (TensorBoard or W&B), beside accelerate's scalars: the labelled
validation grid at every validation, ``curves.png`` and the health report at the end. The resolved config goes in as
hyperparameters when the trackers start (:func:`start_trackers`), with secrets (the Hub token) left out.

Only the main process logs (accelerate's trackers live there). A picture that cannot be logged is a warning, never an
error: the files on disk are the run's record."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sd_dmd.config import to_dict


def tracker_config(cfg) -> dict:
    """The config as flat ``group.key`` hyperparameters (TensorBoard takes only numbers, strings and booleans)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out
    return flat(to_dict(cfg))


def start_trackers(acc, cfg, out: Path) -> None:
    """accelerate's trackers for ``logging.tracker``; a W&B run lives in the run's ``logs/`` and is named after it."""
    if cfg.logging.tracker == "none":
        return
    kwargs = {"wandb": {"dir": str(out / "logs"), "name": out.name}} if cfg.logging.tracker == "wandb" else {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    acc.init_trackers("sd_dmd", config=tracker_config(cfg), init_kwargs=kwargs)


def _each(acc, log: Callable, what: str, fn_tb, fn_wandb) -> None:
    if not acc.is_main_process:
        return
    for tracker in acc.trackers:
        fn = {"tensorboard": fn_tb, "wandb": fn_wandb}.get(tracker.name)
        if fn is None:
            continue
        try:
            fn(tracker)
        except Exception as e:  # noqa: BLE001 - the picture is on disk; the tracker's copy is a convenience
            log(f"warning: {what} not logged to {tracker.name} ({type(e).__name__}: {e})")


def log_image(acc, tag: str, image, step: int, log: Callable = print) -> None:
    """A PIL image (or HWC uint8 array) under ``tag`` at ``step``."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)

    def tb(tr):
        tr.writer.add_image(tag, arr, step, dataformats="HWC")
        tr.writer.flush()

    def wb(tr):
        import wandb

        tr.run.log({tag: wandb.Image(arr)}, step=step)

    _each(acc, log, f"image {tag}", tb, wb)


def log_text(acc, tag: str, text: str, step: int, log: Callable = print) -> None:
    """Preformatted text (a report) under ``tag`` at ``step``."""
    def tb(tr):
        tr.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)  # markdown: code
        tr.writer.flush()

    def wb(tr):
        import html

        import wandb

        tr.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    _each(acc, log, f"text {tag}", tb, wb)
