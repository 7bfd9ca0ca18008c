"""Triton-lang kernels: attention forward (bf16/fp16 and quantised), and the rowwise e4m3 quantisation of
fp8_linear's GEMM inputs (``rowwise_fp8``)."""

from smart_diffusion_backend.kernels.flash_attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    flash_attention,
    flash_attention_fp8,
)

__all__ = ["flash_attention", "flash_attention_fp8", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]
