"""Metrics of the digits model, from a small classifier trained on the same data.

- digits-FID: Frechet distance between Gaussian fits of the classifier's penultimate (128-d) features of
  generated and real digits (the FID formula, with this classifier in place of Inception);
- prompt accuracy: fraction of images generated for "a handwritten digit k" that are classified as k;
- coverage per class (Naeem et al. 2020): fraction of real digits of class k whose 5-NN ball in feature
  space holds at least one image generated for k; it falls when a class collapses to few modes.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations (the digits are centred; generated ones may not be)."""
    out = torch.empty_like(x)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator).tolist()
    for i, (dy, dx) in enumerate(shifts):
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    return out


def load_classifier(path=None) -> DigitClassifier:
    from safetensors.torch import load_file

    from sd_dmd.data.digits import CLASSIFIER_FILE

    clf = DigitClassifier()
    clf.load_state_dict(load_file(str(path or CLASSIFIER_FILE)))
    return clf.eval()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # as disp=False did (deprecated in scipy 1.16): a singular product is
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # expected (rank-deficient covariances), handled below
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> float:
    """Naeem et al. 2020: share of real points whose k-NN radius (among reals) contains a fake point."""
    r = torch.from_numpy(real)
    f = torch.from_numpy(fake)
    d_rr = torch.cdist(r, r)
    radius = d_rr.kthvalue(k + 1, dim=1).values  # +1: the point itself
    return float((torch.cdist(r, f).min(dim=1).values <= radius).float().mean())


@torch.no_grad()
def digit_metrics(images: torch.Tensor, labels: torch.Tensor, clf: DigitClassifier | None = None) -> dict:
    """``images`` [N, 3, 32, 32] in [-1, 1] generated for class ``labels``; compared with the real digits."""
    from sd_dmd.data.digits import load_images

    clf = clf or load_classifier()
    real, real_labels = load_images()
    f_real = clf.features(real).numpy().astype(np.float64)
    f_gen = clf.features(images.float()).numpy().astype(np.float64)
    pred = clf.head(torch.from_numpy(f_gen).float()).argmax(1)
    cov = {}
    for k in range(10):
        sel_r = (real_labels == k).numpy()
        sel_g = (labels == k).numpy()
        cov[k] = coverage(f_real[sel_r], f_gen[sel_g]) if sel_g.any() else 0.0
    return {
        "digits_fid": frechet_distance(f_gen, f_real),
        "prompt_accuracy": float((pred == labels).float().mean()),
        "coverage_mean": float(np.mean(list(cov.values()))),
        "coverage_per_class": {str(k): round(v, 4) for k, v in cov.items()},
        "num_images": int(len(images)),
    }
