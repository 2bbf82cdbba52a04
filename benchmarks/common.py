"""Helpers shared by the benchmarks: timing with CUDA sync, and the benchmark models."""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sd_dmd  # noqa: E402,F401  before accelerate/peft import bitsandbytes: its guard keeps that import off the Hub


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(kind: str, tmp: Path) -> tuple[str, int]:
    """(diffusers pipeline dir, resolution) for tiny | medium | digits | sd15 | sdxl | tiny_sdxl | tiny_sd3 | sd35
    (SD1.5-, SDXL-base- and SD3.5-Medium-shaped, random weights)."""
    from sd_dmd.models.tiny import build_sd15_shaped_pipeline, build_tiny_pipeline

    if kind == "tiny":
        return str(build_tiny_pipeline(tmp / "tiny")), 16
    if kind == "medium":
        return str(build_tiny_pipeline(tmp / "medium", sample_size=32, unet_channels=(128, 256, 512), text_dim=256,
                                       vae_channels=(32, 64, 64, 64))), 256
    if kind == "digits":
        from sd_dmd.data.digits import TEACHER_DIR

        return str(TEACHER_DIR), 32
    if kind == "sd15":
        return str(build_sd15_shaped_pipeline(tmp / "sd15")), 512
    if kind == "tiny_sdxl":
        from sd_dmd.models.tiny import build_tiny_sdxl_pipeline

        return str(build_tiny_sdxl_pipeline(tmp / "tiny_sdxl")), 16
    if kind == "sdxl":  # built in a child process: its 10 GB of random weights leave this process's memory free
        import subprocess

        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                        "from sd_dmd.models.tiny import build_sdxl_shaped_pipeline as b; b(sys.argv[1])",
                        str(tmp / "sdxl"), str(ROOT)], check=True)
        return str(tmp / "sdxl"), 1024
    if kind == "tiny_sd3":
        from sd_dmd.models.tiny import build_tiny_sd3_pipeline

        return str(build_tiny_sd3_pipeline(tmp / "tiny_sd3")), 16
    if kind == "sd35":  # built in a child process, as sdxl
        import subprocess

        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                        "from sd_dmd.models.tiny import build_sd35_shaped_pipeline as b; b(sys.argv[1])",
                        str(tmp / "sd35"), str(ROOT)], check=True)
        return str(tmp / "sd35"), 1024
    raise ValueError(f"unknown model kind {kind}")


def device_line() -> str:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    return (f"device: {dev} ({name}, {torch.get_num_threads()} CPU threads); torch {torch.__version__}; "
            f"diffusers {__import__('diffusers').__version__}")
