"""Route a diffusers transformer's attention through a pluggable attention callable.

Each model family ships a diffusers attention processor that reproduces diffusers' own step for step and
calls the callable where diffusers calls ``dispatch_attention_fn`` (``families/<name>/attention.py``);
``install_attention`` sets it on every attention module of a transformer. The callable contract (shared
with ``registry.AttentionBackend.fn`` and the sequence-parallel Ulysses/Ring callables, which are installed
the same way)::

    attention(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False) -> out | (out, lse)
      q: [batch, heads, seq_q, head_dim]; k, v: [batch, heads, seq_kv, head_dim]   (torch SDPA layout)
      out: same shape/dtype as q; may be a strided view (the processors only transpose and flatten it)
      softmax_scale: None means 1/sqrt(head_dim); kv_len: None | int | int tensor [batch], keys >= kv_len ignored
      The processors call it with keywords defaulted (no scale, no kv_len, no lse) and use only ``out``.

Self- or joint attention calls it with seq_q == seq_kv; cross-attention to a context (text, image) with
seq_q != seq_kv. A sequence-parallel callable tells the two apart that way.

Public API: ``install_attention(transformer, attention, family=None)``, ``attention_for(backend_name)``;
``attend`` and ``reject_mask`` for the families' processors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from smart_diffusion_backend.attention.registry import AttentionFn, get_attention_backend

__all__ = ["AttentionFn", "attend", "attention_for", "install_attention", "reject_mask"]


def attend(attention: AttentionFn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``attention`` on ``[b, s, h, d]`` projections: ``[b, h, s, d]`` views in (as diffusers' native backend
    makes them), ``[b, s, h, d]`` out."""
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def reject_mask(attention_mask: torch.Tensor | None, name: str) -> None:
    if attention_mask is not None:
        raise ValueError(f"{name}: attention_mask is not supported by pluggable attention (use kv_len-style "
                         "padding through the attention callable instead)")


def install_attention(transformer: torch.nn.Module, attention: AttentionFn, family: Any = None) -> None:
    """Route every attention call of ``transformer`` through ``attention``.

    ``family``: the transformer's model family (``families.Family``), whose processor class is installed.
    Without it the family is looked up by the transformer's class in the torch-free family registry (at
    call time: nothing of the families is imported with this module)."""
    if not callable(attention):
        raise ValueError(f"install_attention: attention must be callable, got {type(attention).__name__}")
    if family is None:
        from smart_diffusion_backend.families import family_of

        try:
            family = family_of(transformer)
        except ValueError as exc:
            raise ValueError(f"install_attention: {exc}") from None
    transformer.set_attn_processor(family.attention_processor_class()(attention))


def attention_for(backend_name: str) -> Callable:
    """The attention callable of a registry backend, after checking it can run here."""
    backend = get_attention_backend(backend_name)
    available, reason = backend.is_available()
    if not available:
        raise ValueError(f"attention backend {backend_name!r} is not available here: {reason}")
    return backend.fn
