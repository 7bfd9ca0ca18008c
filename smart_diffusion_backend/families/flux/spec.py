"""The Flux family as the library sees it (torch-free): FluxPipeline-compatible directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from ..spec import Family, Gather, SequencePlan, Split, WireDims, call_argument, read_config


def vae_scale_factor(block_out_channels: list[int]) -> int:
    return 2 ** (len(block_out_channels) - 1)  # as FluxPipeline.__init__


# How a model uses INPUT_IMAGE, from the pipeline class its directory was saved as (model_index.json):
# "init_image": image-to-image (STRENGTH) and inpainting (MASK_IMAGE), FluxImg2ImgPipeline /
# FluxInpaintPipeline semantics on a FluxPipeline directory; "reference": the image's latents join the
# transformer's sequence, FluxKontextPipeline semantics. None: the model takes no image.
REFERENCE_PIPELINES = ("FluxKontextPipeline",)
REFERENCE_MULTIPLE = 16  # the reference image's sides are rounded down to this (VAE 8x down x 2x2 packing)


def pipeline_class(weights: Path) -> str:
    """The `_class_name` of a diffusers directory's model_index.json ("FluxPipeline", ...)."""
    path = Path(weights) / "model_index.json"
    try:
        return str(json.loads(path.read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the pipeline class from {path}: {exc!r}") from exc


def conditioning_mode(model: Any) -> str | None:
    """"init_image", "reference" or None for a ModelParams; a yaml whose `accepts:` the weights cannot
    honour fails the load (ConfigError)."""
    if not model.takes("INPUT_IMAGE"):
        return None
    cls = pipeline_class(model.weights)
    if cls in REFERENCE_PIPELINES:
        extra = [n for n in ("STRENGTH", "MASK_IMAGE") if model.takes(n)]
        if extra:
            raise ConfigError(f"model {model.name!r}: a {cls} edits from a reference image; accepts: {extra} "
                              "has no meaning for it (nothing is re-noised)")
        # The reference keeps its size (rounded down to multiples of 16): every image the limits let in must
        # give latents the wire takes, checked before admission rather than by the encoder.
        largest = min(model.height.max, model.width.max)
        if model.min_input_side < REFERENCE_MULTIPLE or model.max_input_side > largest:
            raise ConfigError(
                f"model {model.name!r}: a {cls}'s reference image is used at its own size: limits.min_input_side "
                f"must be >= {REFERENCE_MULTIPLE} and limits.max_input_side <= {int(largest)} (the height / width "
                f"limits); got [{model.min_input_side}, {model.max_input_side}]"
            )
        return "reference"
    if not model.takes("STRENGTH"):
        raise ConfigError(f"model {model.name!r}: image-to-image on a {cls} needs STRENGTH in accepts: too")
    return "init_image"


def wire_dims(weights: Path) -> WireDims:
    transformer, vae = read_config(weights, "transformer"), read_config(weights, "vae")
    return WireDims(
        text_dim=int(transformer["joint_attention_dim"]),
        pooled_dim=int(transformer["pooled_projection_dim"]),
        channels=int(vae["latent_channels"]),
        spatial_scale=vae_scale_factor(vae["block_out_channels"]),
        temporal_scale=None,
    )


class FluxCachePoints:
    """Double blocks, then single blocks; both take ``(hidden_states, encoder_hidden_states, temb, ...)`` and
    return ``(encoder_hidden_states, hidden_states)``, so the cache keeps both streams (image and text)."""

    @staticmethod
    def inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
        return call_argument(args, kwargs, "hidden_states", 0), call_argument(args, kwargs, "encoder_hidden_states", 1)

    @staticmethod
    def outputs(output: Any) -> tuple[Any, Any]:
        encoder_hidden_states, hidden_states = output
        return hidden_states, encoder_hidden_states

    @staticmethod
    def pack(hidden_states: Any, encoder_hidden_states: Any) -> Any:
        return encoder_hidden_states, hidden_states

    @staticmethod
    def modulated_input(block: Any, args: tuple, kwargs: dict) -> Any:
        # TeaCache's Flux metric input: the first block's AdaLayerNormZero output (timestep-modulated).
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        temb = call_argument(args, kwargs, "temb", 2)
        return block.norm1(hidden_states, emb=temb)[0]


def _tokens(arguments: Mapping[str, Any], config: Any) -> dict[str, int]:
    return {"text": arguments["encoder_hidden_states"].shape[1], "image": arguments["hidden_states"].shape[1]}


def _one_row_of_ids(arguments: dict[str, Any]) -> None:
    # Batched ids (deprecated in diffusers) are the same for every batch item.
    for key in ("img_ids", "txt_ids"):
        if arguments[key].ndim == 3:
            arguments[key] = arguments[key][0]


# The joint attention runs over [text; image]: a rank's chunk can hold text, image or both, so each rank
# passes its part of both streams and of their position ids (the rotary embedding is then computed from
# the local ids). ControlNet residuals are image tokens. proj_out returns the image tokens only.
SEQUENCE_PLAN = SequencePlan(
    segments=("text", "image"),
    tokens=_tokens,
    inputs={
        "": {
            "encoder_hidden_states": Split("text", 1),
            "txt_ids": Split("text", 0),
            "hidden_states": Split("image", 1),
            "img_ids": Split("image", 0),
            "controlnet_block_samples": Split("image", 1, each=True),
            "controlnet_single_block_samples": Split("image", 1, each=True),
        },
    },
    outputs={},
    gather=Gather("proj_out", 1, ("image",)),
    required=("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"),
    prepare=_one_row_of_ids,
)

FAMILY = Family(
    name="flux",
    package=__package__,
    stages={"text_encoder": "stages:FluxTextEncoder", "denoiser": "stages:FluxDenoiser", "decoder": "stages:FluxDecoder"},
    transformer_classes=("FluxTransformer2DModel",),
    block_stacks=("transformer_blocks", "single_transformer_blocks"),
    cache_points=FluxCachePoints(),
    attention_processor="attention:FluxPluggableAttnProcessor",
    sequence_plan=SEQUENCE_PLAN,
    wire_dims=wire_dims,
)
