"""Attention backends (``registry``), the installer of a family's attention processor (``processors``) and
regional compile (``compile``).

Import ``processors`` and ``compile`` by name when needed; this package loads only the registry. Each
family's processor, which calls the backend's callable, lives in its folder (families/<name>/attention.py).
"""

from smart_diffusion_backend.attention.registry import (
    BACKEND_NAMES,
    AttentionBackend,
    AttentionFn,
    get_attention_backend,
    list_attention_backends,
)

__all__ = ["AttentionBackend", "AttentionFn", "BACKEND_NAMES", "get_attention_backend", "list_attention_backends"]
