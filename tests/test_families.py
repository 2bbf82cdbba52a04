"""Teachers beyond SD1.5 (issues 28 and 38): a tiny SDXL pipeline (two CLIP encoders, the second with a projection,
``addition_embed_type="text_time"``, built as diffusers' own SDXL tests build one), a tiny v-prediction SD
pipeline and a tiny SD3.5-shaped flow-matching pipeline (MMDiT, CLIP-L/G and T5), through the round trips SD1.5 has: the real score against the plain pipeline's guided x0, one- and
four-step LoRAs in a fresh pipeline against the trainer's samples, the kohya file under ComfyUI's key rule, pairs ->
training with and without the GAN -> resume -> export, and only the stepped adapter learning."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sd_dmd.errors import ModelError
from sd_dmd.models.shared_unet import FAKE, GENERATOR, DMDModel, LoraSpec

PROMPTS = ["a red cube", "two cats on a sofa"]
FAMILIES = ["sdxl", "v", "sd3"]


@pytest.fixture(scope="module", params=FAMILIES)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def pipe_dir(kind, tmp_path_factory):
    from sd_dmd.models.tiny import build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

    out = tmp_path_factory.mktemp(kind) / "pipe"
    if kind == "sdxl":
        return str(build_tiny_sdxl_pipeline(out))
    if kind == "sd3":
        return str(build_tiny_sd3_pipeline(out))
    return str(build_tiny_pipeline(out, prediction_type="v_prediction"))


def _model(pipe_dir, **kw):
    return DMDModel.from_pretrained(pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                    fake_lora=LoraSpec(rank=4, alpha=4.0), real_guidance_scale=3.0, **kw)


def _randomize(m, name, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(m.adapter_named_parameters(name).items()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _z(seed=0, pipe_dir=None):
    """Noise of the family's latent shape: 16 channels for SD3, 4 for the others."""
    ch = 16 if pipe_dir is not None and json.loads(open(f"{pipe_dir}/model_index.json").read())[
        "_class_name"] == "StableDiffusion3Pipeline" else 4
    return torch.randn(len(PROMPTS), ch, 8, 8, generator=torch.Generator().manual_seed(seed))


def _lcm(pipe):
    """The few-step scheduler a user sets on a plain pipeline: LCMScheduler, FlowMatchLCMScheduler for SD3."""
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    flow = type(pipe.scheduler).__name__.startswith("FlowMatch")
    return (FlowMatchLCMScheduler if flow else LCMScheduler).from_config(pipe.scheduler.config)


def test_family_and_prediction_type_are_read(kind, pipe_dir):
    m = _model(pipe_dir)
    assert (m.family.name, m.prediction_type) == {"sdxl": ("sdxl", "epsilon"), "v": ("sd", "v_prediction"),
                                                  "sd3": ("sd3", "flow")}[kind]


