"""Stand-in Stable Diffusion pipelines built from configs, offline (no weights downloaded): the tiny random pipeline
of the tests and ``configs/tiny.yaml``, an SD1.5-shaped one for benchmarks, and the CLIP tokenizer from open_clip's
bundled vocabulary (DESIGN.md, "Offline facts")."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte-to-unicode table (as open_clip.tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write vocab.json + merges.txt of OpenAI CLIP's tokenizer (49408 tokens) from open_clip's copy."""
    import open_clip
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def clip_tokenizer():
    """OpenAI CLIP's tokenizer built offline from open_clip's vocabulary (its files in a temporary directory)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(d))


def build_tiny_pipeline(out_dir: str | Path, *, sample_size: int = 8, unet_channels=(32, 64), text_dim: int = 32,
                        text_layers: int = 2, vae_channels=(32, 64), prediction_type: str = "epsilon", seed: int = 0):
    """Build and save a small random ``StableDiffusionPipeline`` (latent 4 x sample_size^2).

    Image resolution = sample_size * 2 ** (len(vae_channels) - 1).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8,
    )
    m = len(vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * m, up_block_types=("UpDecoderBlock2D",) * m,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2 ** (m - 1))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = clip_tokenizer()
    # SD v1.5's own scheduler config
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type=prediction_type, skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_tiny_sdxl_pipeline(out_dir: str | Path, *, sample_size: int = 8, text_dim: int = 32,
                             prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build and save a small random ``StableDiffusionXLPipeline`` shaped as diffusers' own SDXL tests build one: two
    CLIP text encoders (the second with a projection: the pooled embedding), a UNet with
    ``addition_embed_type="text_time"`` (time ids and pooled embedding join the time embedding) and cross-attention
    on both encoders' hidden states concatenated; EulerDiscrete, SDXL base's scheduler. Latents 4 x sample_size^2,
    images twice that (a two-level VAE)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + text_dim, cross_attention_dim=2 * text_dim,
        norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2, scaling_factor=0.13025)
    cfg = dict(hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407, projection_dim=text_dim)
    tok = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                              text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), tokenizer=tok,
                              tokenizer_2=tok, unet=unet, scheduler=scheduler,
                              force_zeros_for_empty_prompt=True).save_pretrained(out)
    return out


def build_sdxl_shaped_unet(dtype=torch.bfloat16):
    """SDXL base's UNet (2.6B parameters) with random weights, from its published config values: for memory and
    speed benchmarks at SDXL's shape (random weights time and weigh exactly like real ones)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
        projection_class_embeddings_input_dim=2816, cross_attention_dim=2048).to(dtype)


def build_sdxl_shaped_pipeline(out: str | Path, dtype=torch.bfloat16) -> Path:
    """Save an SDXL-base-shaped pipeline with random weights in ``dtype``: its UNet (:func:`build_sdxl_shaped_unet`),
    VAE (SD's shape, scaling 0.13025), CLIP ViT-L and OpenCLIP bigG (with projection) text encoders, EulerDiscrete."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    common = dict(max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    tok = clip_tokenizer()
    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                 timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                              unet=build_sdxl_shaped_unet(dtype), scheduler=sch).to(dtype).save_pretrained(out)
    return out


def build_sd15_shaped_pipeline(out: str | Path) -> Path:
    """Save an SD1.5-shaped pipeline with random weights (tokenizer from open_clip's vocabulary)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD1.5's
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act="quick_gelu", projection_dim=768))
    tok = clip_tokenizer()
    sch = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                        set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def t5_tokenizer(words: int = 4000):
    """A T5-style fast tokenizer built offline (the T5 one of SD3 is a 32k SentencePiece model we cannot download):
    T5's special tokens (<pad> 0, </s> 1, <unk> 2), a Unigram model over the single characters and the first
    ``words`` whole words of open_clip's CLIP vocabulary, T5's Metaspace pre-tokenizer and its "$A </s>"
    post-processor, so prompts tokenize as T5's do in shape: word pieces, then </s>, padded with <pad>."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as d:
        clip_vocab = json.loads((write_clip_tokenizer(d) / "vocab.json").read_text())
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]
    seen = set(pieces)
    for tok in clip_vocab:
        w = "\u2581" + tok[:-4] if tok.endswith("</w>") and tok[:-4].isalpha() else None
        if w and w not in seen:
            seen.add(w)
            pieces.append(w)
            if len(pieces) >= words:
                break
    uni = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    uni.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    uni.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=uni, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def build_tiny_sd3_pipeline(out_dir: str | Path, *, sample_size: int = 8, seed: int = 0, t5: bool = True) -> Path:
    """Build and save a small random ``StableDiffusion3Pipeline`` shaped as SD3.5-Medium: an MMDiT with QK RMS-norm
    and a dual-attention (MMDiT-X) first block, 16 latent channels, a VAE with SD3's scaling and shift factors and no
    quant convs, CLIP-L- and CLIP-G-like encoders with projections (pooled 16 + 24), a T5 encoder (width 64 > 16 + 24,
    so the CLIP states are zero-padded as in SD3) with :func:`t5_tokenizer`, and ``FlowMatchEulerDiscreteScheduler``
    with SD3's shift 3. ``t5=False`` saves it without T5 (the pipeline then uses zeros for T5's tokens)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=40,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    common = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=24, **common))
    tok3 = t5_tokenizer()
    te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8)) if t5 else None
    tok = clip_tokenizer()
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                             text_encoder_3=te3, tokenizer_3=tok3 if t5 else None).save_pretrained(out)
    return out


def build_sd35_shaped_pipeline(out: str | Path, dtype=torch.bfloat16) -> Path:
    """Save an SD3.5-Medium-shaped ``StableDiffusion3Pipeline`` with random weights in ``dtype``: its MMDiT (24 joint
    blocks, 1536 wide, dual attention in the first 13, QK RMS-norm; 2.2 B parameters), SD3's VAE shape (16 latent
    channels, scale 1.5305, shift 0.0609), CLIP ViT-L and OpenCLIP bigG with projections, and no T5: a run from
    ``data.text_cache`` never loads T5, and without it the pipeline's T5 tokens are zeros of the same shape.
    For memory and speed benchmarks (random weights weigh and time like real ones)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out = Path(out)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    common = dict(max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    tok = clip_tokenizer()
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None,
                             tokenizer_3=None).to(dtype).save_pretrained(out)
    return out
