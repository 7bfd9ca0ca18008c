"""The Wan family's stages (WanPipeline-compatible directories: Wan2.1-T2V-1.3B / 14B, Wan2.2 T2V, tiny-wan;
WanImageToVideoPipeline directories: Wan2.1-I2V-14B, tiny-wan-i2v).

Each stage reuses diffusers' own code (WanPipeline.encode_prompt, the scheduler named in the
directory, AutoencoderKLWan's latents_mean/std, VaeImageProcessor's rounding) so the split pipeline
is bit-exact with `WanPipeline.__call__(..., generator=torch.Generator("cpu").manual_seed(seed))`.

Image-to-video (WanImageToVideoPipeline, INPUT_IMAGE = the first frame): the encoder stage also runs the
pipeline's encode_image (the CLIP image encoder's penultimate hidden states -> IMAGE_EMBEDS) and its
prepare_latents' conditioning (the first frame resized to HEIGHT x WIDTH, padded with NUM_FRAMES - 1 zero
frames, VAE-encoded to the distribution's mode and normalised -> IMAGE_LATENTS; the first-frame mask ->
MASK_LATENTS). The denoiser concatenates noise, mask and latents on the channel axis and passes the image
embeddings to both CFG branches, as the pipeline does. Random numbers: the pipeline draws only the noise
(the VAE encoding takes the mode), so the denoiser's noise is text-to-video's.

Guidance is true classifier-free guidance, two transformer passes per step as diffusers does it
(`do_classifier_free_guidance = guidance_scale > 1`), the negative prompt defaulting to "".
Wan2.2 A14B directories (`transformer_2` + `boundary_ratio`) switch to the low-noise expert below
the boundary timestep; `expand_timesteps` (Wan2.2 TI2V) gives per-token timesteps. Both follow the
pipeline's code; only Wan2.1-layout directories are tested here.
"""

from __future__ import annotations

import contextlib

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ...cache import CacheConfig
from ...errors import ParamError
from ...params import UserParams
from ..base import DecoderStage, DenoiserStage, Embeddings, StepCallback, TextEncoderStage, to_uint8
from ..spec import read_config
from .spec import DEFAULT_SCALE_SPATIAL, DEFAULT_SCALE_TEMPORAL, FAMILY, image_to_video


