"""The shared UNet in its three roles, and LoRAs that load into plain diffusers."""

import pytest
import torch

from sd_dmd.outputs.export import export_fused_unet
from sd_dmd.models.lora import export_kohya, load_adapter, save_lora
from sd_dmd.core.losses import dmd_loss, fake_score_loss
from sd_dmd.models.shared_unet import FAKE, GENERATOR, DMDModel, LoraSpec
from sd_dmd.errors import ModelError
from sd_dmd.outputs.sample import one_step_call_kwargs, one_step_generate, one_step_pipeline

PROMPTS = ["a red cube", "two cats on a sofa"]


def _randomize(model, name, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.adapter_parameters(name):
        p.data = (torch.randn(p.shape, generator=g) * scale).float()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.unet.named_parameters() if not torch.equal(before[n], p.detach())}


def _z(n=2, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_adapters_disabled_equals_base_unet(tiny_model, tiny_pipe_dir):
    from diffusers import UNet2DConditionModel

    _randomize(tiny_model, GENERATOR)
    _randomize(tiny_model, FAKE, seed=1)
    base = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    x, t, c = _z(), torch.tensor([10, 700]), tiny_model.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = base(x, t, encoder_hidden_states=c).sample
        out = tiny_model._predict(None)(x, t, c)
        gen = tiny_model._predict(GENERATOR)(x, t, c)
    assert torch.equal(out, ref)
    assert (gen - ref).abs().max() > 1e-4  # the adapter is really on otherwise


def test_loras_start_as_teacher(tiny_model):
    x, t, c = _z(), torch.tensor([999, 999]), tiny_model.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = tiny_model._predict(None)(x, t, c)
        assert torch.equal(tiny_model._predict(GENERATOR)(x, t, c), ref)
        assert torch.equal(tiny_model._predict(FAKE)(x, t, c), ref)


def test_describe_counts(tiny_model):
    text = tiny_model.describe()
    assert "base UNet2DConditionModel" in text and "LoRA 'generator'" in text and "LoRA 'fake'" in text


def test_generator_step_changes_only_generator_lora(tiny_model):
    m = tiny_model
    _randomize(m, FAKE, seed=3)  # so the fake score differs from the real one
    opt = torch.optim.AdamW(m.adapter_parameters(GENERATOR), lr=1e-2)
    before = _snapshot(m)
    c = m.encode_prompts(PROMPTS)
    x = m.generate(_z(), c)
    loss, stats = dmd_loss(x, m.real_denoiser(), m.fake_denoiser(), torch.tensor([200, 800]), _z(seed=1),
                           m.schedule, c)
    loss.backward()
    opt.step()
    changed = _changed(before, m)
    gen_names = set(m.adapter_named_parameters(GENERATOR))
    assert changed and changed <= gen_names
    assert all(p.grad is None for p in m.adapter_parameters(FAKE))


def test_fake_step_changes_only_fake_lora(tiny_model):
    m = tiny_model
    opt = torch.optim.AdamW(m.adapter_parameters(FAKE), lr=1e-2)
    before = _snapshot(m)
    c = m.encode_prompts(PROMPTS)
    with torch.no_grad():
        x = m.generate(_z(), c)
    loss, _ = fake_score_loss(m.fake_denoiser(), x, torch.tensor([5, 900]), _z(seed=2), m.schedule, c)
    loss.backward()
    opt.step()
    changed = _changed(before, m)
    assert changed and changed <= set(m.adapter_named_parameters(FAKE))


def test_batched_cfg_equals_two_forwards(tiny_model):
    m = tiny_model
    x, t, c = _z(), torch.tensor([300, 600]), m.encode_prompts(PROMPTS)
    out = m.real_denoiser(3.0)(x, t, c)
    eps = m._predict(None)
    with torch.no_grad():
        e_u = eps(x, t, m.uncond_embedding.expand_as(c))
        e_c = eps(x, t, c)
    expected = m.schedule.eps_to_x0(x, e_u + 3.0 * (e_c - e_u), t)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not out.requires_grad


@pytest.mark.parametrize("scheduler", ["lcm", "ddim_trailing"])
def test_saved_lora_reproduces_generator_in_fresh_pipeline(tiny_model, tiny_pipe_dir, tmp_path, scheduler):
    m = tiny_model
    _randomize(m, GENERATOR, scale=0.1)
    save_lora(m, tmp_path / "lora")
    meta_ok = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert meta_ok
    z = _z()
    with torch.no_grad():
        ref = m.generate(z, m.encode_prompts(PROMPTS))
    pipe = one_step_pipeline(tiny_pipe_dir, str(tmp_path / "lora"), scheduler=scheduler)
    out = pipe(PROMPTS, latents=z.clone(), output_type="latent", **one_step_call_kwargs(pipe)).images
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, diff
    # the same LoRA without alpha/r scaling would be far off: the check can fail
    base = one_step_pipeline(tiny_pipe_dir, None, scheduler=scheduler)
    out0 = base(PROMPTS, latents=z.clone(), output_type="latent", **one_step_call_kwargs(base)).images
    assert (out0 - ref).abs().max() > 1e-3
    # the fast path (LoRA fused into the weights, channels_last) gives the same images
    fast = one_step_pipeline(tiny_pipe_dir, str(tmp_path / "lora"), scheduler=scheduler, fuse=True, channels_last=True)
    assert any(getattr(mod, "merged", False) for mod in fast.unet.modules())  # the LoRA really was fused
    out_fast = fast(PROMPTS, latents=z.clone(), output_type="latent", **one_step_call_kwargs(fast)).images
    assert (out_fast - ref).abs().max().item() < 1e-4
    # the direct call (no pipeline machinery) gives the same latents and the same decoded images
    lat = one_step_generate(fast, PROMPTS, latents=z.clone(), output_type="latent")
    assert (lat - ref).abs().max().item() < 1e-4
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    img = one_step_generate(fast, PROMPTS, generator=g, output_type="pt")
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    img_pipe = fast(PROMPTS, generator=g, output_type="pt", **one_step_call_kwargs(fast)).images
    assert img.shape == img_pipe.shape and (img - img_pipe).abs().max().item() < 1e-4


def test_load_adapter_roundtrip(tiny_model, tiny_pipe_dir, tmp_path):
    _randomize(tiny_model, FAKE, seed=5)
    save_lora(tiny_model, tmp_path / "fake", FAKE)
    other = DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                     fake_lora=LoraSpec(rank=4, alpha=4.0))
    load_adapter(other, FAKE, tmp_path / "fake")
    a, b = tiny_model.adapter_named_parameters(FAKE), other.adapter_named_parameters(FAKE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_export_loads_in_diffusers(tiny_model, tiny_pipe_dir, tmp_path):
    from safetensors import safe_open

    m = tiny_model
    _randomize(m, GENERATOR, scale=0.1, seed=7)
    path = export_kohya(m, tmp_path / "kohya" / "lora.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    assert alphas == {8.0}
    z = _z(seed=4)
    with torch.no_grad():
        ref = m.generate(z, m.encode_prompts(PROMPTS))
    pipe = one_step_pipeline(tiny_pipe_dir, None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    out = pipe(PROMPTS, latents=z.clone(), output_type="latent", **one_step_call_kwargs(pipe)).images
    assert (out - ref).abs().max().item() < 1e-4


def test_fused_unet_equals_adapter(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    m = tiny_model
    _randomize(m, GENERATOR, scale=0.1, seed=9)
    export_fused_unet(m, tmp_path / "fused")
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused")
    assert not any("lora" in n for n, _ in fused.named_parameters())
    x, t, c = _z(), torch.tensor([999, 999]), m.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = m._predict(GENERATOR)(x, t, c)
        out = fused(x, t, encoder_hidden_states=c).sample
    assert (out - ref).abs().max().item() < 1e-4


def test_sample_prediction_refused(tmp_path):
    """eps and v teachers are supported (tests/test_families.py); an x0 ("sample") teacher is refused by name."""
    from sd_dmd.models.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / "x0", prediction_type="sample")
    with pytest.raises(ModelError, match="prediction_type is 'sample'; supported: epsilon, v_prediction"):
        DMDModel.from_pretrained(str(path))


def test_missing_unet_refused(tmp_path, tiny_pipe_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipe_dir, bad)
    shutil.rmtree(bad / "unet")
    with pytest.raises(ModelError, match="unet/"):
        DMDModel.from_pretrained(str(bad))


def test_rank_zero_refused(tiny_pipe_dir):
    with pytest.raises(ModelError, match="rank"):
        DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=0))


def test_four_step_lora_in_a_fresh_pipeline_reproduces_the_trainers_sample(tiny_model, tiny_pipe_dir, tmp_path):
    """DMD2's few-step generator: the saved LoRA records its timesteps, and diffusers' LCMScheduler at those
    timesteps (guidance 0) gives the trainer's own 4-step sample when both draw the re-noising noise from the
    same generator (issue 16)."""
    from sd_dmd.outputs.sample import call_kwargs
    from sd_dmd.models.lora import resolve_lora

    m = tiny_model
    _randomize(m, GENERATOR, scale=0.1, seed=3)
    ts = [999, 749, 499, 249]
    m.generator_timesteps = ts
    try:
        save_lora(m, tmp_path / "lora4")
    finally:
        m.generator_timesteps = [999]
    assert resolve_lora(str(tmp_path / "lora4")).timesteps == ts
    z = _z()
    ref = m.sample(z, m.encode_prompts(PROMPTS), ts, torch.Generator().manual_seed(7))
    pipe = one_step_pipeline(tiny_pipe_dir, str(tmp_path / "lora4"))
    out = pipe(PROMPTS, latents=z.clone(), generator=torch.Generator().manual_seed(7), output_type="latent",
               **call_kwargs(pipe, ts)).images
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, diff
    # one step of the same LoRA is another sample (the check can fail), and so is other re-noising noise
    assert (m.sample(z, m.encode_prompts(PROMPTS), ts[:1]) - ref).abs().max() > 1e-3
    assert (m.sample(z, m.encode_prompts(PROMPTS), ts, torch.Generator().manual_seed(8)) - ref).abs().max() > 1e-3


def test_backward_simulation_runs_k_steps_without_grad_then_one_with(tiny_model):
    from sd_dmd.core.step import backward_simulate

    m = tiny_model
    _randomize(m, GENERATOR, scale=0.05, seed=4)
    ts = [999, 749, 499, 249]
    cond = m.encode_prompts(PROMPTS)
    z = _z()
    noise = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x = backward_simulate(m, z, cond, ts, 0, None)  # k = 0: the one-step case, pure noise in
    assert torch.allclose(x, m.generate(z, cond), atol=1e-6)
    x2 = backward_simulate(m, z, cond, ts, 2, noise)
    with torch.no_grad():
        x_t = z
        for i in range(2):
            x_t = m.schedule.add_noise(m.generate(x_t, cond, ts[i]), noise[:, i],
                                       torch.full((2,), ts[i + 1], dtype=torch.long))
        manual = m.generate(x_t, cond, ts[2])
    assert torch.allclose(x2, manual, atol=1e-5)
    # only the last call carries gradients: its input is a leaf-free constant
    x2.sum().backward()
    g = [p.grad for p in m.adapter_parameters(GENERATOR) if p.grad is not None]
    assert g and any(v.abs().sum() > 0 for v in g)
    m.unet.zero_grad(set_to_none=True)
