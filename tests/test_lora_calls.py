"""Issue 35: our LoRA call path (sd_dmd/models/lora_calls.py): the merged form equals the branch, rows routed to their
adapters in one call equal separate calls (with gradients, under gradient checkpointing), the DM loss's one-call real
and fake scores equal separate calls, and a compiled UNet stops compiling after its first steps."""
from pathlib import Path

import pytest
import torch

from sd_dmd.core.losses import dmd_loss
from sd_dmd.core.step import GeneratorBatch, generator_loss
from sd_dmd.models import lora_calls
from sd_dmd.models.shared_unet import FAKE, GENERATOR, DMDModel, LoraSpec, _tuner_layers

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _model(pipe_dir, **kw) -> DMDModel:
    torch.manual_seed(0)
    m = DMDModel.from_pretrained(pipe_dir, generator_lora=LoraSpec(rank=16, alpha=8.0),
                                 fake_lora=LoraSpec(rank=16, alpha=16.0), **kw)
    with torch.no_grad():  # B = 0 at init: give both adapters a real update
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def model(tiny_pipe_dir):
    return _model(tiny_pipe_dir, real_guidance_scale=3.0)


def _grads(m, loss):
    ps = [p for p in m.unet.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, ps, allow_unused=True), ps


def _unet_loss(m, x, t, cond, adapter):
    m._activate(adapter)
    return m.unet(x, t, encoder_hidden_states=cond).sample


def test_merged_form_equals_the_branch_forward_and_gradients(model, monkeypatch):
    """Every Linear and Conv2d LoRA layer of the tiny UNet, fp32 on the CPU: the UNet's output and the gradients of
    both factors and of the input, with the merged form against the branch; and the merged form really ran."""
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    t, cond = torch.tensor([10, 300, 700, 999]), torch.randn(4, 77, model.unet.config.cross_attention_dim)
    out = {}
    calls = []
    apply = lora_calls._MergedLora.apply
    monkeypatch.setattr(lora_calls._MergedLora, "apply", lambda *a: calls.append(1) or apply(*a))
    for merge in (False, True):
        model.set_lora_merge(merge)
        y = _unet_loss(model, x, t, cond, GENERATOR)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        gs, ps = _grads(model, loss)
        gx = torch.autograd.grad(_unet_loss(model, x, t, cond, GENERATOR).pow(2).sum(), x)[0]
        out[merge] = (y.detach(), gs, gx)
    model.set_lora_merge(True)
    assert calls, "the merged form never ran"
    assert rel(out[True][0], out[False][0]) < RTOL
    assert rel(out[True][2], out[False][2]) < RTOL
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    checked = 0
    for n, a, b in zip(names, out[True][1], out[False][1]):
        if f".{GENERATOR}." in n:
            assert a is not None and b is not None and rel(a, b) < RTOL, n
            checked += 1
    assert checked > 20


