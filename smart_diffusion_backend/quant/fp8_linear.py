"""FP8 (e4m3) GEMMs for the transformer blocks' projections and MLPs: the system param ``fp8_linear``.

Why: after our attention kernel, a compiled one-GPU forward is mostly bf16 GEMMs (Flux.1-dev 1024²: 85 of
136 ms; Wan2.1-14B 480p: ~1.0 of 2.7 s; bench/results/transformer-step/transformer-step-*-h100.md), and Hopper runs e4m3
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

MLPs of the form ``Linear -> GELU(tanh) -> Linear`` (diffusers' ``FeedForward`` with "gelu-approximate": Flux's
double blocks, every Wan block) hand the first projection's bias and the GELU to the second layer, whose input
quantisation applies them in one pass over each row (``kernels/rowwise_fp8.py``): compiled, inductor's own
kernel for that step read every row twice and took 2.0 ms per Wan 480p block on an H100. The attention output
projections quantise their input with the same kernel (``use_quantisation_kernel``).

Error: e4m3 keeps 3 mantissa bits; one GEMM on random normal inputs lands ~3.6e-2 rel-L2 from float
(tests/test_fp8_linear.py measures it against float64).
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from smart_diffusion_backend.kernels.rowwise_fp8 import FP8_MAX, rowwise_fp8, rowwise_fp8_reference

__all__ = ["Fp8Linear", "fuse_gelu_mlps", "quantize_linears", "use_quantisation_kernel", "FP8_MAX"]


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of a 2-D x (row-major, as _scaled_mm's first operand must be) and their float32 scales,
    shape [rows, 1] with unit strides (_scaled_mm checks them). Plain torch ops: compiled, inductor fuses them
    with the norm before the layer."""
    return rowwise_fp8_reference(x.contiguous())


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
        # set by use_quantisation_kernel: this layer's input is the previous projection's output before its bias
        # and GELU(tanh), both applied by the input quantisation (fuse_gelu_mlps)
        self.register_buffer("input_gelu_bias", None)
        # set by use_quantisation_kernel where the input comes from a kernel inductor cannot fuse with (attention)
        self.quantise_input_in_kernel = False

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:  # a sequence-parallel rank may hold no token of a stream (e.g. the text)
            return x.new_empty(*x.shape[:-1], self.out_features)
        if self.input_gelu_bias is not None:
            quantised, scale = rowwise_fp8(rows, self.input_gelu_bias, gelu_tanh=True)
        elif self.quantise_input_in_kernel:
            quantised, scale = rowwise_fp8(rows)
        else:
            quantised, scale = _rowwise(rows)
        out = torch._scaled_mm(quantised, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype)
        if self.bias is not None:  # added apart: compiled, it fuses into the next elementwise op
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fused = ", input: GELU(tanh)(x + bias of the previous layer)" if self.input_gelu_bias is not None else \
            (", input quantised by rowwise_fp8" if self.quantise_input_in_kernel else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3{fused}")


def fuse_gelu_mlps(module: nn.Module) -> int:
    """In each diffusers ``FeedForward`` under ``module`` built as ``[GELU(tanh) around an Fp8Linear, Dropout,
    Fp8Linear]``, move the first projection's bias and the GELU into the second layer's input quantisation; the
    GELU wrapper is replaced by its projection (``net[0]``). Returns how many MLPs were fused."""
    fused = 0
    for ff in module.modules():
        if not isinstance(ff, FeedForward) or len(ff.net) != 3:
            continue
        activation, dropout, second = ff.net
        # dropout moves in front of the GELU: fused only where it does nothing (p = 0, as in Flux and Wan)
        if not (type(activation) is GELU and activation.approximate == "tanh" and isinstance(dropout, nn.Dropout)
                and dropout.p == 0 and isinstance(activation.proj, Fp8Linear) and isinstance(second, Fp8Linear)
                and second.input_gelu_bias is None):
            continue
        first = activation.proj
        bias = first.bias if first.bias is not None else torch.zeros(first.out_features, device=first.weight.device)
        second.input_gelu_bias = bias
        first.bias = None
        ff.net[0] = first
        fused += 1
    return fused


# attention output projections (diffusers' names): their input is the attention kernel's output
_ATTENTION_OUTPUTS = ("to_out.0", "to_add_out")


def use_quantisation_kernel(module: nn.Module) -> int:
    """Quantise with ``rowwise_fp8`` the inputs that inductor cannot fuse with the op before them: the second
    layer of each GELU MLP (``fuse_gelu_mlps``) and the attention output projections. The other layers keep
    plain torch ops, which inductor fuses with the norm before them. Returns how many layers changed.

    Measured on one H100 (bench/results/quantization/rowwise-fp8-h100.md): 0.60 ms against inductor's 1.58 ms at Wan 480p's
    MLP (32,760 × 13,824), 0.17 against 0.25 ms at its projection inputs (32,760 × 5,120)."""
    changed = fuse_gelu_mlps(module)
    for name, layer in module.named_modules():
        if isinstance(layer, Fp8Linear) and name.endswith(_ATTENTION_OUTPUTS) and layer.input_gelu_bias is None:
            layer.quantise_input_in_kernel = True
            changed += 1
    return changed


def quantize_linears(transformer: nn.Module, quantisation_kernel: bool = True) -> int:
    """Replace the token-wise Linear layers of ``transformer``'s repeated blocks (diffusers'
    ``_repeated_blocks``) with ``Fp8Linear`` in place, then ``use_quantisation_kernel`` (False: every input
    quantised by plain torch ops, for benchmarks); returns how many layers were replaced."""
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
    if quantisation_kernel:
        use_quantisation_kernel(transformer)
    return replaced