class WanTextEncoder(TextEncoderStage):
    """The text encoder and, for image-to-video models, the CLIP image encoder and the VAE's encoder
    (encode_conditioning)."""

    def __init__(self, model, system):
        super().__init__(model, system)
        self.image_to_video = image_to_video(model)
        self.image_pipe: WanImageToVideoPipeline | None = None
        if self.image_to_video:
            # The whole pipeline but its transformers: encode_image and prepare_latents' image conditioning
            # are then diffusers' own code.
            self.image_pipe = WanImageToVideoPipeline.from_pretrained(
                model.weights, transformer=None, transformer_2=None, dtype=self.dtype
            ).to(self.device)
            self.image_pipe.set_progress_bar_config(disable=True)
            # Wan2.1 I2V transformers take image embeddings (image_dim); Wan2.2's have no image encoder.
            self.image_dim = read_config(model.weights, "transformer").get("image_dim")
            # Its text side through WanPipeline's encode_prompt, the same code ("Copied from"), whose
            # prompt_clean calls ftfy only where it is installed; diffusers 0.42.1's I2V module calls it
            # unconditionally (a NameError without ftfy). With ftfy installed the two are the same.
            text = self.image_pipe
            self.pipe = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=None,
                                    scheduler=text.scheduler, transformer=None)
        else:
            # A pipeline holding only the text side: encode_prompt (prompt_clean, padding to
            # max_sequence_length with zeros past each prompt's length) is then diffusers' own code.
            self.pipe = WanPipeline.from_pretrained(
                model.weights, transformer=None, transformer_2=None, vae=None, dtype=self.dtype
            ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str | None) -> Embeddings:
        # Both rows always: this stage does not see GUIDANCE_SCALE; the denoiser uses row 1 only when
        # guidance > 1. Each row is encoded on its own (as WanPipeline does), so row 0 does not depend on row 1.
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt or "",  # WanPipeline's default negative prompt
            do_classifier_free_guidance=True,
            max_sequence_length=self.model.max_sequence_length,
            device=self.device,
        )
        embeds = torch.cat([prompt_embeds, negative_embeds])  # [2, S, D]: prompt, negative prompt
        return Embeddings(prompt_embeds=embeds, pooled_prompt_embeds=embeds.new_zeros(embeds.shape[0], 0))

    @torch.inference_mode()
    def encode_conditioning(self, params: UserParams) -> dict[str, torch.Tensor]:
        """INPUT_IMAGE (the first frame) -> IMAGE_EMBEDS [1, L, image_dim] (CLIP's penultimate hidden states),
        IMAGE_LATENTS [1, C, F', H/8, W/8] (the normalised VAE mode of the first frame followed by NUM_FRAMES - 1
        zero frames) and MASK_LATENTS [1, 4, F', H/8, W/8] (1 on the first frame), as
        WanImageToVideoPipeline.encode_image and prepare_latents compute them."""
        if not self.image_to_video:
            return super().encode_conditioning(params)
        pipe = self.image_pipe
        image = Image.fromarray(params.input_image)  # what a caller of the pipeline passes
        conditioning = {}
        if self.image_dim is not None:
            conditioning["IMAGE_EMBEDS"] = pipe.encode_image(image, self.device)
        pixels = pipe.video_processor.preprocess(image, height=params.height, width=params.width)
        pixels = pixels.to(self.device, dtype=torch.float32)
        channels = pipe.vae.config.z_dim
        latent_frames = (params.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        scale = pipe.vae_scale_factor_spatial
        shape = (1, channels, latent_frames, params.height // scale, params.width // scale)
        # prepare_latents draws its noise unless given latents: a placeholder (the denoiser draws the noise)
        # leaves the generator out, and its VAE encoding takes the distribution's mode (no draw either).
        _, condition = pipe.prepare_latents(
            pixels, 1, channels, params.height, params.width, params.num_frames, torch.float32, self.device,
            generator=None, latents=torch.zeros(shape),
        )
        mask_channels = pipe.vae_scale_factor_temporal  # condition = [mask ; latents] on the channel axis
        conditioning["MASK_LATENTS"] = condition[:, :mask_channels]
        conditioning["IMAGE_LATENTS"] = condition[:, mask_channels:]
        return conditioning


class WanDenoiser(DenoiserStage):
    family = FAMILY

    def __init__(
        self,
        model,
        system,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
    ):
        super().__init__(model, system)
        index = DiffusionPipeline.load_config(model.weights)  # model_index.json
        self.image_to_video = image_to_video(model)  # the yaml checked against the weights first
        self.transformer = transformer or self._load_transformer("transformer")
        self.transformer.eval()
        # Wan2.2 A14B: a low-noise expert below boundary_ratio * num_train_timesteps.
        self.boundary_ratio: float | None = index.get("boundary_ratio")
        has_second = (index.get("transformer_2") or [None])[0] is not None
        self.transformer_2 = transformer_2 or (self._load_transformer("transformer_2") if has_second else None)
        if self.transformer_2 is not None:
            self.transformer_2.eval()
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        self._warming_up = False

        # The scheduler class the directory names (UniPC for Wan2.1, FlowMatchEuler in some ports).
        self.scheduler_class = getattr(diffusers, index["scheduler"][1])
        self.scheduler_config = self.scheduler_class.load_config(model.weights, subfolder="scheduler")
        vae_config = AutoencoderKLWan.load_config(model.weights, subfolder="vae")
        self.vae_scale_factor_temporal = vae_config.get("scale_factor_temporal", DEFAULT_SCALE_TEMPORAL)
        self.vae_scale_factor_spatial = vae_config.get("scale_factor_spatial", DEFAULT_SCALE_SPATIAL)
        # The noise's channels: the transformer's input for text-to-video; the VAE's latents for image-to-video,
        # whose transformer also takes the mask and the condition latents (as each pipeline).
        self.num_channels_latents = vae_config["z_dim"] if self.image_to_video else self.transformer.config.in_channels
        patch = self.transformer.config.patch_size
        self.size_multiple = (self.vae_scale_factor_spatial * patch[1], self.vae_scale_factor_spatial * patch[2])
        self.prepare_transformers()

    def transformers(self) -> list[WanTransformer3DModel]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]

    def warm_up_embeddings(self) -> Embeddings:
        # Both rows, as the text encoder sends them: the prompt and the negative prompt.
        embeds = torch.zeros(2, self.model.max_sequence_length, self.transformer.config.text_dim)
        return Embeddings(prompt_embeds=embeds, pooled_prompt_embeds=embeds.new_zeros(2, 0))

    def _load_transformer(self, subfolder: str) -> WanTransformer3DModel:
        return WanTransformer3DModel.from_pretrained(self.model.weights, subfolder=subfolder, dtype=self.dtype).to(
            self.device
        )

    def warm_up(self) -> float:
        """Image-to-video: the load-time warm-up has no image; it runs on zero conditioning of each size's shapes."""
        self._warming_up = True
        try:
            return super().warm_up()
        finally:
            self._warming_up = False

    def image_conditioning(
        self, embeddings: Embeddings, params: UserParams
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(condition [1, 4 + C, F', h, w] float32, image embeddings or None) of an image-to-video request, its
        tensors' shapes checked against the request; (None, None) for text-to-video."""
        names = ("image_latents", "mask_latents", "image_embeds")
        if not self.image_to_video:
            sent = [n.upper() for n in names if getattr(embeddings, n) is not None]
            if sent:
                raise ParamError(sent[0], f"model {self.model.name!r} takes no image conditioning")
            return None, None
        _, channels, frames, height, width = self.latent_shape(params)
        mask_channels = self.vae_scale_factor_temporal
        image_dim = self.transformer.config.image_dim
        if self._warming_up and embeddings.image_latents is None:
            embeddings = Embeddings(
                embeddings.prompt_embeds, embeddings.pooled_prompt_embeds,
                image_latents=torch.zeros(1, channels, frames, height, width),
                mask_latents=torch.zeros(1, mask_channels, frames, height, width),
                image_embeds=None if image_dim is None else torch.zeros(1, self.image_tokens(), image_dim),
            )
        if embeddings.image_latents is None or embeddings.mask_latents is None:
            # A request without its first frame (or whose conditioning did not arrive): never denoised from text.
            raise ParamError("INPUT_IMAGE", f"is required by model {self.model.name!r}: it generates from an input "
                             "image (the encoder's IMAGE_LATENTS and MASK_LATENTS did not arrive)")
        expected = {
            "IMAGE_LATENTS": (embeddings.image_latents, (1, channels, frames, height, width)),
            "MASK_LATENTS": (embeddings.mask_latents, (1, mask_channels, frames, height, width)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ParamError(name, f"shape {list(tensor.shape)}; expected {list(shape)} for this request")
        image_embeds = embeddings.image_embeds
        if image_dim is None and image_embeds is not None:
            raise ParamError("IMAGE_EMBEDS", f"model {self.model.name!r} takes no image embeddings")
        if image_dim is not None:
            ok = image_embeds is not None and image_embeds.ndim == 3 and image_embeds.shape[0] == 1
            if not ok or image_embeds.shape[1] < 1 or image_embeds.shape[2] != image_dim:
                got = "none" if image_embeds is None else f"shape {list(image_embeds.shape)}"
                raise ParamError("IMAGE_EMBEDS", f"{got}; expected [1, tokens, {image_dim}] for this model")
            image_embeds = image_embeds.to(self.device, self.transformer.dtype)  # as the pipeline, both branches
        # WanImageToVideoPipeline.prepare_latents' condition: [mask ; latents] on the channel axis, float32.
        mask = embeddings.mask_latents.to(self.device, torch.float32)
        condition = torch.cat([mask, embeddings.image_latents.to(self.device, torch.float32)], dim=1)
        return condition, image_embeds

    def image_tokens(self) -> int:
        """Tokens of the CLIP image encoder's hidden states (patches + class token), for the warm-up's zeros."""
        config = read_config(self.model.weights, "image_encoder")
        return (int(config["image_size"]) // int(config["patch_size"])) ** 2 + 1

    def check(self, params: UserParams) -> None:
        """What WanPipeline would silently round, refused instead (the model yaml should prevent it)."""
        if params.num_frames is None or (params.num_frames - 1) % self.vae_scale_factor_temporal:
            raise ParamError(
                "NUM_FRAMES", f"{params.num_frames} is not of the form {self.vae_scale_factor_temporal}*k+1"
            )
        sizes = (("HEIGHT", params.height, self.size_multiple[0]), ("WIDTH", params.width, self.size_multiple[1]))
        for name, value, multiple in sizes:
            if value % multiple:
                raise ParamError(name, f"{value} is not a multiple of {multiple} (VAE scale x patch size)")

    def latent_shape(self, params: UserParams) -> tuple[int, int, int, int, int]:
        num_latent_frames = (params.num_frames - 1) // self.vae_scale_factor_temporal + 1
        return (
            1,
            self.num_channels_latents,
            num_latent_frames,
            params.height // self.vae_scale_factor_spatial,
            params.width // self.vae_scale_factor_spatial,
        )

    def prepare_latents(self, params: UserParams) -> torch.Tensor:
        """Initial noise [1, C, F', H/8, W/8] in float32, as WanPipeline.prepare_latents."""
        # A CPU generator makes the noise identical on every device and every rank.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        return randn_tensor(self.latent_shape(params), generator=generator, device=self.device, dtype=torch.float32)

    def make_scheduler(self, steps: int):
        """A fresh scheduler per request: scheduler state (UniPC keeps past outputs) is never shared."""
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        scheduler.set_begin_index(0)
        return scheduler

    @torch.inference_mode()
    def denoise(
        self,
        embeddings: Embeddings,
        params: UserParams,
        on_step: StepCallback | None = None,
        stats: dict | None = None,
        cache_config: CacheConfig | None | str = "model",
    ) -> torch.Tensor:
        """`stats`, when given, receives the request's cache counters; `cache_config` "model": mapped
        from the model yaml and CACHE_RATIO (a CacheConfig or None overrides it, for benchmarks)."""
        embeddings.validate()
        self.check(params)
        do_cfg = params.guidance_scale > 1.0  # WanPipeline.do_classifier_free_guidance
        if do_cfg and not embeddings.has_negative:
            raise ParamError(
                "PROMPT_EMBEDS", f"GUIDANCE_SCALE {params.guidance_scale:g} > 1 needs 2 rows (prompt, negative prompt)"
            )
        transformer_dtype = self.transformer.dtype
        prompt_embeds = embeddings.prompt_embeds[:1].to(self.device, transformer_dtype)
        negative_embeds = embeddings.prompt_embeds[1:2].to(self.device, transformer_dtype) if do_cfg else None

        # 4. Timesteps (a fresh scheduler)
        scheduler = self.make_scheduler(params.steps)
        timesteps = scheduler.timesteps

        # Image-to-video: the first frame's condition and image embeddings (None, None for text-to-video)
        condition, image_embeds = self.image_conditioning(embeddings, params)
        image_kwargs = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}

        # 5. Initial noise, float32 whatever the transformer's dtype (as the pipeline)
        latents = self.prepare_latents(params)
        mask = torch.ones(latents.shape, dtype=torch.float32, device=self.device)
        boundary_timestep = None
        if self.boundary_ratio is not None and self.transformer_2 is not None:
            boundary_timestep = self.boundary_ratio * scheduler.config.num_train_timesteps

        # 6. Denoising loop, with this request's own feature cache (none at CACHE_RATIO 0); one session per
        # transformer (Wan2.2 has two experts), one cache state per CFG branch.
        cache_config = self.cache_config_for(params, cache_config)
        with contextlib.ExitStack() as stack:
            caches = [
                stack.enter_context(self.open_cache(m, cache_config, total_steps=len(timesteps)))
                for m in (self.transformer, self.transformer_2)
                if m is not None
            ]
            for i, t in enumerate(timesteps):
                for cache in caches:
                    cache.step(i)
                # Wan2.1, or Wan2.2's high-noise stage (guidance_scale_2 = guidance_scale, the pipeline's default)
                high_noise = boundary_timestep is None or t >= boundary_timestep
                model, cache = (self.transformer, caches[0]) if high_noise else (self.transformer_2, caches[1])
                if condition is None:
                    latent_model_input = latents.to(transformer_dtype)
                else:  # WanImageToVideoPipeline: noise, mask, condition latents on the channel axis
                    latent_model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)
                if self.expand_timesteps:
                    # [1, F' * H'/2 * W'/2]: one timestep per patch token
                    timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
                else:
                    timestep = t.expand(latents.shape[0])
                context = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=len(timesteps))

                # One transformer pass; `branch` names the cache context ("cond"/"uncond") as the pipeline does.
                # Called only within this iteration, so the closure's loop variables are current.
                def forward(branch: str, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
                    with cache.branch(branch), model.cache_context(branch, **context):
                        return model(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=encoder_hidden_states,
                            attention_kwargs=None,
                            **image_kwargs,
                            return_dict=False,
                        )[0]

                if do_cfg:
                    # Two passes, as diffusers; run_branches may run them on the two halves of a CFG pool.
                    noise_pred, noise_uncond = self.run_branches(
                        forward,
                        {"branch": "cond", "encoder_hidden_states": prompt_embeds},
                        {"branch": "uncond", "encoder_hidden_states": negative_embeds},
                    )
                    noise_pred = noise_uncond + params.guidance_scale * (noise_pred - noise_uncond)
                else:
                    noise_pred = forward("cond", prompt_embeds)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        if stats is not None:
            stats.update(caches[0].stats())
        return latents  # [1, C, F', H/8, W/8], VAE latent space (normalised)


class WanDecoder(DecoderStage):
    def __init__(self, model, system):
        super().__init__(model, system)
        # With vae_tiling: spatial tiles (diffusers' defaults: 256 px, stride 192, blended); time is already
        # decoded one latent frame at a time with the causal cache, so activations stay tile x 4 frames.
        self.vae = self.load_vae(AutoencoderKLWan)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z_dim = self.vae.config.z_dim
        if latents.ndim != 5 or latents.shape[:2] != (1, z_dim):
            raise ValueError(f"expected shape [1, {z_dim}, frames, h, w], got {list(latents.shape)}")
        # 7. Un-normalise exactly as WanPipeline (dividing by the reciprocal of std, not multiplying)
        latents = latents.to(self.device, self.vae.dtype)
        latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        latents_mean = latents_mean.to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        latents = latents / latents_std + latents_mean
        video = self.vae.decode(latents, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
        # 8. VideoProcessor.postprocess_video: frames first, then the image processor's uint8 rounding
        return to_uint8(video[0].permute(1, 0, 2, 3))  # [F, 3, H, W] -> uint8 [F, H, W, 3]
