"""The Wan family as the library sees it (torch-free): WanPipeline (text-to-video) and WanImageToVideoPipeline
(image-to-video) directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from ..spec import Family, Gather, SequencePlan, Split, WireDims, call_argument, read_config

# AutoencoderKLWan.__init__ defaults, for vae configs written before these keys existed
DEFAULT_SCALE_TEMPORAL, DEFAULT_SCALE_SPATIAL = 4, 8
# Text context length that diffusers' Wan hard-codes to split I2V's [image ; text] context.
TEXT_CONTEXT_LENGTH = 512


# Directories whose INPUT_IMAGE is the video's first frame (model_index.json's _class_name).
IMAGE_TO_VIDEO_PIPELINES = ("WanImageToVideoPipeline",)


def pipeline_index(weights: Path) -> dict[str, Any]:
    """A diffusers directory's model_index.json (ConfigError if unreadable)."""
    path = Path(weights) / "model_index.json"
    try:
        index = json.loads(path.read_text())
        str(index["_class_name"])
        return index
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the pipeline class from {path}: {exc!r}") from exc


def image_to_video(model: Any) -> bool:
    """Whether a ModelParams' weights are an image-to-video directory, its yaml checked against them: an I2V
    model accepts and requires INPUT_IMAGE (its first frame) and nothing that re-noises an image, and reads
    512 text tokens (diffusers' Wan attention splits the [image ; text] context 512 tokens from the end); a
    text-to-video model takes no image. ConfigError at load otherwise."""
    index = pipeline_index(model.weights)
    cls = index["_class_name"]
    if cls not in IMAGE_TO_VIDEO_PIPELINES:
        if model.takes("INPUT_IMAGE"):
            raise ConfigError(f"model {model.name!r}: a {cls} makes videos from text alone; accepts: INPUT_IMAGE "
                              f"needs an image-to-video directory ({', '.join(IMAGE_TO_VIDEO_PIPELINES)})")
        return False
    problems = []
    if not (model.takes("INPUT_IMAGE") and "INPUT_IMAGE" in model.requires):
        problems.append("accepts: and requires: must list INPUT_IMAGE (the first frame; it has no text-only mode)")
    extra = [n for n in ("STRENGTH", "MASK_IMAGE", "NUM_IMAGES") if model.takes(n)]
    if extra:
        problems.append(f"accepts: {extra} has no meaning for it")
    if index.get("expand_timesteps"):
        problems.append("expand_timesteps (Wan2.2 TI2V's first-frame timestep mask) is not supported yet")
    if read_config(model.weights, "transformer").get("added_kv_proj_dim") and model.max_sequence_length != TEXT_CONTEXT_LENGTH:
        problems.append(f"max_sequence_length must be {TEXT_CONTEXT_LENGTH} (its attention splits the image context "
                        f"from the text {TEXT_CONTEXT_LENGTH} tokens from the end), got {model.max_sequence_length}")
    if problems:
        raise ConfigError(f"model {model.name!r} ({cls}): " + "; ".join(problems))
    return True


def wire_dims(weights: Path) -> WireDims:
    transformer, vae = read_config(weights, "transformer"), read_config(weights, "vae")
    return WireDims(
        text_dim=int(transformer["text_dim"]),
        pooled_dim=0,
        channels=int(vae["z_dim"]),
        spatial_scale=int(vae.get("scale_factor_spatial", DEFAULT_SCALE_SPATIAL)),
        temporal_scale=int(vae.get("scale_factor_temporal", DEFAULT_SCALE_TEMPORAL)),
    )


class WanCachePoints:
    """``blocks``: ``(hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states``. The text
    context is an input of every block, not a stream of the stack, so only ``hidden_states`` is cached."""

    @staticmethod
    def inputs(args: tuple, kwargs: dict) -> tuple[Any, None]:
        return call_argument(args, kwargs, "hidden_states", 0), None

    @staticmethod
    def outputs(output: Any) -> tuple[Any, None]:
        return output, None

    @staticmethod
    def pack(hidden_states: Any, encoder_hidden_states: None) -> Any:
        return hidden_states

    @staticmethod
    def modulated_input(block: Any, args: tuple, kwargs: dict) -> Any:
        # As WanTransformerBlock.forward step 1: norm1(x) * (1 + scale_msa) + shift_msa, in float32.
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        temb = call_argument(args, kwargs, "temb", 2)
        if temb.ndim == 4:  # [b, s, 6, d] (Wan2.2 TI2V)
            shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:  # [b, 6, d]
            shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        return block.norm1(hidden_states.float()) * (1 + scale) + shift


def _tokens(arguments: Mapping[str, Any], config: Any) -> dict[str, int]:
    p_t, p_h, p_w = config.patch_size
    _, _, frames, height, width = arguments["hidden_states"].shape  # [b, c, f, h, w] before patchifying
    return {"video": (frames // p_t) * (height // p_h) * (width // p_w)}


def _cross_attention_lengths(arguments: Mapping[str, Any]) -> frozenset[int]:
    # The text, the I2V image context, both together, and the processor's split at the text length.
    text = arguments["encoder_hidden_states"].shape[1]
    image = arguments.get("encoder_hidden_states_image")
    image = image.shape[1] if image is not None else 0
    return frozenset({text, image, text + image, TEXT_CONTEXT_LENGTH, text + image - TEXT_CONTEXT_LENGTH})


# The self-attention runs over the patchified video tokens. They are cut where they are built: the input
# of the first block and the rotary embedding (cos, sin: [1, S, 1, d]); a per-token timestep (Wan2.2 TI2V,
# [b, S]) is cut at the transformer's input. Cross-attention keys (text, image context) stay whole on every
# rank. proj_out's output is gathered, so the unpatchify reshape runs on the full sequence.
SEQUENCE_PLAN = SequencePlan(
    segments=("video",),
    tokens=_tokens,
    inputs={
        "": {"timestep": Split("video", 1, ndim=2)},
        "blocks.0": {"hidden_states": Split("video", 1, position=0)},
    },
    outputs={"rope": Split("video", 1)},
    gather=Gather("proj_out", 1, ("video",)),
    cross_attention_lengths=_cross_attention_lengths,
)

FAMILY = Family(
    name="wan",
    package=__package__,
    stages={"text_encoder": "stages:WanTextEncoder", "denoiser": "stages:WanDenoiser", "decoder": "stages:WanDecoder"},
    transformer_classes=("WanTransformer3DModel",),
    block_stacks=("blocks",),
    cache_points=WanCachePoints(),
    attention_processor="attention:WanPluggableAttnProcessor",
    sequence_plan=SEQUENCE_PLAN,
    wire_dims=wire_dims,
)
