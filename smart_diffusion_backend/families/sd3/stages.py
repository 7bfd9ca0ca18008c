"""The SD3 family's stages (StableDiffusion3Pipeline-compatible directories: SD3-medium, SD3.5 medium / large,
tiny-sd3).

Each stage reuses diffusers' own code (StableDiffusion3Pipeline.encode_prompt with its three encoders,
calculate_shift / retrieve_timesteps, randn_tensor, the VAE's scaling and shift factors) and follows
``StableDiffusion3Pipeline.__call__`` step for step, so the split pipeline is bit-exact with it
(``generator=torch.Generator("cpu").manual_seed(seed)``).

Guidance is true classifier-free guidance (``do_classifier_free_guidance = guidance_scale > 1``) with the
negative prompt defaulting to "", as the pipeline: one transformer forward of batch 2, [negative; prompt],
per step. A CFG-parallel pool (``run_branches`` swapped) runs the two rows as two forwards instead, one on
each half of its GPUs. Skip-layer guidance, IP-Adapter and ``clip_skip`` are not served.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ...cache import CacheConfig
from ...errors import ParamError
from ...params import UserParams
from ..base import (
    DenoiserStage,
    Embeddings,
    StepCallback,
    TextEncoderStage,
    run_branches_sequentially,
)
from ..flux.stages import FluxDecoder
from .spec import FAMILY, t5_tokens, vae_scale_factor


class SD3TextEncoder(TextEncoderStage):
    def __init__(self, model, system):
        super().__init__(model, system)
        # A pipeline holding only the text side (CLIP-L, CLIP-G, T5 and their tokenizers): encode_prompt is
        # then diffusers' own code.
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            model.weights, transformer=None, vae=None, dtype=self.dtype
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if self.pipe.text_encoder_3 is None:
            raise ValueError(f"{model.weights}: no text_encoder_3 (T5); the sd3 family serves the three encoders")
        self.t5_tokens = t5_tokens(model.max_sequence_length, self.pipe.tokenizer_max_length)

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str | None) -> Embeddings:
        # Both rows always: this stage does not see GUIDANCE_SCALE; the denoiser uses row 1 only when
        # guidance > 1. Each row is encoded on its own (as the pipeline does), so row 0 does not depend on row 1.
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt or "",  # StableDiffusion3Pipeline's default negative prompt
            do_classifier_free_guidance=True,
            device=self.device,
            max_sequence_length=self.t5_tokens,
        )
        return Embeddings(
            prompt_embeds=torch.cat([prompt_embeds, negative_embeds]),  # [2, 77 + T5, D]: prompt, negative
            pooled_prompt_embeds=torch.cat([pooled, negative_pooled]),  # [2, P]
        )


class SD3Denoiser(DenoiserStage):
    family = FAMILY

    def __init__(self, model, system, transformer: SD3Transformer2DModel | None = None):
        super().__init__(model, system)
        self.transformer = transformer or SD3Transformer2DModel.from_pretrained(
            model.weights, subfolder="transformer", dtype=self.dtype
        ).to(self.device)
        self.transformer.eval()
        if not getattr(self.transformer, "_repeated_blocks", None):
            # diffusers 0.42.1's SD3Transformer2DModel names no `_repeated_blocks` (Flux's and Wan's do): name
            # its blocks, so regional compile (compile_transformer) compiles them.
            self.transformer._repeated_blocks = ["JointTransformerBlock"]
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(model.weights, subfolder="scheduler")
        vae_config = AutoencoderKL.load_config(model.weights, subfolder="vae")
        self.vae_scale_factor = vae_scale_factor(vae_config["block_out_channels"])
        config = self.transformer.config
        self.patch_size = config.patch_size
        self.num_channels_latents = config.in_channels
        self.size_multiple = self.vae_scale_factor * self.patch_size
        # PatchEmbed crops its positional embedding to the latent size: at most pos_embed_max_size patches a side.
        self.max_side = config.pos_embed_max_size * self.size_multiple if config.pos_embed_max_size else None
        self.prepare_transformers()

    def warm_up_embeddings(self) -> Embeddings:
        # Both rows, as the text encoder sends them: the prompt and the negative prompt.
        config = self.transformer.config
        return Embeddings(
            prompt_embeds=torch.zeros(2, self.model.max_sequence_length, config.joint_attention_dim),
            pooled_prompt_embeds=torch.zeros(2, config.pooled_projection_dim),
        )

    def check(self, params: UserParams) -> None:
        """What StableDiffusion3Pipeline / PatchEmbed would refuse, as a ParamError naming the field."""
        for name, value in (("HEIGHT", params.height), ("WIDTH", params.width)):
            if value % self.size_multiple:
                raise ParamError(name, f"{value} is not a multiple of {self.size_multiple} (VAE scale x patch size)")
            if self.max_side is not None and value > self.max_side:
                raise ParamError(name, f"{value} is larger than this transformer's positional embedding ({self.max_side})")

    def prepare_latents(self, params: UserParams, dtype: torch.dtype) -> torch.Tensor:
        """Initial noise [N, C, H/8, W/8] for N = NUM_IMAGES, as StableDiffusion3Pipeline.prepare_latents (one
        draw of all N from the seed, as num_images_per_prompt does)."""
        # A CPU generator makes the noise identical on every device and every rank.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        shape = (
            params.num_images,
            self.num_channels_latents,
            params.height // self.vae_scale_factor,
            params.width // self.vae_scale_factor,
        )
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def make_scheduler(self, steps: int, latents: torch.Tensor) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
        """A fresh scheduler per request: scheduler state must never be shared between requests."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kwargs = {}
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting", None):  # as the pipeline (SD3.5 ships without dynamic shifting)
            height, width = latents.shape[-2:]
            image_seq_len = (height // self.patch_size) * (width // self.patch_size)
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=None, **kwargs)
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
        """`stats`, when given, receives the request's cache counters; `cache_config` "model": mapped from
        the model yaml and CACHE_RATIO (a CacheConfig or None overrides it, for benchmarks)."""
        embeddings.validate()
        self.check(params)
        do_cfg = params.guidance_scale > 1.0  # StableDiffusion3Pipeline.do_classifier_free_guidance
        if do_cfg and not embeddings.has_negative:
            raise ParamError(
                "PROMPT_EMBEDS", f"GUIDANCE_SCALE {params.guidance_scale:g} > 1 needs 2 rows (prompt, negative prompt)"
            )
        images = params.num_images

        # NUM_IMAGES images of one prompt: each row repeated, as encode_prompt(num_images_per_prompt=N)
        def rows(tensor: torch.Tensor, index: int) -> torch.Tensor:
            row = tensor[index : index + 1].to(self.device, self.dtype)
            return row.repeat(images, *([1] * (row.ndim - 1)))

        prompt_embeds, pooled = rows(embeddings.prompt_embeds, 0), rows(embeddings.pooled_prompt_embeds, 0)
        if do_cfg:
            negative_embeds = rows(embeddings.prompt_embeds, 1)
            negative_pooled = rows(embeddings.pooled_prompt_embeds, 1)
        # The pipeline's one forward of batch 2 ([negative; prompt]) unless a CFG-parallel pool runs the branches.
        batched = do_cfg and self.run_branches is run_branches_sequentially
        if batched:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])

        # 4.-5. Initial noise (in the embeddings' dtype, as the pipeline) and timesteps (a fresh scheduler)
        latents = self.prepare_latents(params, prompt_embeds.dtype)
        scheduler, timesteps = self.make_scheduler(params.steps, latents)

        # 7. Denoising loop, with this request's own feature cache (none at CACHE_RATIO 0)
        cache_config = self.cache_config_for(params, cache_config)
        with self.open_cache(self.transformer, cache_config, total_steps=len(timesteps)) as cache:
            for i, t in enumerate(timesteps):
                cache.step(i)

                # One transformer pass; `branch` names its cache state. Called only within this iteration.
                def forward(branch: str, hidden_states, encoder_hidden_states, pooled_projections) -> torch.Tensor:
                    with cache.branch(branch):
                        return self.transformer(
                            hidden_states=hidden_states,
                            timestep=t.expand(hidden_states.shape[0]),
                            encoder_hidden_states=encoder_hidden_states,
                            pooled_projections=pooled_projections,
                            joint_attention_kwargs=None,
                            return_dict=False,
                        )[0]

                if batched:
                    noise_pred = forward("cfg", torch.cat([latents] * 2), prompt_embeds, pooled)
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + params.guidance_scale * (noise_text - noise_uncond)
                elif do_cfg:
                    noise_text, noise_uncond = self.run_branches(
                        forward,
                        dict(branch="cond", hidden_states=latents, encoder_hidden_states=prompt_embeds,
                             pooled_projections=pooled),
                        dict(branch="uncond", hidden_states=latents, encoder_hidden_states=negative_embeds,
                             pooled_projections=negative_pooled),
                    )
                    noise_pred = noise_uncond + params.guidance_scale * (noise_text - noise_uncond)
                else:
                    noise_pred = forward("cond", latents, prompt_embeds, pooled)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        if stats is not None:
            stats.update(cache.stats())
        return latents  # [N, C, H/8, W/8], VAE latent space (scaled and shifted)


class SD3Decoder(FluxDecoder):
    """SD3's VAE decode is Flux's: the same 16-channel AutoencoderKL, undoing its scaling and shift factors
    (read from the VAE's config), with the same tiled parallel decode in a pool."""
