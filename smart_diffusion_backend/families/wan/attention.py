"""Wan's attention processor with a pluggable attention callable (attention/processors.py has the contract).

It reproduces diffusers 0.42.1's ``WanAttnProcessor`` step for step (projections, QK-norm, RoPE, output
projections) and replaces only the ``dispatch_attention_fn`` call. Which call is which:

* self-attention (``attn1``): queries and keys are the video tokens, of one length;
* cross-attention (``attn2``): the keys are the text, or the I2V image context, so their length differs
  from the queries'. A callable (the sequence-parallel one) tells the two apart by comparing the lengths.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from ...attention.processors import AttentionFn, attend, reject_mask
from .spec import TEXT_CONTEXT_LENGTH

__all__ = ["WanPluggableAttnProcessor"]


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # As diffusers' WanAttnProcessor (a local function there).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanPluggableAttnProcessor:
    """diffusers' WanAttnProcessor math (self-, cross- and I2V image cross-attention) with pluggable attention."""

    TEXT_CONTEXT_LENGTH = TEXT_CONTEXT_LENGTH

    def __init__(self, attention: AttentionFn):
        self.attention = attention

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        reject_mask(attention_mask, type(self).__name__)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - self.TEXT_CONTEXT_LENGTH
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        # [b, s, h*d] -> [b, s, h, d]
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = attend(self.attention, query, key_img, value_img)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = attend(self.attention, query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [b, s, h, d] -> [b, s, h*d]
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
