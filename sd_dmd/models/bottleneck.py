"""What the GAN head reads: the shared network's features halfway through, for a UNet (its bottleneck) or an MMDiT
(the image tokens of its middle block, on the latent grid)."""
from __future__ import annotations

from typing import Optional

import torch

from sd_dmd.errors import ModelError


def unet_bottleneck(unet, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: Optional[dict] = None):
    """The UNet's forward up to and including the mid block (conv_in, time and added embeddings, down blocks, mid
    block): what DMD2's discriminator reads ("cls_on_clean_image", ``classify_mode``). The same calls, in the same
    order, as ``UNet2DConditionModel.forward`` for SD-style UNets and SDXL's (``addition_embed_type="text_time"``:
    the pooled text embedding and time ids join the time embedding)."""
    cfg = unet.config
    if cfg.get("class_embed_type") or cfg.get("addition_embed_type") not in (None, "text_time"):
        raise ModelError("the GAN head supports SD and SDXL UNets only; this UNet has "
                         f"class_embed_type={cfg.get('class_embed_type')}, "
                         f"addition_embed_type={cfg.get('addition_embed_type')}")
    if unet.mid_block is None:
        raise ModelError("the GAN head reads the UNet's mid block, and this UNet has none")
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    return unet.mid_block(h, emb)


def transformer_bottleneck(net, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                           pooled_projections: torch.Tensor) -> torch.Tensor:
    """SD3's ``SD3Transformer2DModel`` up to its middle joint block: patch and position embedding, the time + pooled
    text embedding, the context embedder, then the first half of the blocks (n // 2 of n, one at least), the same
    calls as its ``forward``. Returns the image tokens on the latent grid, (B, D, H / p, W / p): a middle block's
    features reshaped to the grid, as NVlabs/FastGen's DiT discriminators read them."""
    h, w = sample.shape[-2:]
    p = net.config.patch_size
    x = net.pos_embed(sample).contiguous()
    temb = net.time_text_embed(timestep, pooled_projections)
    ctx = net.context_embedder(encoder_hidden_states)
    for block in net.transformer_blocks[:max(1, len(net.transformer_blocks) // 2)]:
        if torch.is_grad_enabled() and net.gradient_checkpointing:
            ctx, x = net._gradient_checkpointing_func(block, x, ctx, temb, None)
        else:
            ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], h // p, w // p)


def bottleneck(net, sample: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
    """The GAN head's features of ``net``: :func:`transformer_bottleneck` for an MMDiT, else
    :func:`unet_bottleneck`. ``timestep``: what the network is given (``NoiseSchedule.model_timestep``)."""
    if hasattr(net, "transformer_blocks"):
        return transformer_bottleneck(net, sample, timestep, **kwargs)
    return unet_bottleneck(net, sample, timestep, **kwargs)
