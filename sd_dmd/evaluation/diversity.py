"""Diversity beside FID (issue 36): precision and recall on the FID features, and per-prompt LPIPS diversity.

- **Precision / recall** (Kynkäänniemi et al. 2019, "Improved precision and recall metric"): each set's manifold is
  the union of balls around its feature vectors, each of radius the distance to its k-th nearest neighbour in its
  own set (k = 3, the paper's). Precision: the share of generated samples inside the real manifold; recall: the share
  of real samples inside the generated one. A generator that repeats one image has recall ~0: its manifold is a
  point. The features are FID's own (Inception pool3, 2048-d, torchmetrics / torch-fidelity weights).
- **Per-prompt diversity**: mean pairwise LPIPS between N images of one prompt from N seeds, averaged over prompts
  (how DMD2's and Phased DMD's ablations report mode collapse). 0 when every seed gives the same image.
"""
from __future__ import annotations

import itertools
import torch


def inception_features(images: torch.Tensor, net, batch: int = 64) -> torch.Tensor:
    """FID's features of uint8 images (N, 3, H, W) by ``net``, the feature network of torchmetrics'
    FrechetInceptionDistance (``make_fid(...).inception``: Inception pool3, 2048-d)."""
    with torch.no_grad():
        return torch.cat([net(images[i:i + batch]).reshape(len(images[i:i + batch]), -1).double()
                          for i in range(0, len(images), batch)])


def _radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # the k-th neighbour other than the point itself (distance 0)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    hits = []
    for i in range(0, len(points), chunk):
        hits.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Kynkäänniemi et al.'s precision and recall of ``fake`` against ``real`` features (N, D)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} samples in each set, got {len(real)} real "
                         f"and {len(fake)} generated")
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall, "pr_k": k}


def make_lpips(net: str = "alex", pretrained_backbone: bool = True):
    """LPIPS (AlexNet: the diversity convention); ``pretrained_backbone=False`` keeps a random backbone (offline
    tests: identical images still score 0)."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    return model.requires_grad_(False).eval()


def lpips_diversity(groups: list[torch.Tensor], model) -> dict:
    """Mean pairwise LPIPS within each group (the N seeds of one prompt; uint8 (N, 3, H, W)), averaged over groups.
    Images under 64 px (the digits' 32) are first upsampled (bilinear) to 64: AlexNet's pooling needs that size."""
    per_prompt = []
    with torch.no_grad():
        for imgs in groups:
            x = imgs.float() / 127.5 - 1
            if min(x.shape[-2:]) < 64:
                x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
            pairs = list(itertools.combinations(range(len(x)), 2))
            if not pairs:
                continue
            a, b = zip(*pairs)
            per_prompt.append(model(x[list(a)], x[list(b)]).mean().item())
    if not per_prompt:
        raise ValueError("per-prompt diversity needs at least 2 seeds per prompt")
    return {"lpips_diversity": sum(per_prompt) / len(per_prompt), "lpips_diversity_prompts": len(per_prompt),
            "lpips_diversity_seeds": len(groups[0])}
