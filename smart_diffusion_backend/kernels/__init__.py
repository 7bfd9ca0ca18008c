"""Triton-lang kernels (attention forward, bf16/fp16 and FP8)."""

from smart_diffusion_backend.kernels.flash_attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    flash_attention,
    flash_attention_fp8,
)

__all__ = ["flash_attention", "flash_attention_fp8", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]
