"""diffusers attention processors for Flux and Wan that call a pluggable attention function.

The processors reproduce diffusers 0.42.1's ``FluxAttnProcessor`` and ``WanAttnProcessor`` step for step
(projections, QK-norm, RoPE, output projections) and replace only the ``dispatch_attention_fn`` call.

The attention callable contract (shared with ``registry.AttentionBackend.fn`` and the sequence-parallel
Ulysses/Ring callables, which are passed through ``install_attention`` the same way)::

    attention(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False) -> out | (out, lse)
      q: [batch, heads, seq_q, head_dim]; k, v: [batch, heads, seq_kv, head_dim]   (torch SDPA layout)
      out: same shape/dtype as q; may be a strided view (the processors only transpose and flatten it)
      softmax_scale: None means 1/sqrt(head_dim); kv_len: None | int | int tensor [batch], keys >= kv_len ignored
      The processors call it with keywords defaulted (no scale, no kv_len, no lse) and use only ``out``.

Which call is which (a sequence-parallel callable must treat them differently):
  * Flux (double and single blocks): joint attention over [text ; image] tokens, seq_q == seq_kv.
  * Wan self-attention (``attn1``): seq_q == seq_kv, the video tokens.
  * Wan cross-attention (``attn2``): seq_kv is the text (512 tokens) or the CLIP image context (I2V), so
    seq_q != seq_kv; diffusers itself never context-parallelises these calls. A callable can tell the
    cases apart by comparing seq_q and seq_kv.

Public API: ``install_attention(transformer, attention)``, ``attention_for(backend_name)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as _flux_qkv_projections
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections as _wan_added_kv_projections
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as _wan_qkv_projections

from smart_diffusion_backend.attention.registry import AttentionFn, get_attention_backend

__all__ = ["FluxPluggableAttnProcessor", "WanPluggableAttnProcessor", "install_attention", "attention_for"]


def _attend(attention: AttentionFn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # [b, s, h, d] -> [b, h, s, d] (views, like diffusers' native backend), attention, -> [b, s, h, d]
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def _reject_mask(attention_mask: torch.Tensor | None, name: str) -> None:
    if attention_mask is not None:
        raise ValueError(f"{name}: attention_mask is not supported by pluggable attention (use kv_len-style "
                         "padding through the attention callable instead)")


class FluxPluggableAttnProcessor:
    """diffusers' FluxAttnProcessor math with a pluggable attention callable (double and single blocks)."""

    def __init__(self, attention: AttentionFn):
        self.attention = attention

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _reject_mask(attention_mask, type(self).__name__)
        query, key, value, encoder_query, encoder_key, encoder_value = _flux_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # [b, s, h*d] -> [b, s, h, d]
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            # [b, s_txt + s_img, h, d]: text first, as diffusers does
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = _attend(self.attention, query, key, value)
        hidden_states = hidden_states.flatten(2, 3)  # [b, s, h, d] -> [b, s, h*d]
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Copied from diffusers' WanAttnProcessor (a local function there).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanPluggableAttnProcessor:
    """diffusers' WanAttnProcessor math (self-, cross- and I2V image cross-attention) with pluggable attention."""

    # Text context length that diffusers' Wan hard-codes to split I2V's [image ; text] context.
    TEXT_CONTEXT_LENGTH = 512

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
        _reject_mask(attention_mask, type(self).__name__)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - self.TEXT_CONTEXT_LENGTH
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _wan_qkv_projections(attn, hidden_states, encoder_hidden_states)
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
            key_img, value_img = _wan_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = _attend(self.attention, query, key_img, value_img)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = _attend(self.attention, query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [b, s, h, d] -> [b, s, h*d]
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


_PROCESSOR_BY_MODEL: tuple[tuple[type, type], ...] = (
    (FluxTransformer2DModel, FluxPluggableAttnProcessor),
    (WanTransformer3DModel, WanPluggableAttnProcessor),
)


def install_attention(transformer: torch.nn.Module, attention: AttentionFn) -> None:
    """Route every attention call of ``transformer`` through ``attention`` (see the module docstring)."""
    if not callable(attention):
        raise ValueError(f"install_attention: attention must be callable, got {type(attention).__name__}")
    for model_cls, processor_cls in _PROCESSOR_BY_MODEL:
        if isinstance(transformer, model_cls):
            transformer.set_attn_processor(processor_cls(attention))
            return
    supported = ", ".join(model_cls.__name__ for model_cls, _ in _PROCESSOR_BY_MODEL)
    raise ValueError(f"install_attention: unsupported transformer {type(transformer).__name__}; supported: "
                     f"{supported}")


def attention_for(backend_name: str) -> Callable:
    """The attention callable of a registry backend, after checking it can run here."""
    backend = get_attention_backend(backend_name)
    available, reason = backend.is_available()
    if not available:
        raise ValueError(f"attention backend {backend_name!r} is not available here: {reason}")
    return backend.fn
