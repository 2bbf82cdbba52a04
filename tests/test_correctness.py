"""Gradients that are right where tiny end-to-end tests do not look (issue 13, items 1 and 6).

Every check here compares against an independent reference (no checkpointing, one big batch) and each
failed on the code before the fix: checkpointing recomputed the generator through the fake adapter.
"""
import itertools
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import generate_pairs
from sd_dmd.config import load_config
from sd_dmd.model import FAKE, GENERATOR
from sd_dmd.train import Trainer
from sd_dmd.train_config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("grads")
    (d / "prompts.txt").write_text("a red cube\ntwo cats on a sofa\na blue sphere\nthe number seven\n")
    generate_pairs.main(["--prompts", str(d / "prompts.txt"), "--pretrained_model_name_or_path", tiny_pipe_dir,
                         "--output_dir", str(d / "pairs"), "--resolution", "16", "--num_inference_steps", "3",
                         "--num_pairs", "8"])
    return {"pipe": tiny_pipe_dir, "pairs": str(d / "pairs"), "prompts": str(d / "prompts.txt"), "dir": d}


def make_trainer(setup, *extra) -> Trainer:
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.pairs_dir", setup["pairs"], "--data.prompts", setup["prompts"],
            "--output_dir", str(setup["dir"] / "unused"), "--optim.max_grad_norm", "0", *extra]
    cfg = load_config(Config, argv)[0]
    torch.manual_seed(0)  # identical LoRA A initialisation in every trainer
    return Trainer(cfg, Accelerator(mixed_precision="no"), log=lambda *a, **k: None)


def randomize_adapters(trainer: Trainer, seed: int = 1) -> None:
    """Both adapters non-zero, so the generator, fake and base routes give different activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in (GENERATOR, FAKE):
            for _, p in sorted(trainer.model.adapter_named_parameters(name).items()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def record_updates(trainer: Trainer) -> dict:
    """Wrap both optimisers' ``step`` to record the gradients they apply and the other adapter's values."""
    rec = {"g": [], "f": []}
    for key, opt, params in (("g", trainer.opt_g, trainer.gen_params), ("f", trainer.opt_f, trainer.fake_params)):
        inner = opt.step

        def step(*a, _inner=inner, _params=params, _key=key, **k):
            rec[_key].append([p.grad.detach().clone() for p in _params])
            return _inner(*a, **k)

        opt.step = step
    return rec


def rel(a: list, b: list) -> float:
    fa, fb = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return ((fa - fb).norm() / fb.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("regression,ttur", list(itertools.product(["l2", "none"], [1, 3])))
def test_checkpointing_recomputes_through_the_adapter_that_ran_forward(setup, regression, ttur):
    grads = {}
    for ckpt in (False, True):
        t = make_trainer(setup, "--regression.loss", regression, "--dmd.fake_updates_per_step", str(ttur),
                         "--train.gradient_checkpointing", str(ckpt).lower())
        assert t.model.unet.is_gradient_checkpointing == ckpt
        randomize_adapters(t)
        rec = record_updates(t)
        t.train_step()
        t.train_step()  # the second step starts with the fake adapter active from the last fake turn
        grads[ckpt] = rec
    plain, ck = grads[False], grads[True]
    assert len(plain["g"]) == len(ck["g"]) == 2 and len(plain["f"]) == len(ck["f"]) == 2 * ttur
    for kind in ("g", "f"):
        for a, b in zip(ck[kind], plain[kind]):
            assert torch.cat([x.flatten() for x in b]).norm() > 0
            assert rel(a, b) <= 1e-5, (kind, rel(a, b))
