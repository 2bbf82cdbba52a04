"""The paper's Figure 3 outcome on the 2D toy, run by the same command users run."""
import json

import pytest

from sd_dmd import toy


@pytest.fixture(scope="module")
def toy_metrics(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy.main(["--out", str(out)])
    assert (out / "figure3.png").stat().st_size > 10_000
    return json.loads((out / "metrics.json").read_text())


def test_real_score_only_collapses_to_one_mode(toy_metrics):
    assert max(toy_metrics["a"]["mode_fractions"]) >= 0.95


def test_full_dmd_covers_both_modes(toy_metrics):
    for f in toy_metrics["c"]["mode_fractions"]:
        assert 0.35 <= f <= 0.65


def test_full_dmd_is_closest_to_real(toy_metrics):
    d = {v: toy_metrics[v]["sliced_wasserstein2"] for v in "abc"}
    assert d["c"] < d["a"] and d["c"] < d["b"]


def test_mixture_denoiser_is_exact_at_low_noise():
    import torch

    s = toy.NoiseSchedule.scaled_linear()
    real = toy.MixtureDenoiser(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.2, s)
    x = torch.tensor([[-2.1, 0.05], [1.9, -0.1]])
    assert torch.allclose(real(x, torch.tensor([0, 0]), None), x, atol=0.01)
    # at pure noise the posterior mean is the mixture mean (0, 0)
    assert real(torch.zeros(1, 2), torch.tensor([999]), None).abs().max() < 1e-4
