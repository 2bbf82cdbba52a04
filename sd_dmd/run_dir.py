"""The layout of a run directory that training writes and sampling, export and start checks read:
``checkpoint-N/`` (complete once ``trainer_state.json`` is in it), ``final/``."""
from __future__ import annotations

import re
from pathlib import Path


CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed and holding trainer_state.json), oldest first."""
    out = []
    if not output_dir.is_dir():
        return out
    for p in output_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)
