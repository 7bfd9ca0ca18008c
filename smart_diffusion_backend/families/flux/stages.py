"""The Flux family's stages (FluxPipeline-compatible directories: Flux.1-dev, Flux.1-schnell, tiny-flux;
FluxKontextPipeline directories: Flux.1-Kontext-dev, tiny-flux-kontext).

Each stage reuses diffusers' own helpers (encode_prompt, the image and mask processors, _encode_vae_image,
pack/unpack, calculate_shift, retrieve_timesteps) so the split pipeline is bit-exact with the diffusers
pipeline of the request's mode:

    no INPUT_IMAGE                      FluxPipeline (FluxKontextPipeline without an image is the same)
    INPUT_IMAGE (+ STRENGTH)            FluxImg2ImgPipeline
    INPUT_IMAGE + MASK_IMAGE            FluxInpaintPipeline
    INPUT_IMAGE on a Kontext directory  FluxKontextPipeline (max_area=HEIGHT*WIDTH, _auto_resize=False)

Guidance is distilled into the transformer (`guidance_embeds`); Flux has no negative prompt here.

Random numbers: diffusers draws everything from one generator, in this order: the VAE's latent sample of
the input image (img2img and inpaint; Kontext takes the distribution's mode and draws nothing), then the
initial noise. The encoder stage draws the first from a generator seeded with SEED; the denoiser re-seeds
one and draws (and drops) the same number of values before the noise, so its noise is what diffusers'
single generator gives. The inpaint pipeline's third draw, the masked image's latents, comes after the
noise and feeds nothing a FluxTransformer2DModel takes: it is not made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ...cache import CacheConfig
from ...errors import ParamError
from ...params import UserParams
from ..base import DecoderStage, DenoiserStage, Embeddings, StepCallback, TextEncoderStage, to_uint8
from .spec import FAMILY, conditioning_mode, vae_scale_factor

# The pipeline class whose text side, image processors and VAE encoding the encoder stage uses, per mode.
# FluxInpaintPipeline holds the image processor FluxImg2ImgPipeline has (same arguments) and the mask
# processor; its VAE encoding (_encode_vae_image) is FluxImg2ImgPipeline's.
_ENCODER_PIPELINES = {None: FluxPipeline, "init_image": FluxInpaintPipeline, "reference": FluxKontextPipeline}


def wire_float(value: float) -> float:
    """An FP32 request field as the decimal the client wrote: the shortest one float32 rounds to it. STRENGTH
    0.6 arrives as 0.6000000238; int(steps - steps * strength) must see 5 x 0.6 = 3, as diffusers does with the
    Python float 0.6, not 3.0000001 (one more step)."""
    return float(str(np.float32(value)))


def request_generator(seed: int) -> torch.Generator:
    """The request's one generator, on the CPU: the same numbers on every device and every rank."""
    return torch.Generator("cpu").manual_seed(seed)


class FluxTextEncoder(TextEncoderStage):
    """The text encoders and, for models that take INPUT_IMAGE, the VAE's encoder (encode_conditioning)."""

    def __init__(self, model, system):
        super().__init__(model, system)
        self.mode = conditioning_mode(model)
        # A pipeline without the transformer (and without the VAE unless images come in): encode_prompt,
        # the image processors and the VAE encoding are then diffusers' own code.
        no_vae = {"vae": None} if self.mode is None else {}
        self.pipe = _ENCODER_PIPELINES[self.mode].from_pretrained(
            model.weights, transformer=None, dtype=self.dtype, **no_vae
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

    @torch.inference_mode()
    def encode_conditioning(self, params: UserParams) -> dict[str, torch.Tensor]:
        """INPUT_IMAGE (and MASK_IMAGE) -> IMAGE_LATENTS [1, C, h, w] (scaled and shifted VAE latents) and
        MASK_LATENTS [1, 1, h, w] (the binarised mask at the latents' size; inpainting only)."""
        if self.mode is None:
            return super().encode_conditioning(params)
        image = Image.fromarray(params.input_image)  # what a caller of the pipeline passes
        if self.mode == "reference":
            return {"IMAGE_LATENTS": self._reference_latents(image)}
        # FluxImg2ImgPipeline / FluxInpaintPipeline: the image resized to the request's size, one latent
        # sample drawn from the request's generator (the first of its draws).
        processor = self.pipe.image_processor
        init_image = processor.preprocess(image, height=params.height, width=params.width).to(dtype=torch.float32)
        pixels = init_image.to(device=self.device, dtype=self.dtype)
        latents = self.pipe._encode_vae_image(image=pixels, generator=request_generator(params.seed))
        conditioning = {"IMAGE_LATENTS": latents}
        if params.mask_image is not None:
            mask = self.pipe.mask_processor.preprocess(
                Image.fromarray(params.mask_image), height=params.height, width=params.width
            )
            # as FluxInpaintPipeline.prepare_mask_latents: nearest-neighbour to the latents' size
            conditioning["MASK_LATENTS"] = torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]))
        return conditioning

    def _reference_latents(self, image: Image.Image) -> torch.Tensor:
        """FluxKontextPipeline's reference image with _auto_resize=False: its own size rounded down to
        multiples of 16, the VAE distribution's mode (no random draw)."""
        processor = self.pipe.image_processor
        multiple = self.pipe.vae_scale_factor * 2
        height, width = processor.get_default_height_width(image)
        height, width = height // multiple * multiple, width // multiple * multiple
        # The yaml's input-side limits keep these in range (checked at load); a direct caller may not.
        for side, size, limit in (("height", height, self.model.height.max), ("width", width, self.model.width.max)):
            if not multiple <= size <= limit:
                raise ParamError(
                    "INPUT_IMAGE",
                    f"{image.height}x{image.width} pixels: the reference image's {side} rounded down to a multiple "
                    f"of {multiple} is {size}; allowed [{multiple}, {int(limit)}]",
                )
        pixels = processor.preprocess(processor.resize(image, height, width), height, width)
        return self.pipe._encode_vae_image(image=pixels.to(device=self.device, dtype=self.dtype), generator=None)


