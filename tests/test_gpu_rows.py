"""Issues 35 and 38: the GPU script is ready to run: its --dry mode runs every row on the CPU with the tiny pipelines
(the SD3.5 row on the tiny SD3 one)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_rows_dry_run_prints_every_row(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_rows.sh"), "--dry", "--sd35"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = (tmp_path / "gpu_rows.md").read_text()
    for row in ("| shared UNet + 2 LoRA | 1 |", "| three UNets (DMD2 layout) | 2 |", "| one-call roles |",
                "| torch.compile (aot_eager) |", "| one step (the student's) |", "| teacher, 50 steps, CFG |",
                "| batch 1, no, grad ckpt, AdamW (no bitsandbytes here), GAN, 4-step (k up to 3), text cache, 16 px |"):
        assert row in out, (row, out)
    assert "device: cpu" in out
