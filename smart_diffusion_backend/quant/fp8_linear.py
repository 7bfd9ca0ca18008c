"""FP8 (e4m3) GEMMs for the transformer blocks' projections and MLPs: the system param ``fp8_linear``.

Why: after our attention kernel, a compiled one-GPU forward is mostly bf16 GEMMs (Flux.1-dev 1024²: 85 of
136 ms; Wan2.1-14B 480p: ~1.0 of 2.7 s; bench/results/transformer-step-*-h100.md), and Hopper runs e4m3
tensor-core GEMMs at twice the bf16 rate.

How (the "dynamic, rowwise" scheme of torchao's float8 inference, written on torch's own ``_scaled_mm``):
* weights are quantised once, at load, with one float32 scale per output channel (``amax / 448``);
* activations are quantised per call with one scale per row (token), so one outlier token does not flatten
  the others' precision;
* ``torch._scaled_mm`` multiplies in e4m3, accumulates in float32, applies both scales and writes the
  input's dtype (bf16 on GPUs: rowwise scaling needs it there); the bias is added after.

Only the Linear layers inside the repeated blocks are replaced, and of those only the ones that see every
token: the adaptive-norm modulation linears (``norm*.linear``) see one row per sample, where an FP8 GEMM
gains nothing and the conditioning it carries matters most. Layers whose sizes are not multiples of 16
(``_scaled_mm``'s requirement) stay as they are. Embedders and the output projection stay too.

Error: e4m3 keeps 3 mantissa bits; one GEMM on random normal inputs lands ~3.6e-2 rel-L2 from float
(tests/test_fp8_linear.py measures it against float64).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Fp8Linear", "quantize_linears", "FP8_MAX"]

FP8_MAX = 448.0  # largest finite float8 e4m3fn
_MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of a 2-D x (row-major, as _scaled_mm's first operand must be) and their float32 scales,
    shape [rows, 1] with unit strides (_scaled_mm checks them)."""
    x = x.contiguous()
    scale = (x.abs().amax(dim=-1).float().clamp_min(_MIN_SCALE) / FP8_MAX).unsqueeze(1)
    quantised = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantised, scale


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose GEMM runs in e4m3 with rowwise scales (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, weight_scale = _rowwise(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in] e4m3; its transpose is the column-major operand
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1))  # [1, out] float32
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:  # a sequence-parallel rank may hold no token of a stream (e.g. the text)
            return x.new_empty(*x.shape[:-1], self.out_features)
        quantised, scale = _rowwise(rows)
        out = torch._scaled_mm(quantised, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype)
        if self.bias is not None:  # added apart: compiled, it fuses into the next elementwise op
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def quantize_linears(transformer: nn.Module) -> int:
    """Replace the token-wise Linear layers of ``transformer``'s repeated blocks (diffusers'
    ``_repeated_blocks``) with ``Fp8Linear`` in place; returns how many were replaced."""
    block_types = set(getattr(transformer, "_repeated_blocks", ()) or ())
    if not block_types:
        raise ValueError(f"fp8_linear: {type(transformer).__name__} declares no repeated blocks to quantise")
    replaced = 0
    for block in transformer.modules():
        if type(block).__name__ not in block_types:
            continue
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or not Fp8Linear.supports(module):
                continue
            if any(part.startswith("norm") for part in name.split(".")):
                continue  # adaptive-norm modulation: one row per sample
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, Fp8Linear(module))
            replaced += 1
    return replaced
