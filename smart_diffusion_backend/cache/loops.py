"""Reference denoise loops with the cache wired in: the integration recipe in executable form.

``flux_denoise`` runs ``FluxDenoiser.denoise`` (which carries the cache) with a given config;
``wan_denoise`` is ``WanPipeline.__call__``'s loop (true CFG: a "cond" and an "uncond" branch per step).
Tests and bench/cache_bench.py use them until the families' own loops carry the same lines.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import CacheConfig
from .session import request_cache

__all__ = ["flux_denoise", "wan_denoise"]


def flux_denoise(denoiser: Any, embeddings: Any, params: Any, config: CacheConfig | None) -> tuple[torch.Tensor, dict]:
    """FluxDenoiser.denoise with an explicit cache config (tests and the bench sweep configs that are not
    in a model yaml): -> (latents [1, C, H/8, W/8], cache stats)."""
    stats: dict = {}
    latents = denoiser.denoise(embeddings, params, stats=stats, cache_config=config)
    return latents, stats


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
    reduce=None,
) -> tuple[torch.Tensor, dict]:
    """WanPipeline's loop (fresh ``scheduler`` per request) with a cache: -> (latents [B, C, F, H, W], stats)."""
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    do_cfg = negative_prompt_embeds is not None and guidance_scale > 1.0
    with request_cache(transformer, config, total_steps=len(timesteps), reduce=reduce) as cache:
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