def test_real_denoiser_equals_the_plain_pipelines_guided_x0(kind, pipe_dir):
    """One DDIM step from t = 999 to alpha = 1 (trailing spacing, set_alpha_to_one) returns the pipeline's guided x0
    itself: with SDXL its two encoders, pooled embedding, time ids and zeroed unconditional branch; with v its x0."""
    from diffusers import DDIMScheduler

    from sd_dmd.models.family import detect_family

    m = _model(pipe_dir)
    fam = detect_family(pipe_dir)
    pipe = fam.load_pipeline(pipe_dir)
    if kind != "sd3":  # SD3: its own FlowMatchEulerDiscreteScheduler, one step from sigma = 1 to 0, is x0 itself
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    z = _z(1, pipe_dir)
    want = pipe(PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=3.0, height=16, width=16,
                output_type="latent").images
    got = m.real_denoiser()(z, torch.full((2,), 999), m.encode_prompts(PROMPTS))
    # x0 at t = 999 is (x_t - sigma eps) / alpha with alpha = 0.068: |x0| ~ 20 here, so fp32 rounding alone is
    # ~1e-5 absolute; the bound is 1e-5 per unit of the x0's magnitude
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # the check can fail: another guidance, or SDXL's "" encoding instead of zeros, is another x0
    assert (m.real_denoiser(1.0)(z, torch.full((2,), 999), m.encode_prompts(PROMPTS)) - want).abs().max() > 1e-4
    if kind == "sdxl":
        assert torch.equal(m.uncond_embedding[:, :-1], torch.zeros_like(m.uncond_embedding[:, :-1]))
    if kind == "sd3":  # a mutation of the conditioning fails it: CLIP-L's and CLIP-G's parts swapped, in the pooled
        # embedding (16 + 24 wide) or in the hidden states (the tokens' order is no mutation: MMDiT's text tokens have
        # no positions, so their order does not change the output)
        cond = m.encode_prompts(PROMPTS)
        k = m.text.extra_rows

        def swap(x):
            return torch.cat([x[..., 16:40], x[..., :16], x[..., 40:]], -1)

        for bad in (torch.cat([cond[:, :-k], swap(cond[:, -k:])], 1),
                    torch.cat([swap(cond[:, :77]), cond[:, 77:]], 1)):
            assert (m.real_denoiser()(z, torch.full((2,), 999), bad) - want).abs().max() > 1e-4


@pytest.mark.parametrize("timesteps", [[999], [999, 749, 499, 249]])
def test_one_and_four_step_loras_in_a_fresh_pipeline_reproduce_the_trainers_samples(pipe_dir, tmp_path, timesteps):
    from sd_dmd.models.lora import save_lora
    from sd_dmd.outputs.sample import call_kwargs, one_step_pipeline

    m = _model(pipe_dir)
    _randomize(m, GENERATOR, seed=3)
    m.generator_timesteps = timesteps
    save_lora(m, tmp_path / "lora")
    z = _z(0, pipe_dir)

    def seeded():  # SD3's pipeline does not give its generator to the scheduler's step: FlowMatchLCMScheduler draws
        torch.manual_seed(7)  # its re-noising from torch's global RNG, so that is seeded too
        return torch.Generator().manual_seed(7)

    g = seeded()
    ref = m.sample(z, m.encode_prompts(PROMPTS), timesteps, None if m.family.flow else g)
    pipe = one_step_pipeline(pipe_dir, str(tmp_path / "lora"))
    out = pipe(PROMPTS, latents=z.clone(), generator=seeded(), output_type="latent",
               height=16, width=16, **call_kwargs(pipe, timesteps)).images
    assert (out - ref).abs().max().item() <= 1e-4
    from sd_dmd.models.family import detect_family

    plain = detect_family(pipe_dir).load_pipeline(pipe_dir)  # what a user types: load_lora_weights on final/
    plain.load_lora_weights(str(tmp_path / "lora"))
    plain.scheduler = _lcm(plain)
    out = plain(PROMPTS, latents=z.clone(), generator=seeded(), output_type="latent",
                height=16, width=16, **call_kwargs(plain, timesteps)).images
    assert (out - ref).abs().max().item() <= 1e-4
    base = one_step_pipeline(pipe_dir, None)  # the check can fail: without the LoRA it is another sample
    out0 = base(PROMPTS, latents=z.clone(), generator=seeded(), output_type="latent",
                height=16, width=16, **call_kwargs(base, timesteps)).images
    assert (out0 - ref).abs().max().item() > 1e-3


