"""The Flux family's stages (FluxPipeline-compatible directories: Flux.1-dev, Flux.1-schnell, tiny-flux).

Each stage reuses diffusers' own helpers (encode_prompt, pack/unpack, calculate_shift,
retrieve_timesteps) so the split pipeline is bit-exact with `FluxPipeline.__call__`.
Guidance is distilled into the transformer (`guidance_embeds`); Flux has no negative prompt here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ...cache import CacheConfig
from ...params import UserParams
from ..base import DecoderStage, DenoiserStage, Embeddings, StepCallback, TextEncoderStage, to_uint8
from .spec import FAMILY, vae_scale_factor


class FluxTextEncoder(TextEncoderStage):
    def __init__(self, model, system):
        super().__init__(model, system)
        # A pipeline holding only the text side: encode_prompt is then diffusers' own code.
        self.pipe = FluxPipeline.from_pretrained(
            model.weights, transformer=None, vae=None, dtype=self.dtype
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str | None) -> Embeddings:
        if negative_prompt:
            raise ValueError("the flux family takes no negative prompt")
        prompt_embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=self.model.max_sequence_length
        )
        return Embeddings(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)


class FluxDenoiser(DenoiserStage):
    family = FAMILY

    def __init__(self, model, system, transformer: FluxTransformer2DModel | None = None):
        super().__init__(model, system)
        self.transformer = transformer or FluxTransformer2DModel.from_pretrained(
            model.weights, subfolder="transformer", dtype=self.dtype
        ).to(self.device)
        self.transformer.eval()
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(model.weights, subfolder="scheduler")
        vae_config = AutoencoderKL.load_config(model.weights, subfolder="vae")
        self.vae_scale_factor = vae_scale_factor(vae_config["block_out_channels"])
        self.num_channels_latents = self.transformer.config.in_channels // 4
        self.prepare_transformers()

    def warm_up_embeddings(self) -> Embeddings:
        config = self.transformer.config
        return Embeddings(
            prompt_embeds=torch.zeros(1, self.model.max_sequence_length, config.joint_attention_dim),
            pooled_prompt_embeds=torch.zeros(1, config.pooled_projection_dim),
        )

    def prepare_latents(self, params: UserParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed initial noise [N, h*w/4, 4C] for N = NUM_IMAGES and its position ids, as
        FluxPipeline.prepare_latents (one draw of all N from the seed, as num_images_per_prompt does)."""
        # A CPU generator makes the noise identical on every device and every rank.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        height = 2 * (params.height // (self.vae_scale_factor * 2))
        width = 2 * (params.width // (self.vae_scale_factor * 2))
        batch = params.num_images
        shape = (batch, self.num_channels_latents, height, width)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = FluxPipeline._pack_latents(latents, batch, self.num_channels_latents, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        return latents, image_ids

    def make_scheduler(self, steps: int, image_seq_len: int) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
        """A fresh scheduler per request: scheduler state must never be shared between requests."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        cfg = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    @torch.inference_mode()
    def denoise(
        self,
        embeddings: Embeddings,
        params: UserParams,
        on_step: StepCallback | None = None,
        stats: dict | None = None,
        cache_config: CacheConfig | None | str = "model",
    ) -> torch.Tensor:
        """`cache_config` "model": mapped from the model yaml and CACHE_RATIO; a CacheConfig or None
        overrides it (benchmarks sweep configs that are not in any yaml)."""
        embeddings.validate()
        # NUM_IMAGES images of one prompt: its embeddings repeated, as encode_prompt(num_images_per_prompt=N)
        prompt_embeds = embeddings.prompt_embeds[:1].to(self.device, self.dtype).repeat(params.num_images, 1, 1)
        pooled = embeddings.pooled_prompt_embeds[:1].to(self.device, self.dtype).repeat(params.num_images, 1)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)

        # 1. Initial noise and timesteps
        latents, image_ids = self.prepare_latents(params)
        scheduler, timesteps = self.make_scheduler(params.steps, latents.shape[1])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])

        # 2. Denoising loop, with this request's own feature cache (none at CACHE_RATIO 0)
        cache_config = self.cache_config_for(params, cache_config)
        with self.open_cache(self.transformer, cache_config, total_steps=len(timesteps)) as cache:
            for i, t in enumerate(timesteps):
                cache.step(i)
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                with cache.branch("cond"):
                    noise_pred = self.transformer(
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
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        if stats is not None:
            stats.update(cache.stats())

        # 3. Back to the VAE's latent layout [N, C, H/8, W/8]
        return FluxPipeline._unpack_latents(latents, params.height, params.width, self.vae_scale_factor)


class FluxDecoder(DecoderStage):
    def __init__(self, model, system):
        super().__init__(model, system)
        self.vae = self.load_vae(AutoencoderKL)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.decode_with(latents, None)

    @torch.inference_mode()
    def decode_with(self, latents: torch.Tensor, tiled_decode: Callable | None) -> np.ndarray:
        """Decode; `tiled_decode(vae, z)` replaces the VAE's own decode when the latents span several tiles
        (the parallel decode of a pool)."""
        if latents.ndim != 4 or latents.shape[1] != self.vae.config.latent_channels:
            raise ValueError(
                f"LATENTS: expected shape [N, {self.vae.config.latent_channels}, h, w], got {list(latents.shape)}"
            )
        latents = latents.to(self.device, self.dtype)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        spans_tiles = max(latents.shape[-2:]) > self.vae.tile_latent_min_size
        if tiled_decode is not None and spans_tiles:
            image = tiled_decode(self.vae, latents)
        else:
            image = self.vae.decode(latents, return_dict=False)[0]
        return to_uint8(image)  # [N, H, W, 3]
