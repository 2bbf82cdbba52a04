"""f-distill's weighting of the DM gradient (``dmd.divergence``, issue 36): its normalisation, kept across steps.

Each sample's DM gradient is weighted by h(r), r = exp(the GAN head's logit at the DM's noised sample), clipped to
``dmd.ratio_clip`` (:func:`sd_dmd.core.losses.f_divergence_weights`). As in NVlabs/FastGen, r is first divided by the
mean ratio of its timestep bin (``dmd.ratio_bins`` over [t_min, t_max]) and h by its mean, so the weighting reshapes
the gradient and never rescales it.

One difference, for invariance: FastGen takes both means from the current batch. Here they are EMAs
(``dmd.ratio_ema``) of the steps **before**, over the global batch (every micro-batch and process), so that splitting
a batch over micro-batches or processes changes no weight. The first step with the GAN on only measures (weights 1);
the logged ``f_weight_mean`` shows how close to 1 the weights sit.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from sd_dmd.core.losses import f_divergence_weights


class DivergenceWeights:
    def __init__(self, dmd_cfg, reduce: Optional[Callable[[list], list]] = None):
        self.cfg = dmd_cfg
        self.reduce = reduce  # mean over processes of a list of floats
        self.bin_ratio = torch.ones(dmd_cfg.ratio_bins, dtype=torch.float64)
        self.mean_h = 1.0
        self.seen = False  # statistics measured yet
        self._sums: Optional[list] = None

    @property
    def active(self) -> bool:
        return self.cfg.divergence != "reverse_kl"

    def weights(self, logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One micro-batch's weights (detached); its sums join the step's (:meth:`finish` logs them)."""
        d = self.cfg
        h, sums = f_divergence_weights(logits, t, d.divergence, tuple(d.ratio_clip), self.bin_ratio, self.mean_h,
                                       (d.t_min, d.t_max))
        if not self.seen:  # no statistics yet: this step only measures
            h = torch.ones_like(h)
        count, r_sum, h_raw_sum, n = sums
        hd = h.double()
        flat = [*count.tolist(), *r_sum.tolist(), h_raw_sum.item(), n, hd.sum().item(), hd.pow(2).sum().item()]
        self._sums = flat if self._sums is None else [a + b for a, b in zip(self._sums, flat)]
        return h, {}

    def finish(self) -> dict:
        """After the generator turn: the step's sums over all micro-batches and processes update the bins' mean ratios
        and the mean h, and give the step's stats (the same however the batch was split): the applied weights' mean
        and standard deviation, and the lowest and highest mean ratio of a bin after clipping."""
        if self._sums is None:
            return {}
        values, self._sums = self._sums, None
        if self.reduce is not None:
            values = self.reduce(values)
        k = len(self.bin_ratio)
        count, r_sum, (h_raw_sum, n, h_sum, h_sq) = values[:k], values[k:2 * k], values[2 * k:]
        if not all(math.isfinite(v) for v in values) or n <= 0:
            return {}  # a non-finite step (skipped) leaves the statistics as they were
        decay = self.cfg.ratio_ema if self.seen else 0.0
        for i in range(k):
            if count[i] > 0:
                self.bin_ratio[i] = decay * self.bin_ratio[i] + (1 - decay) * r_sum[i] / count[i]
        self.mean_h = decay * self.mean_h + (1 - decay) * h_raw_sum / n
        self.seen = True
        mean = h_sum / n
        bins = [r / c for r, c in zip(r_sum, count) if c > 0]
        return {"f_weight_mean": mean, "f_weight_std": math.sqrt(max(h_sq / n - mean * mean, 0.0)),
                "f_ratio_bin_min": min(bins), "f_ratio_bin_max": max(bins)}

    def state_dict(self) -> dict:
        return {"bin_ratio": self.bin_ratio.tolist(), "mean_h": self.mean_h, "seen": self.seen}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        if len(state["bin_ratio"]) == len(self.bin_ratio):  # a changed dmd.ratio_bins starts afresh
            self.bin_ratio = torch.tensor(state["bin_ratio"], dtype=torch.float64)
            self.mean_h, self.seen = float(state["mean_h"]), bool(state["seen"])
