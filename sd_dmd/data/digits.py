"""scikit-learn's bundled digits (1,797 8x8 images) as 32x32 RGB images with templated captions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"  # the shipped digits teacher: a diffusers StableDiffusionPipeline
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"  # the digits instrument's classifier

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {k}", "a picture of the digit {w}", "handwritten {k}",
             "the digit {w}", "{w}"]
RESOLUTION = 32


def prompt_for(k: int) -> str:
    """The evaluation prompt of class k."""
    return f"a handwritten digit {WORDS[k]}"


def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, 32, 32] in [-1, 1], labels [N])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def random_captions(labels: torch.Tensor, generator: torch.Generator, p_empty: float = 0.1) -> list[str]:
    """A random template per label; about ``p_empty`` of captions empty so CFG has an unconditional model."""
    t = torch.randint(0, len(TEMPLATES), (len(labels),), generator=generator).tolist()
    drop = (torch.rand(len(labels), generator=generator) < p_empty).tolist()
    return ["" if dr else TEMPLATES[ti].format(w=WORDS[k], k=k) for k, ti, dr in zip(labels.tolist(), t, drop)]


def write_prompt_file(path, n_per_class: int = 100, seed: int = 0) -> None:
    """A .txt prompt file for pairs and distillation (non-empty templated captions)."""
    g = np.random.default_rng(seed)
    lines = [TEMPLATES[g.integers(len(TEMPLATES))].format(w=WORDS[k], k=k) for k in range(10) for _ in range(n_per_class)]
    g.shuffle(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
