"""Reference denoise loops with the cache wired in: the integration recipe in executable form.

``flux_denoise`` is ``FluxDenoiser.denoise`` line for line plus the four cache lines (marked ``# cache``);
``wan_denoise`` is ``WanPipeline.__call__``'s loop (true CFG: a "cond" and an "uncond" branch per step).
Tests and bench/cache_bench.py use them until the families' own loops carry the same lines.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

from .config import CacheConfig
from .session import request_cache

__all__ = ["flux_denoise", "wan_denoise"]


@torch.inference_mode()
def flux_denoise(denoiser: Any, embeddings: Any, params: Any, config: CacheConfig | None) -> tuple[torch.Tensor, dict]:
    """FluxDenoiser.denoise with a cache: -> (latents [1, C, H/8, W/8], cache stats)."""
    embeddings.validate()
    prompt_embeds = embeddings.prompt_embeds[:1].to(denoiser.device, denoiser.dtype)
    pooled = embeddings.pooled_prompt_embeds[:1].to(denoiser.device, denoiser.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=denoiser.device, dtype=denoiser.dtype)

    # 1. Initial noise and timesteps
    latents, image_ids = denoiser.prepare_latents(params)
    scheduler, timesteps = denoiser.make_scheduler(params.steps, latents.shape[1])
    guidance = None
    if denoiser.transformer.config.guidance_embeds:
        guidance = torch.full([1], params.guidance_scale, device=denoiser.device, dtype=torch.float32)

    # 2. Denoising loop
    with request_cache(denoiser.transformer, config, total_steps=len(timesteps)) as cache:  # cache
        for i, t in enumerate(timesteps):
            cache.step(i)  # cache
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            with cache.branch("cond"):  # cache
                noise_pred = denoiser.transformer(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    return_dict=False,
                )[0]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    # 3. Back to the VAE's latent layout [1, C, H/8, W/8]
    out = FluxPipeline._unpack_latents(latents, params.height, params.width, denoiser.vae_scale_factor)
    return out, cache.stats()  # cache


@torch.inference_mode()
def wan_denoise(
    transformer: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    steps: int,
    config: CacheConfig | None,
) -> tuple[torch.Tensor, dict]:
    """WanPipeline's loop (fresh ``scheduler`` per request) with a cache: -> (latents [B, C, F, H, W], stats)."""
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    do_cfg = negative_prompt_embeds is not None and guidance_scale > 1.0
    with request_cache(transformer, config, total_steps=len(timesteps)) as cache:
        for i, t in enumerate(timesteps):
            cache.step(i)
            latent_model_input = latents.to(transformer.dtype)
            timestep = t.expand(latents.shape[0])
            with cache.branch("cond"):
                noise_pred = transformer(
                    hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False
                )[0]
            if do_cfg:
                with cache.branch("uncond"):
                    noise_uncond = transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=negative_prompt_embeds,
                        return_dict=False,
                    )[0]
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents, cache.stats()