def test_kohya_file_follows_comfyuis_key_rule_and_loads_in_diffusers(pipe_dir, tmp_path):
    """ComfyUI (comfy/lora.py, model_lora_keys_unet) maps ``lora_unet_`` + a diffusers UNet weight's module path with
    dots as underscores to that weight, for SD and SDXL UNets alike, and ``lora_transformer_`` + an SD3 transformer
    weight's path the same way ("OneTrainer lora"): every module of the file must be one of those, with down/up
    shapes that fit it and its alpha. SD and SDXL: diffusers loads the file and samples as the trainer; SD3 (whose
    diffusers loader reads no kohya keys): its down/up are the diffusers file's lora_A/lora_B."""
    from sd_dmd.models.lora import adapter_state_dict, export_kohya
    from sd_dmd.outputs.sample import one_step_call_kwargs, one_step_pipeline

    m = _model(pipe_dir)
    _randomize(m, GENERATOR, seed=7)
    path = export_kohya(m, tmp_path / "kohya" / "lora.safetensors")
    weights = {n.removesuffix(".base_layer.weight").removesuffix(".weight"): p
               for n, p in m.unet.named_parameters() if "lora_" not in n and n.endswith("weight")}
    prefix = "lora_transformer_" if m.family.flow else "lora_unet_"
    comfy = {prefix + k.replace(".", "_"): k for k in weights}
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        modules = {k.split(".", 1)[0] for k in keys}
        assert modules and modules <= comfy.keys(), sorted(modules - comfy.keys())[:3]
        for mod in modules:
            down, up = f.get_tensor(f"{mod}.lora_down.weight"), f.get_tensor(f"{mod}.lora_up.weight")
            w = weights[comfy[mod]]
            assert (up.shape[0], down.shape[1]) == (w.shape[0], w.shape[1]) and f.get_tensor(f"{mod}.alpha") == 8.0
        if m.family.flow:
            sd = adapter_state_dict(m, GENERATOR)
            for mod in modules:
                assert torch.equal(f.get_tensor(f"{mod}.lora_down.weight"), sd[f"{comfy[mod]}.lora_A.weight"])
                assert torch.equal(f.get_tensor(f"{mod}.lora_up.weight"), sd[f"{comfy[mod]}.lora_B.weight"])
    assert len(modules) == len({n.split(".lora_A")[0] for n in m.adapter_named_parameters(GENERATOR) if ".lora_A" in n})
    if m.family.flow:
        return
    z = _z(4)
    ref = m.generate(z, m.encode_prompts(PROMPTS)).detach()
    pipe = one_step_pipeline(pipe_dir, None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    out = pipe(PROMPTS, latents=z.clone(), output_type="latent", height=16, width=16,
               **one_step_call_kwargs(pipe)).images
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def inputs(pipe_dir, tmp_path_factory):
    """Prompts, 8 pairs from the 3-step teacher and 8 encoded random images with captions."""
    from PIL import Image

    import generate_pairs
    from sd_dmd import encode_images

    d = tmp_path_factory.mktemp("inputs")
    (d / "prompts.txt").write_text("\n".join(PROMPTS + ["a blue sphere", "the number seven"]) + "\n")
    generate_pairs.main(["--prompts", str(d / "prompts.txt"), "--pretrained_model_name_or_path", pipe_dir,
                         "--output_dir", str(d / "pairs"), "--resolution", "16", "--num_inference_steps", "3",
                         "--num_pairs", "8"])
    rng = np.random.default_rng(0)
    (d / "img").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
        (d / "img" / f"{i}.txt").write_text(PROMPTS[i % 2])
    encode_images.main(["--images", str(d / "img"), "--pretrained_model_name_or_path", pipe_dir,
                        "--output_dir", str(d / "real"), "--resolution", "16"])
    return {"prompts": str(d / "prompts.txt"), "pairs": str(d / "pairs"), "real": str(d / "real"), "dir": d}


def test_pairs_are_the_plain_pipelines_latents(pipe_dir, inputs):
    from sd_dmd.data.pairs import PairsStore
    from sd_dmd.models.teacher import teacher_latents, teacher_pipeline

    z, got, prompts = PairsStore(inputs["pairs"]).batch([0, 1], verify=True)
    pipe = teacher_pipeline(pipe_dir, "auto", torch.float32, "cpu")  # PNDM; SD3: its own flow Euler
    want = teacher_latents(pipe, list(prompts), z, 3, 3.0, 16)
    assert (got - want).abs().max().item() <= 2e-3 * max(1.0, want.abs().max().item())  # fp16 storage


def _train_argv(pipe_dir, inputs, out, *extra):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return ["--config", str(root / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", pipe_dir,
            "--regression.pairs_dir", inputs["pairs"], "--data.prompts", inputs["prompts"], "--output_dir", str(out),
            *extra]


def test_pairs_training_with_and_without_the_gan_resume_and_export(pipe_dir, inputs, tmp_path):
    from sd_dmd.config import load_config
    from sd_dmd.outputs.export import fuse_lora_into_unet
    from sd_dmd.outputs.sample import call_kwargs, one_step_pipeline
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import train

    def cfg(out, *extra):
        return load_config(Config, _train_argv(pipe_dir, inputs, out, *extra))[0]

    plain = train(cfg(tmp_path / "plain", "--train.max_steps", "2"))
    assert (tmp_path / "plain" / "final" / "lora_kohya.safetensors").is_file()
    gan = ("--gan.real_latents", inputs["real"], "--gan.generator_weight", "0.1", "--gan.discriminator_weight", "0.1",
           "--dmd.generator_timesteps", "999", "499")
    straight = train(cfg(tmp_path / "a", *gan))
    train(cfg(tmp_path / "b", *gan, "--train.max_steps", "2"))
    resumed = train(cfg(tmp_path / "b", *gan), resume=True)
    assert {"loss_gan_generator", "loss_gan_discriminator"} <= set(resumed.history[-1])
    for name in (GENERATOR, FAKE):
        a, b = straight.model.adapter_named_parameters(name), resumed.model.adapter_named_parameters(name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(plain.model.adapter_parameters(GENERATOR),
                                                         resumed.model.adapter_parameters(GENERATOR)))
    info = fuse_lora_into_unet(pipe_dir, str(tmp_path / "b"), tmp_path / "fused")
    assert info["timesteps"] == [999, 499]
    card = (tmp_path / "b" / "final" / "README.md").read_text()
    assert resumed.model.family.pipeline + ".from_pretrained" in card
    pipe = one_step_pipeline(pipe_dir, str(tmp_path / "b"))
    import diffusers

    fused = one_step_pipeline(pipe_dir, None)
    folder, cls = resumed.model.family.network  # the fused UNet, or SD3's fused transformer
    setattr(fused, folder, getattr(diffusers, cls).from_pretrained(tmp_path / "fused"))
    kw = dict(latents=_z(0, pipe_dir), output_type="latent", height=16, width=16, **call_kwargs(pipe, [999, 499]))
    torch.manual_seed(1)  # SD3's FlowMatchLCMScheduler re-noises from the global RNG
    a = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), **kw).images
    torch.manual_seed(1)
    b = fused(PROMPTS, generator=torch.Generator().manual_seed(1), **kw).images
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ckpt", [False, True])
def test_only_the_stepped_adapter_learns(pipe_dir, inputs, ckpt):
    """Regression + GAN + backward simulation with TTUR 2 on the family's UNet: G's turns move G only, the fake
    turns the fake LoRA and the head; base weights and every text encoder stay as they were."""
    from accelerate import Accelerator
    from test_correctness import _frozen_snapshot, configure, watch_turns

    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import Trainer

    argv = _train_argv(pipe_dir, inputs, inputs["dir"] / "unused", "--optim.max_grad_norm", "0",
                       "--gan.real_latents", inputs["real"], "--gan.generator_weight", "0.1",
                       "--gan.discriminator_weight", "0.1", "--dmd.generator_timesteps", "999", "499",
                       "--train.gradient_checkpointing", str(ckpt).lower())
    torch.manual_seed(0)
    t = Trainer(load_config(Config, argv)[0], Accelerator(mixed_precision="no"), log=lambda *a, **k: None)
    frozen = _frozen_snapshot(t)
    texts = [{n: p.detach().clone() for n, p in te.named_parameters()} for te in t.model.text_encoders]
    seen = watch_turns(t)
    configure(t, 2, 1, 2)
    before = {name: [p.detach().clone() for p in t.model.adapter_parameters(name)] for name in (GENERATOR, FAKE)}
    for _ in range(2):
        stats, applied = t.train_step()
        t.step += 1
        assert applied, stats
    assert seen == {"g": 2, "f": 4}
    for name, old in before.items():  # both adapters did train: the checks in watch_turns can fail
        assert any(not torch.equal(a, b) for a, b in zip(old, t.model.adapter_parameters(name))), name
    after = _frozen_snapshot(t)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    for te, snap in zip(t.model.text_encoders, texts):
        assert all(torch.equal(p, snap[n]) and p.grad is None for n, p in te.named_parameters())