def test_merged_form_only_where_it_is_exact():
    """fp32 on the CPU at "highest" matmul precision only: in bf16 autocast, bf16 weights or TF32-like matmuls,
    W + s B A would round the adapter's small update against W's larger entries."""
    conv, x = torch.nn.Conv2d(4, 4, 3), torch.randn(1, 4, 8, 8)
    assert lora_calls._merge_exact(x, conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora_calls._merge_exact(x, conv)
    assert not lora_calls._merge_exact(x.bfloat16(), conv.bfloat16())
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not lora_calls._merge_exact(x, conv.float())
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rows_routed_in_one_call_equal_separate_calls(tiny_pipe_dir, checkpointing):
    """[teacher rows | fake rows | generator rows] in one UNet call, with gradients (and recomputed under gradient
    checkpointing), against three calls: outputs and every LoRA gradient to 1e-5."""
    m = _model(tiny_pipe_dir, gradient_checkpointing=checkpointing)
    m.unet.train(checkpointing)  # diffusers checkpoints in training mode only
    x, t = torch.randn(6, 4, 8, 8), torch.tensor([10, 200, 400, 600, 800, 999])
    cond = torch.randn(6, 77, m.unet.config.cross_attention_dim)
    w = torch.linspace(-1, 1, 6 * 4 * 64).view(6, 4, 8, 8)
    layers = _tuner_layers(m.unet)
    with lora_calls.routed(layers, [(None, 2), (FAKE, 2), (GENERATOR, 2)]):
        y1 = m.unet(x, t, encoder_hidden_states=cond).sample
    m._activate(FAKE)  # another role active at backward time: the recompute must still route the rows
    g1, ps = _grads(m, (y1 * w).sum())
    parts = []
    for i, role in enumerate((None, FAKE, GENERATOR)):
        rows = slice(2 * i, 2 * i + 2)
        if role is None:
            m.unet.disable_adapters()
            parts.append(m.unet(x[rows], t[rows], encoder_hidden_states=cond[rows]).sample)
            m.unet.enable_adapters()
        else:
            parts.append(_unet_loss(m, x[rows], t[rows], cond[rows], role))
    y2 = torch.cat(parts)
    g2, _ = _grads(m, (y2 * w).sum())
    assert rel(y1, y2) < RTOL
    names = [n for n, p in m.unet.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, g1, g2):
        if "lora_" in n:
            assert a is not None and b is not None and rel(a, b) < RTOL, n


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_one_call_dm_loss_equals_separate_calls(tiny_pipe_dir, guidance, prediction):
    """generator_loss with train.one_call_roles against separate calls: loss, stats and G's LoRA gradient to 1e-5,
    and one UNet call (of 3B or 2B rows) where there were two."""
    m = _model(tiny_pipe_dir, real_guidance_scale=guidance)
    m.prediction_type = prediction
    g = torch.Generator().manual_seed(1)
    batch = GeneratorBatch(prompts=["a red cube", "a blue sphere", "two cats", "seven"],
                           z=torch.randn(4, 4, 8, 8, generator=g), t=torch.tensor([30, 300, 600, 950]),
                           noise=torch.randn(4, 4, 8, 8, generator=g))
    results = {}
    for one_call in (False, True):
        m.one_call_roles = one_call
        sizes = []
        hook = m.unet.conv_in.register_forward_pre_hook(lambda mod, inp: sizes.append(inp[0].shape[0]))
        loss, stats, _, _ = generator_loss(m, batch)
        hook.remove()
        grads = torch.autograd.grad(loss, m.adapter_parameters(GENERATOR))
        results[one_call] = (loss.detach(), stats, grads, sizes)
    (l0, s0, g0, n0), (l1, s1, g1, n1) = results[False], results[True]
    k = 1 if guidance == 1.0 else 2
    assert n0 == [4, 4 * k, 4] and n1 == [4, 4 * (k + 1)]  # G; real (CFG rows) and fake apart / together
    assert rel(l1, l0) < RTOL
    for key in ("loss_dm", "dm_grad_norm", "dm_real_fake_gap"):
        assert abs(s1[key] - s0[key]) <= RTOL * abs(s0[key]), key
    for a, b in zip(g1, g0):
        assert rel(a, b) < RTOL


def test_a_fake_call_on_other_inputs_runs_on_its_own(model):
    real, fake = model.dm_denoisers()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), model.encode_prompts(["a", "b"])
    real(x, t, c)
    other = x + 1
    want = model.fake_denoiser()(other, t, c)
    assert torch.equal(fake(other, t, c), want)
    real(x, t, c)
    assert rel(fake(x, t, c), model.fake_denoiser()(x, t, c)) < RTOL


def test_compiled_unet_stops_compiling_after_its_first_steps(train_setup, real_latents, tmp_path):
    """train.compile with the GAN head (teacher features), TTUR 2 and regression: every role, both grad modes and
    every batch shape of a step come in the first steps; 3 warm-up steps then 50 more add no graph and no recompile.
    aot_eager traces exactly as inductor does (the guards that decide recompiles are Dynamo's) without generating
    code, so the test takes seconds a step, not minutes."""
    import torch._dynamo
    from accelerate import Accelerator

    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import Trainer

    cfg, _ = load_config(Config, [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(tmp_path / "run"),
        "--model.pretrained_model_name_or_path", train_setup["pipe"], "--data.prompts", train_setup["prompts"],
        "--regression.pairs_dir", train_setup["pairs"], "--gan.real_latents", real_latents,
        "--gan.generator_weight", "0.1", "--gan.discriminator_weight", "1", "--gan.features", "teacher",
        "--dmd.fake_updates_per_step", "2", "--train.compile", "true", "--train.compile_backend", "aot_eager",
        "--logging.tracker", "none", "--train.max_steps", "60"])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    t = Trainer(cfg, Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    for _ in range(3):
        t.train_step()
        t.step += 1
    warm = (dict(counters["frames"]), counters["stats"]["unique_graphs"])
    assert warm[1] > 0, "nothing was compiled"
    for _ in range(50):
        t.train_step()
        t.step += 1
    assert (dict(counters["frames"]), counters["stats"]["unique_graphs"]) == warm
    torch._dynamo.reset()
