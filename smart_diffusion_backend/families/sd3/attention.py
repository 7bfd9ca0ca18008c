"""SD3's attention processor with a pluggable attention callable (attention/processors.py has the contract).

It reproduces diffusers 0.42.1's ``JointAttnProcessor2_0`` step for step (projections, optional QK-norm of
SD3.5, the context projections, output projections) and replaces only its
``F.scaled_dot_product_attention`` call. Which call is which:

* ``attn`` of every ``JointTransformerBlock``: joint attention over [image ; text] tokens (the text is
  concatenated after the image, unlike Flux), so queries and keys have the same length;
* ``attn2`` of SD3.5's dual-attention blocks: self-attention over the image tokens alone (no context).
"""

from __future__ import annotations

import torch

from ...attention.processors import AttentionFn, reject_mask

__all__ = ["SD3PluggableAttnProcessor"]


class SD3PluggableAttnProcessor:
    """diffusers' JointAttnProcessor2_0 math (joint attention, and SD3.5's image-only attn2) with pluggable
    attention."""

    def __init__(self, attention: AttentionFn):
        self.attention = attention

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        reject_mask(attention_mask, type(self).__name__)
        image_tokens = hidden_states.shape[1]
        batch_size = hidden_states.shape[0]

        # `sample` projections: [b, s, h*d] -> [b, h, s, d]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections, concatenated after the image tokens: [b, h, s_img + s_txt, d]
        if encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)
            encoder_query = encoder_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_key = encoder_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_value = encoder_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        hidden_states = self.attention(query, key, value)  # [b, h, s, d]
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
