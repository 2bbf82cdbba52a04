"""The embedded default: the shipped digits teacher distilled by the same scripts, and its evaluator."""
import json

import pytest
import torch

from sd_dmd.data.digits import CLASSIFIER_FILE, TEACHER_DIR, load_images
from sd_dmd.evaluation.digits.evaluate import coverage, digit_metrics, frechet_distance, load_classifier


def test_assets_are_shipped_and_small():
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file()) + CLASSIFIER_FILE.stat().st_size
    assert size <= 25 * 2**20, size
    assert all(p.suffix != ".bin" for p in TEACHER_DIR.rglob("*"))  # safetensors only


def test_classifier_and_metrics_on_real_digits():
    clf = load_classifier()
    x, y = load_images()
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    m = digit_metrics(x[::2], y[::2], clf)  # half of the real data against all of it
    assert m["prompt_accuracy"] > 0.95 and m["digits_fid"] < 20 and m["coverage_mean"] > 0.5  # 50-step teacher: ~130
    noise = torch.rand(500, 3, 32, 32) * 2 - 1
    assert digit_metrics(noise, torch.arange(10).repeat(50), clf)["digits_fid"] > 10 * max(m["digits_fid"], 0.1)


def test_frechet_and_coverage_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 4, generator=g).double().numpy()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-3)  # ||mu1 - mu2||^2
    assert coverage(a[:500], a[:500]) == 1.0
    assert coverage(a[:500], a[:500] + 100.0) == 0.0


@pytest.fixture(scope="module")
def short_chain(tmp_path_factory):
    """A short run of the demo chain: prompts -> train_text2image.py -> fresh pipeline -> metrics; with the one-step
    teacher (the real score's CFG) and the generator before training (its LoRA is zero: the teacher at one step
    without CFG) on the same noise."""
    from sd_dmd.demo import evaluate_lora, run_chain

    out = tmp_path_factory.mktemp("digits")
    lora = run_chain(out, num_pairs=0, steps=CI_STEPS, extra=CI_OVERRIDES)
    _, _, distilled = evaluate_lora(lora, n_per_class=30, seed=1)
    _, _, teacher = evaluate_lora(None, n_per_class=30, seed=1)
    _, _, start = evaluate_lora(None, n_per_class=30, seed=1, guidance=0.0)
    print(json.dumps({"distilled": distilled, "teacher_one_step": teacher, "generator_at_step_0": start}, indent=1))
    return distilled, teacher, start


# distribution matching alone (no regression, no GAN: the default has both since issue 27): a broken DM loss then
# cannot hide behind either
CI_STEPS = 150
CI_OVERRIDES = ["--regression.loss", "none", "--gan.real_latents", "none", "--checkpointing.every", "0",
                "--dmd.divergence", "reverse_kl"]  # f-distill's weights read the GAN head, which this run leaves out


def test_distilled_beats_one_step_teacher(short_chain):
    distilled, teacher, _ = short_chain
    assert distilled["digits_fid"] < 0.8 * teacher["digits_fid"], (distilled, teacher)


def test_distilled_improves_on_its_start_and_keeps_its_diversity(short_chain):
    """The generator starts as the one-step teacher without CFG (digits-FID ~240, coverage ~0.44 on 3000 images):
    already far better than the one-step teacher with CFG, so beating the latter alone proves little. Training must
    improve on the start, and coverage must not collapse (the recipe before issue 15 fell to 0.09 with distribution
    matching alone, 0.2x its start; the shipped recipe ends at 1.15x)."""
    distilled, _, start = short_chain
    assert distilled["digits_fid"] < 0.9 * start["digits_fid"], (distilled, start)
    assert distilled["coverage_mean"] >= 0.75 * start["coverage_mean"], (distilled, start)
