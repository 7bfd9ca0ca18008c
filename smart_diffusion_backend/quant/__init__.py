"""Quantised GEMMs for the denoiser (system param ``fp8_linear``)."""

from smart_diffusion_backend.quant.fp8_linear import FP8_MAX, Fp8Linear, quantize_linears

__all__ = ["FP8_MAX", "Fp8Linear", "quantize_linears"]