@dataclass
class _Start:
    """Where a request's denoising loop starts, by mode."""

    latents: torch.Tensor  # packed [N, seq, 4C]
    image_ids: torch.Tensor  # [seq (+ reference seq), 3]
    scheduler: FlowMatchEulerDiscreteScheduler
    timesteps: torch.Tensor
    reference: torch.Tensor | None = None  # Kontext: the packed reference latents, appended to the sequence
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # packed image latents, noise, mask


class FluxDenoiser(DenoiserStage):
    family = FAMILY

    def __init__(self, model, system, transformer: FluxTransformer2DModel | None = None):
        super().__init__(model, system)
        self.mode = conditioning_mode(model)
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

    def latent_shape(self, params: UserParams) -> tuple[int, int, int, int]:
        """[N, C, h, w] of the request's (unpacked) latents, N = NUM_IMAGES."""
        height = 2 * (params.height // (self.vae_scale_factor * 2))
        width = 2 * (params.width // (self.vae_scale_factor * 2))
        return (params.num_images, self.num_channels_latents, height, width)

    def prepare_latents(self, params: UserParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed initial noise [N, h*w/4, 4C] for N = NUM_IMAGES and its position ids, as
        FluxPipeline.prepare_latents (one draw of all N from the seed, as num_images_per_prompt does)."""
        batch, channels, height, width = shape = self.latent_shape(params)
        latents = randn_tensor(shape, generator=request_generator(params.seed), device=self.device, dtype=self.dtype)
        latents = FluxPipeline._pack_latents(latents, batch, channels, height, width)
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

    # -- where the loop starts, by mode ----------------------------------------------------------------

    def start(self, embeddings: Embeddings, params: UserParams) -> _Start:
        if embeddings.image_latents is None:
            if params.strength is not None or embeddings.mask_latents is not None:
                # A request with INPUT_IMAGE whose conditioning did not arrive: never denoise it as text-to-image.
                raise ParamError("IMAGE_LATENTS", "is required with INPUT_IMAGE (the encoder's image latents)")
            latents, image_ids = self.prepare_latents(params)
            scheduler, timesteps = self.make_scheduler(params.steps, latents.shape[1])
            return _Start(latents, image_ids, scheduler, timesteps)
        if self.mode == "reference":
            return self._start_from_reference(embeddings, params)
        if self.mode == "init_image":
            return self._start_from_image(embeddings, params)
        raise ParamError("IMAGE_LATENTS", f"model {self.model.name!r} takes no image conditioning")

    def _image_latents(self, embeddings: Embeddings, shape: tuple[int, ...] | None) -> torch.Tensor:
        """IMAGE_LATENTS on this stage's device and dtype, its shape checked: [1, C, h, w], of `shape`
        (the request's latents) when given, else any even h, w."""
        latents = embeddings.image_latents
        channels = self.num_channels_latents
        ok = latents.ndim == 4 and latents.shape[0] == 1 and latents.shape[1] == channels
        if ok:
            sides = tuple(latents.shape[2:])
            ok = sides == shape[2:] if shape else sides[0] % 2 == sides[1] % 2 == 0
        if not ok:
            wanted = f"[1, {channels}, {shape[2]}, {shape[3]}]" if shape else f"[1, {channels}, even h, even w]"
            raise ParamError("IMAGE_LATENTS", f"shape {list(latents.shape)}; expected {wanted} for this request")
        return latents.to(self.device, self.dtype)

    def _start_from_image(self, embeddings: Embeddings, params: UserParams) -> _Start:
        """FluxImg2ImgPipeline / FluxInpaintPipeline: the image latents noised to the first timestep the
        strength leaves."""
        if params.strength is None:
            raise ParamError("STRENGTH", "is required with INPUT_IMAGE")
        batch, channels, height, width = shape = self.latent_shape(params)
        image_latents = self._image_latents(embeddings, shape)
        generator = request_generator(params.seed)
        # The encoder's VAE sample came first from this seed: the same draw, dropped (same shape and dtype).
        randn_tensor(tuple(image_latents.shape), generator=generator, device=self.device, dtype=self.dtype)

        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        scheduler, timesteps = self.make_scheduler(params.steps, (height // 2) * (width // 2))
        # as the pipelines' get_timesteps: skip the first (1 - strength) of the schedule
        init_timestep = min(params.steps * wire_float(params.strength), params.steps)
        t_start = int(max(params.steps - init_timestep, 0))
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        scheduler.set_begin_index(t_start * scheduler.order)
        if len(timesteps) < 1:
            raise ParamError("STRENGTH", f"{params.strength:g} leaves no denoising step of {params.steps}")
        latent_timestep = timesteps[:1].repeat(batch)

        image_latents = torch.cat([image_latents] * batch, dim=0)  # NUM_IMAGES: the one image, repeated
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = scheduler.scale_noise(image_latents, latent_timestep, noise)
        latents = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        inpaint = None
        if embeddings.mask_latents is not None:
            mask = embeddings.mask_latents
            if tuple(mask.shape) != (1, 1, height, width):
                wanted = f"[1, 1, {height}, {width}]"
                raise ParamError("MASK_LATENTS", f"shape {list(mask.shape)}; expected {wanted} for this request")
            mask = mask.to(device=self.device, dtype=self.dtype).repeat(batch, 1, 1, 1)
            mask = FluxPipeline._pack_latents(mask.repeat(1, channels, 1, 1), batch, channels, height, width)
            inpaint = (
                FluxPipeline._pack_latents(image_latents, batch, channels, height, width),
                FluxPipeline._pack_latents(noise, batch, channels, height, width),
                mask,
            )
        return _Start(latents, image_ids, scheduler, timesteps, inpaint=inpaint)

    def _start_from_reference(self, embeddings: Embeddings, params: UserParams) -> _Start:
        """FluxKontextPipeline: noise as text-to-image; the reference latents (their own size) follow the
        image tokens in the sequence, with position ids whose first coordinate is 1."""
        reference = self._image_latents(embeddings, None)
        batch, channels = params.num_images, self.num_channels_latents
        reference = torch.cat([reference] * batch, dim=0)
        ref_height, ref_width = reference.shape[2:]
        reference = FluxPipeline._pack_latents(reference, batch, channels, ref_height, ref_width)
        reference_ids = FluxPipeline._prepare_latent_image_ids(
            batch, ref_height // 2, ref_width // 2, self.device, self.dtype
        )
        reference_ids[..., 0] = 1
        latents, image_ids = self.prepare_latents(params)
        scheduler, timesteps = self.make_scheduler(params.steps, latents.shape[1])
        return _Start(latents, torch.cat([image_ids, reference_ids], dim=0), scheduler, timesteps, reference=reference)

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

        # 1. Initial latents and timesteps (noise; or an image noised to the strength's first timestep)
        start = self.start(embeddings, params)
        latents, scheduler, timesteps = start.latents, start.scheduler, start.timesteps
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])

        # 2. Denoising loop, with this request's own feature cache (none at CACHE_RATIO 0)
        cache_config = self.cache_config_for(params, cache_config)
        with self.open_cache(self.transformer, cache_config, total_steps=len(timesteps)) as cache:
            for i, t in enumerate(timesteps):
                cache.step(i)
                hidden_states = latents if start.reference is None else torch.cat([latents, start.reference], dim=1)
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                with cache.branch("cond"):
                    noise_pred = self.transformer(
                        hidden_states=hidden_states,
                        timestep=timestep / 1000,
                        guidance=guidance,
                        pooled_projections=pooled,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=text_ids,
                        img_ids=start.image_ids,
                        return_dict=False,
                    )[0]
                if start.reference is not None:
                    noise_pred = noise_pred[:, : latents.size(1)]
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if start.inpaint is not None:
                    # FluxInpaintPipeline: outside the mask, the image noised to the next timestep
                    image_latents, noise, mask = start.inpaint
                    if i < len(timesteps) - 1:
                        image_latents = scheduler.scale_noise(image_latents, timesteps[i + 1 : i + 2], noise)
                    latents = (1 - mask) * image_latents + mask * latents
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
