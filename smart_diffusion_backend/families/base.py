"""The seam between the service and a model family.

A family (Flux, Wan, ...) provides three stages that can be loaded and called on their own, each in
its own Triton model (or worker process):

    TextEncoderStage.encode(prompt, negative_prompt)   -> Embeddings
    DenoiserStage.denoise(embeddings, user_params)      -> latents  (unpacked, VAE-space, unscaled)
    DecoderStage.decode(latents)                        -> uint8 image [H, W, 3] / video [F, H, W, 3]

Embeddings and latents are the wire format between stages: float32 across process boundaries
(bf16 -> fp32 -> bf16 is lossless), the stage's own dtype inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import torch

from ..cache import CacheConfig, MetricReduce, request_cache, validate_model_cache
from ..params import ModelParams, SystemParams, UserParams, parse_user_params
from .spec import Family

if TYPE_CHECKING:
    from ..lora import LoraSet

logger = logging.getLogger(__name__)

# Called after each denoising step with (steps_done, total_steps); raising stops the loop.
StepCallback = Callable[[int, int], None]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(system: SystemParams) -> torch.dtype:
    return _TORCH_DTYPES[system.dtype]


def torch_device(system: SystemParams) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if system.device == "cuda" else torch.device("cpu")


@dataclass
class Embeddings:
    """The encoder's conditioning. Batch row 0 is the prompt; row 1, when present, the negative prompt
    (CFG). With INPUT_IMAGE (models that accept it) the family's image conditioning comes along: the
    input image's latents, a mask in latent space, image-encoder embeddings (shapes are the family's)."""

    prompt_embeds: torch.Tensor  # [B, S, D]
    pooled_prompt_embeds: torch.Tensor  # [B, P]; P = 0 for families without a pooled embedding
    image_latents: torch.Tensor | None = None
    mask_latents: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    @property
    def has_negative(self) -> bool:
        return self.prompt_embeds.shape[0] == 2

    def validate(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.prompt_embeds.shape[0] not in (1, 2):
            raise ValueError(f"PROMPT_EMBEDS: expected shape [1 or 2, seq, dim], got {list(self.prompt_embeds.shape)}")
        if self.pooled_prompt_embeds.ndim != 2 or self.pooled_prompt_embeds.shape[0] != self.prompt_embeds.shape[0]:
            raise ValueError(
                f"POOLED_PROMPT_EMBEDS: expected shape [{self.prompt_embeds.shape[0]}, dim], "
                f"got {list(self.pooled_prompt_embeds.shape)}"
            )


class Stage(ABC):
    def __init__(self, model: ModelParams, system: SystemParams):
        self.model = model
        self.system = system
        self.device = torch_device(system)
        self.dtype = torch_dtype(system)


class TextEncoderStage(Stage):
    @abstractmethod
    def encode(self, prompt: str, negative_prompt: str | None) -> Embeddings: ...

    def encode_conditioning(self, params: UserParams) -> dict[str, torch.Tensor]:
        """The image conditioning of a request with INPUT_IMAGE, by wire name (IMAGE_LATENTS, MASK_LATENTS,
        IMAGE_EMBEDS; those a family does not use are left out). Families whose models accept INPUT_IMAGE
        override it."""
        raise NotImplementedError(f"{type(self).__name__} takes no image conditioning")


# Runs the two CFG branches: (forward, cond_kwargs, uncond_kwargs) -> (cond_out, uncond_out).
# Sequential here; a CFG-parallel pool swaps in one that runs each branch on half of the GPUs.
BranchRunner = Callable[[Callable[..., torch.Tensor], dict, dict], tuple[torch.Tensor, torch.Tensor]]


def run_branches_sequentially(forward, cond_kwargs: dict, uncond_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(**cond_kwargs), forward(**uncond_kwargs)


def _with_request_lora(denoise: Callable) -> Callable:
    """A family's `denoise`, run inside its request's LoRA scope (DenoiserStage.lora_scope)."""

    @functools.wraps(denoise)
    def denoise_with_request_lora(self, embeddings, params, *args, **kwargs):
        with self.lora_scope(params):
            return denoise(self, embeddings, params, *args, **kwargs)

    return denoise_with_request_lora


class DenoiserStage(Stage):
    """Owns the transformer and the denoising loop.

    `transformer` may be passed in (a pool worker passes its sequence-parallel one); `run_branches`
    decides how the conditional and unconditional passes of classifier-free guidance run;
    `reduce_metric` how the ranks that share each forward agree on a cache decision (None: one process,
    nothing to agree on; a sequence-parallel pool sets the max over its ranks).
    """

    family: ClassVar[Family]  # the family's spec: what the cache, attention and parallel code ask
    run_branches: BranchRunner = staticmethod(run_branches_sequentially)
    reduce_metric: MetricReduce | None = None
    loras: "LoraSet | None" = None  # the resident LoRA adapters (install_loras), None when the model has none

    def __init_subclass__(cls, **kwargs) -> None:
        """Every family's `denoise` runs its request's LoRA selection (params.lora / lora_scale): the wrapper
        sets it for the call and restores the previous one after, so no family code deals with LoRA."""
        super().__init_subclass__(**kwargs)
        denoise = cls.__dict__.get("denoise")
        if denoise is not None and not getattr(denoise, "__isabstractmethod__", False):
            cls.denoise = _with_request_lora(denoise)

    def __init__(self, model: ModelParams, system: SystemParams):
        super().__init__(model, system)
        validate_model_cache(model.cache)  # a broken cache section fails the load, not a request
        self.compile_seconds: float | None = None

    def transformers(self) -> list[torch.nn.Module]:
        """Every transformer this stage runs (a family may run several, e.g. experts switched by timestep)."""
        return [self.transformer]

    def prepare_transformers(self) -> None:
        """Apply the system's `attention_backend`, `fp8_linear`, the model's LoRA adapters and, when asked,
        regional compile; families call this at the end of loading. "sdpa" keeps diffusers' own processors (the
        reference path). A pool worker then replaces the processors with sequence-parallel ones that call the
        same backend."""
        if self.fp8_enabled():
            self.quantize_linears()
        self.install_loras()
        if self.system.attention_backend != "sdpa":
            from ..attention.processors import attention_for, install_attention

            attention = attention_for(self.system.attention_backend)
            for transformer in self.transformers():
                install_attention(transformer, attention, self.family)
        if self.system.compile_transformer:
            self.compile_transformers()

    def fp8_enabled(self) -> bool:
        """`fp8_linear: auto` (the fast path's default) turns it on where the card has FP8 tensor cores
        (compute capability 8.9+) and the stage runs bf16; true or false decide by themselves."""
        if self.system.fp8_linear == "auto":
            return (
                self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device) >= (8, 9)
                and self.dtype == torch.bfloat16
            )
        return bool(self.system.fp8_linear)

    def quantize_linears(self) -> None:
        """fp8_linear: the blocks' token-wise Linear layers become e4m3 GEMMs (quant/fp8_linear.py)."""
        from ..quant import quantize_linears

        if self.system.device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            raise RuntimeError(f"fp8_linear needs FP8 tensor cores (compute capability 8.9+, e.g. H100 or L40S); "
                               f"this GPU is {torch.cuda.get_device_name()}")
        replaced = sum(quantize_linears(t) for t in self.transformers())
        logger.info("%s: fp8_linear: %d Linear layers run as e4m3 GEMMs", self.model.name, replaced)

    def install_loras(self) -> None:
        """The model yaml's `lora:` adapters (smart_diffusion_backend/lora.py), resident from now on: the Linear
        layers they target get the per-request LoRA term beside them (after fp8_linear, before compile)."""
        from ..lora import LoraSet

        self.loras = LoraSet.load(self.model, self.transformers(), self.device, self.dtype)

    @property
    def lora_adapters(self) -> tuple[str, ...]:
        """The names of the resident LoRA adapters (what LORA may name)."""
        return self.loras.names if self.loras is not None else ()

    def lora_scope(self, params: UserParams):
        """A context in which this thread's forwards add the request's adapters at its scales (none without
        LORA). ParamError (INVALID_ARG) for an adapter that is not resident, before anything runs."""
        if self.loras is None:
            from ..lora import check_selection

            check_selection(params.lora, ())
            return contextlib.nullcontext()
        return self.loras.scope(params.lora, params.lora_scale)

    def compile_transformers(self, fullgraph: bool = True) -> None:
        """Regional compile of the repeated blocks, then a timed warm-up so no request pays the compile.
        A pool worker calls it after its sequence-parallel processors are in, on every rank at once (the
        warm-up runs the collectives), with fullgraph=False: Ulysses' all-to-alls trace as functional
        collectives (one graph per block), but Ring's point-to-point transfers break the graph."""
        from ..attention.compile import compile_repeated_blocks

        # dynamic=None: the first warm size compiles static; the first other size recompiles with dynamic
        # shapes, which then serves every later size without more compiles.
        blocks = sum(compile_repeated_blocks(t, dynamic=None, fullgraph=fullgraph) for t in self.transformers())
        self.compile_seconds = self.warm_up()
        sizes = ", ".join(f"{h}x{w}" for h, w in self.model.warm_sizes)
        logger.info("%s: compiled %d repeated blocks; warm-up at %s took %.1f s (compile included)",
                    self.model.name, blocks, sizes, self.compile_seconds)

    @abstractmethod
    def warm_up_embeddings(self) -> Embeddings:
        """Zero text conditioning of the shapes the text encoder produces (for the load-time warm-up)."""

    def warm_up(self) -> float:
        """A 2-step denoise at each of the model's `warm_sizes` (its default size when the yaml lists none), so
        torch.compile compiles at load rather than in a user's request (the first size compiles static graphs,
        the second dynamic ones that serve every later size), and one with a LoRA term when adapters are
        resident; returns the seconds taken."""
        started = time.perf_counter()
        for height, width in self.model.warm_sizes:
            values = {"STEPS": np.array([2], np.int32), "SEED": np.array([0], np.int64),
                      "HEIGHT": np.array([height], np.int32), "WIDTH": np.array([width], np.int32)}
            params = parse_user_params(values, self.model, self.system, require_prompt=False)
            self.denoise(self.warm_up_embeddings(), params)
        if self.lora_adapters:  # the blocks' second variant, with a LoRA term (any adapter, scale 0)
            self.denoise(self.warm_up_embeddings(),
                         dataclasses.replace(params, lora=self.lora_adapters[:1], lora_scale=(0.0,)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def cache_config_for(self, params: UserParams, override: CacheConfig | None | str = "model") -> CacheConfig | None:
        """This request's cache: "model" maps CACHE_RATIO through the model yaml's `cache:` section;
        a CacheConfig or None overrides it (benchmarks sweep configs that are not in any yaml)."""
        if override == "model":
            return CacheConfig.from_model_cache(self.model.cache, params.cache_ratio)
        return override

    def open_cache(self, transformer: torch.nn.Module, config: CacheConfig | None, total_steps: int):
        """The feature-cache session of one request on `transformer` (no hooks when `config` is None)."""
        return request_cache(transformer, config, total_steps, family=self.family, reduce=self.reduce_metric)

    @abstractmethod
    def denoise(
        self,
        embeddings: Embeddings,
        params: UserParams,
        on_step: StepCallback | None = None,
        stats: dict | None = None,
    ) -> torch.Tensor:
        """-> latents. `stats`, when given, receives the request's cache counters (cache_* keys)."""


class DecoderStage(Stage):
    def load_vae(self, vae_class: type) -> torch.nn.Module:
        """The directory's VAE on this stage's device and dtype; tiled decoding when the system asks
        (diffusers' `enable_tiling`: spatial tiles, blended overlaps)."""
        vae = vae_class.from_pretrained(self.model.weights, subfolder="vae", dtype=self.dtype).to(self.device)
        vae.eval()
        if self.system.vae_tiling:
            vae.enable_tiling()
        return vae

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [..., C, H, W] -> uint8 [..., H, W, C], rounded as diffusers' numpy_to_pil."""
    images = (images * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize, in the VAE's dtype
    # Channels-last made contiguous on the device: a strided [H, W, C] view would reach Triton as a
    # non-contiguous array, which its tensor constructor copies element by element.
    array = images.movedim(-3, -1).contiguous().cpu().float().numpy()
    return (array * 255).round().astype(np.uint8)