def test_other_pipelines_are_refused_in_one_line(tmp_path, capsys):
    """An SD3/Flux/PixArt-style pipeline directory is refused before anything is written, naming its classes."""
    from conftest import assert_one_line_error

    import train_text2image

    d = tmp_path / "flux"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                    "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ModelError, match="a FluxPipeline \\(transformer: FluxTransformer2DModel\\) is not supported"):
        DMDModel.from_pretrained(str(d))
    out = tmp_path / "run"
    (tmp_path / "p.txt").write_text("a cat\n")
    assert_one_line_error(train_text2image.main, ["--config", "configs/tiny.yaml", "--model.pretrained_model_name_or_path",
                                                  str(d), "--output_dir", str(out), "--regression.loss", "none",
                                                  "--data.prompts", str(tmp_path / "p.txt")],
                          capsys, "FluxPipeline (transformer: FluxTransformer2DModel) is not supported; supported "
                                  "teacher families: SD 1.x/2.x")
    assert not out.exists()
    shutil.rmtree(d)


def test_sample_and_evaluate_commands_run_the_familys_pipeline(pipe_dir, tmp_path, monkeypatch):
    """``python -m sd_dmd.sample`` and ``sd_dmd.evaluate`` on the family's pipeline with a 4-step LoRA: the sample's
    pixels are the LoRA's (not the base's), and the evaluator writes its images."""
    from PIL import Image
    from test_evaluate import TinyFeatures
    from torchmetrics.image.fid import FrechetInceptionDistance

    import sd_dmd.evaluation.evaluate as ev
    from sd_dmd import sample
    from sd_dmd.models.lora import save_lora

    m = _model(pipe_dir)
    _randomize(m, GENERATOR, scale=0.3, seed=2)
    m.generator_timesteps = [999, 749, 499, 249]
    save_lora(m, tmp_path / "lora")
    argv = ["--model", pipe_dir, "--prompt", "a cat", "--dtype", "fp32", "--seed", "3"]
    sample.main(argv + ["--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "lora.png")])
    sample.main(argv + ["--out", str(tmp_path / "base.png")])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("lora", "base"))
    assert a.shape == (16, 16, 3) and np.abs(a - b).max() > 8
    monkeypatch.setattr(ev, "make_fid", lambda feature=2048, weights=None: FrechetInceptionDistance(
        feature=TinyFeatures(), reset_real_features=False))
    (tmp_path / "ref").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\na cat\n")
    cfg = ev.EvalConfig(model=pipe_dir, lora=str(tmp_path / "lora"), prompts=str(tmp_path / "p.txt"), num_prompts=3,
                        resolution=16, eval_resolution=16, batch_size=3, dtype="fp32", out_dir=str(tmp_path / "ev"),
                        clip_pretrained=None, reference=str(tmp_path / "ref"), steps=4,
                        timesteps=[999, 749, 499, 249])
    assert ev.evaluate(cfg)["num_images"] == 3 and len(list((tmp_path / "ev" / "images").glob("*.png"))) == 3


def test_gan_head_matches_dmd2s_layers_at_sd15_and_sdxl_shapes():
    """DMD2 (main/sd_guidance.py): SD1.5's 8x8 bottleneck -> Conv4 s2, Conv4 s4, Conv1; SDXL's 32x32 -> three Conv4 s2,
    Conv4 s4, Conv1 (each but the last followed by GroupNorm(32) and SiLU)."""
    from sd_dmd.models.shared_unet import GANHead

    def convs(head):
        return [(c.kernel_size[0], c.stride[0]) for c in head.net if isinstance(c, torch.nn.Conv2d)]

    assert convs(GANHead(64, 8)) == [(4, 2), (4, 4), (1, 1)]
    assert convs(GANHead(64, 32)) == [(4, 2), (4, 2), (4, 2), (4, 4), (1, 1)]
    for size in (8, 32):
        assert GANHead(64, size)(torch.randn(2, 64, size, size)).shape == (2,)


def test_a_separately_saved_vae_encodes_and_trains_only_with_its_own_store(kind, pipe_dir, inputs, tmp_path, capsys):
    """encode_images --vae DIR (an fp16-safe SDXL VAE, say) and training with --model.vae DIR: a store by another VAE
    is refused, naming it, while the matching pair trains."""
    from diffusers import AutoencoderKL

    import train_text2image
    from conftest import assert_one_line_error
    from sd_dmd import encode_images

    if kind != "sdxl":
        pytest.skip("one family is enough for the VAE option")
    vae = AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1)
    vae.save_pretrained(tmp_path / "vae_fix")
    encode_images.main(["--images", str(inputs["dir"] / "img"), "--pretrained_model_name_or_path", pipe_dir,
                        "--vae", str(tmp_path / "vae_fix"), "--output_dir", str(tmp_path / "real"),
                        "--resolution", "16"])
    argv = _train_argv(pipe_dir, inputs, tmp_path / "run", "--train.max_steps", "1", "--gan.real_latents",
                       str(tmp_path / "real"))
    assert_one_line_error(train_text2image.main, argv, capsys, "VAE")
    train_text2image.main(argv + ["--model.vae", str(tmp_path / "vae_fix"), "--output_dir", str(tmp_path / "run2")])
    assert (tmp_path / "run2" / "final" / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    encode_images.main(["--images", str(inputs["dir"] / "img"), "--pretrained_model_name_or_path", pipe_dir,
                        "--output_dir", str(tmp_path / "real16"), "--resolution", "16", "--mixed_precision", "fp16"])
    assert "says force_upcast (it overflows in fp16, as SDXL's does): encoding in fp32" in capsys.readouterr().out


def test_an_sd3_pipeline_saved_without_t5_loads_and_conditions_as_diffusers_does(tmp_path):
    """SD3 saved with text_encoder_3=None (model_index: [null, null]): the family loads it (our model and the plain
    pipeline, which diffusers refuses without text_encoder_3=None), T5's tokens are zeros as the pipeline makes them,
    and the real score still equals the pipeline's guided x0."""
    from sd_dmd.models.family import SD3, detect_family
    from sd_dmd.models.tiny import build_tiny_sd3_pipeline

    path = str(build_tiny_sd3_pipeline(tmp_path / "no_t5", t5=False))
    assert detect_family(path) is SD3
    m = _model(path)
    assert len(m.text_encoders) == 2
    cond = m.encode_prompts(PROMPTS)
    assert torch.equal(cond[:, 77:-m.text.extra_rows], torch.zeros_like(cond[:, 77:-m.text.extra_rows]))
    pipe = SD3.load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    z = _z(2, path)
    want = pipe(PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=3.0, output_type="latent").images
    got = m.real_denoiser()(z, torch.full((2,), 999), cond)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
