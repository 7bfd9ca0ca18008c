"""Attention backends (registry), diffusers processors that use them, and single-GPU compile helpers.

``processors`` imports diffusers; import it explicitly (``from smart_diffusion_backend.attention.processors
import install_attention``) so the registry stays importable without diffusers.
"""

from smart_diffusion_backend.attention.registry import (
    BACKEND_NAMES,
    AttentionBackend,
    AttentionFn,
    get_attention_backend,
    list_attention_backends,
)

__all__ = ["AttentionBackend", "AttentionFn", "BACKEND_NAMES", "get_attention_backend", "list_attention_backends"]
