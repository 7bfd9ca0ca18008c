"""The SD3 family as the library sees it (torch-free): StableDiffusion3Pipeline-compatible directories.

Text: CLIP-L and CLIP-G (77 tokens each, their penultimate hidden states side by side, zero-padded to T5's
width) then T5, so PROMPT_EMBEDS is ``[rows, 77 + T5 tokens, joint_attention_dim]`` and the model yaml's
``max_sequence_length`` (the text tokens fed to the transformer) is 77 + the T5 length; the pooled embedding
is CLIP-L's and CLIP-G's projections side by side (``pooled_projection_dim``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from ..flux.spec import FluxCachePoints
from ..spec import Family, Gather, SequencePlan, Split, WireDims, read_config

# StableDiffusion3Pipeline.check_inputs: T5 takes at most 512 tokens.
MAX_T5_TOKENS = 512


def vae_scale_factor(block_out_channels: list[int]) -> int:
    return 2 ** (len(block_out_channels) - 1)  # as StableDiffusion3Pipeline.__init__


def t5_tokens(max_sequence_length: int, clip_tokens: int) -> int:
    """The T5 length behind a model yaml's ``max_sequence_length`` (= CLIP's tokens + T5's)."""
    t5 = max_sequence_length - clip_tokens
    if not 1 <= t5 <= MAX_T5_TOKENS:
        raise ConfigError(
            f"sd3: max_sequence_length {max_sequence_length} is CLIP's {clip_tokens} tokens + T5's, and T5 "
            f"takes 1..{MAX_T5_TOKENS} tokens: use {clip_tokens + 1}..{clip_tokens + MAX_T5_TOKENS} "
            f"(StableDiffusion3Pipeline's default T5 length 256 -> {clip_tokens + 256})"
        )
    return t5


def wire_dims(weights: Path) -> WireDims:
    transformer, vae = read_config(weights, "transformer"), read_config(weights, "vae")
    return WireDims(
        text_dim=int(transformer["joint_attention_dim"]),
        pooled_dim=int(transformer["pooled_projection_dim"]),
        channels=int(vae["latent_channels"]),
        spatial_scale=vae_scale_factor(vae["block_out_channels"]),
        temporal_scale=None,
    )


class SD3CachePoints(FluxCachePoints):
    """``transformer_blocks`` (JointTransformerBlock) have Flux's block signature: ``(hidden_states,
    encoder_hidden_states, temb, ...)`` -> ``(encoder_hidden_states, hidden_states)``, so Flux's cache points
    serve; the cache keeps both streams. The last block is ``context_pre_only`` and returns
    ``(None, hidden_states)``: the text stream ends there. TeaCache's metric input is the first block's
    AdaLayerNormZero output (SD3.5's dual-attention blocks: SD35AdaLayerNormZeroX), as in Flux."""


def _tokens(arguments: Mapping[str, Any], config: Any) -> dict[str, int]:
    patch = config.patch_size
    height, width = arguments["hidden_states"].shape[-2:]  # [b, c, h, w] latents before patchifying
    return {"image": (height // patch) * (width // patch), "text": arguments["encoder_hidden_states"].shape[1]}


# The joint attention runs over [image; text] (JointAttnProcessor2_0 concatenates the text after the image).
# Image tokens are cut where they are built (pos_embed: patchify + positional embedding), the text at the
# transformer's input (context_embedder is token-wise); ControlNet residuals are image tokens. proj_out
# returns the image tokens only, and is gathered so the unpatchify reshape runs on the full sequence.
# SD3.5's dual-attention blocks add `attn2`, a self-attention over the image tokens alone: the leading
# segment of the joint sequence.
SEQUENCE_PLAN = SequencePlan(
    segments=("image", "text"),
    tokens=_tokens,
    inputs={
        "": {
            "encoder_hidden_states": Split("text", 1),
            "block_controlnet_hidden_states": Split("image", 1, each=True),
        },
    },
    outputs={"pos_embed": Split("image", 1)},
    gather=Gather("proj_out", 1, ("image",)),
    required=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    segment_attention={"transformer_blocks.*.attn2": ("image",)},
)

FAMILY = Family(
    name="sd3",
    package=__package__,
    stages={"text_encoder": "stages:SD3TextEncoder", "denoiser": "stages:SD3Denoiser", "decoder": "stages:SD3Decoder"},
    transformer_classes=("SD3Transformer2DModel",),
    block_stacks=("transformer_blocks",),
    cache_points=SD3CachePoints(),
    attention_processor="attention:SD3PluggableAttnProcessor",
    sequence_plan=SEQUENCE_PLAN,
    wire_dims=wire_dims,
)
