"""Train the digits teacher (a complete diffusers StableDiffusionPipeline) and its evaluator, on CPU.

    python -m sd_dmd.evaluation.digits.train_teacher [--out sd_dmd/assets] [--unet_steps 6000]

Stages: (1) AutoencoderKL 32x32x3 <-> 4x8x8, (2) UNet2DConditionModel (eps-prediction, SD's scaled_linear
schedule) jointly with a small CLIPTextModel (real CLIP BPE tokenizer) on templated captions with ~10% empty
ones, so CFG works, (3) the digit classifier used by the metrics. The result is committed in
``sd_dmd/assets``; this script is how to rebuild it (44 min measured on 2 shared CPU cores; ~30 min alone).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sd_dmd.data.digits import load_images, random_captions
from sd_dmd.evaluation.digits.evaluate import DigitClassifier, augment


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def _cosine(opt, total, warmup=200):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def train_vae(images, steps: int, batch: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = _cosine(opt, steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        x = augment(images[torch.randint(0, len(images), (batch,), generator=g)], g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = vae.encode(images).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


def train_unet(images, labels, vae, tokenizer, steps: int, batch: int = 64, seed: int = 0):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet, te = build_unet(), build_text_encoder()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = _cosine(opt, steps)
    ema = EMAModel(params, decay=0.999)
    from sd_dmd.core.schedule import NoiseSchedule

    schedule = NoiseSchedule.scaled_linear()
    sf = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, len(images), 256)]) * sf
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="unet")
    for _ in bar:
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0 = latents[idx]
        ids = tokenizer(random_captions(labels[idx], g), padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        eps = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    return unet.eval(), te.eval()


def train_classifier(images, labels, steps: int = 1500, batch: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3)
    sched = _cosine(opt, steps, warmup=50)
    g = torch.Generator().manual_seed(seed + 2)
    for _ in tqdm(range(steps), desc="classifier"):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        loss = F.cross_entropy(clf(augment(images[idx], g)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(images).argmax(1) == labels).float().mean().item()
    print(f"classifier accuracy on the data: {acc:.4f}")
    return clf


def main(argv=None):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from sd_dmd.models.tiny import clip_tokenizer
    from sd_dmd.data.digits import ASSETS

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--unet_steps", type=int, default=3500)
    p.add_argument("--classifier_steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    images, labels = load_images()
    args.out.mkdir(parents=True, exist_ok=True)
    clf = train_classifier(images, labels, args.classifier_steps, seed=args.seed)
    save_file(clf.state_dict(), str(args.out / "digits_classifier.safetensors"))
    vae = train_vae(images, args.vae_steps, seed=args.seed)
    tokenizer = clip_tokenizer()
    unet, te = train_unet(images, labels, vae, tokenizer, args.unet_steps, seed=args.seed)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.out / "digits_teacher")
    print(f"saved {args.out / 'digits_teacher'} and the classifier in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
