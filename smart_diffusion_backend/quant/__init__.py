"""Quantised GEMMs for the denoiser (system param ``fp8_linear``)."""

from smart_diffusion_backend.quant.fp8_linear import (
    FP8_MAX,
    Fp8Linear,
    fuse_gelu_mlps,
    quantize_linears,
    use_quantisation_kernel,
)

__all__ = ["FP8_MAX", "Fp8Linear", "fuse_gelu_mlps", "quantize_linears", "use_quantisation_kernel"]
