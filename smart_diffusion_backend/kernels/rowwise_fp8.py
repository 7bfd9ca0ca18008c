"""Rowwise e4m3 quantisation of a GEMM's input, optionally fused with the bias add and tanh-GELU before it.

Why: with ``fp8_linear`` the MLP of a DiT block is ``GEMM -> + bias -> GELU(tanh) -> quantise -> GEMM``. The
quantisation needs each row's absolute maximum, and torch.compile's inductor turns that middle part into a
reduction kernel that walks every row twice (once for the maximum, once to quantise). This kernel holds one row
in registers (up to ``MAX_COLUMNS`` columns) and reads it once. The attention output projections' inputs go
through it too: inductor has nothing to fuse their quantisation with there. Timings: docs/attention.md
(fp8_linear) and bench/results/quantization/rowwise-fp8-h100.md.

``rowwise_fp8(x, bias=None, gelu_tanh=False) -> (q, scale)``: ``x`` is 2-D (copied row-major if it is not);
with ``y = x (+ bias)``, ``GELU_tanh(y)`` when asked, computed in float32, ``scale = max|y| / 448`` per row (at
least 1e-12) and ``q = e4m3(y / scale)``: ``q`` is ``[rows, cols]`` float8_e4m3fn, ``scale`` ``[rows, 1]``
float32, the operands torch's ``_scaled_mm`` takes. On CUDA it runs the Triton kernel, on the CPU (or past ``MAX_COLUMNS``)
the same arithmetic in torch; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (tests). Under
torch.compile it is the custom op ``smart_diffusion::rowwise_fp8``, which inductor leaves whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smart_diffusion_backend.kernels.common import FP8_MAX, MAX_COMBINE, interpreting, jit_for_mode

__all__ = ["rowwise_fp8", "rowwise_fp8_reference", "FP8_MAX", "MAX_COLUMNS"]

MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
MAX_COLUMNS = 32768  # one row per program, in registers: 64 float32 values per thread at 16 warps


def _rowwise_fp8_kernel(x_ptr, bias_ptr, q_ptr, scale_ptr, n_cols, x_row_stride, q_row_stride,
                        HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    y = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if GELU_TANH:
        # 0.5 y (1 + tanh(u)) is y * sigmoid(2u): one exp, no tanh (the interpreter has no libdevice)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2 / pi) (y + 0.044715 y^3)
        y = y / (1.0 + tl.exp(-2.0 * u))
    # columns past n_cols hold 0 (and GELU(0) = 0), so they do not move the maximum. tl.reduce with the standard
    # combine function, not tl.max: see common.py on triton's @jit helpers and the interpreter.
    scale = tl.maximum(tl.reduce(tl.abs(y), 0, MAX_COMBINE), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
    tl.store(q_ptr + row * q_row_stride + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + row, scale)


def rowwise_fp8_reference(x: torch.Tensor, bias: torch.Tensor | None = None,
                          gelu_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same arithmetic in torch (the CPU path, and the tests' reference)."""
    y = x.float()
    if bias is not None:
        y = y + bias.float()
    if gelu_tanh:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    scale = (y.abs().amax(dim=-1).clamp_min(MIN_SCALE) / FP8_MAX).unsqueeze(1)
    return (y / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _launch(x: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    interpret = interpreting()
    # The interpreter's float32 -> e4m3 conversion drops the carry when rounding up into the next binade
    # (124.3 -> 64, not 128; triton 3.6): there the kernel stores float32 and torch converts. On a GPU it is
    # the hardware's round-to-nearest-even conversion.
    q = torch.empty((rows, cols), device=x.device, dtype=torch.float32 if interpret else torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    if rows > 0:
        block = triton.next_power_of_2(cols)
        num_warps = max(4, min(16, block // 1024))
        kernel = jit_for_mode(_rowwise_fp8_kernel, interpret)  # jitted per mode: see common.py
        kernel[(rows, )](x, bias if bias is not None else x, q, scale, cols, x.stride(0), q.stride(0),
                         HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh, BLOCK=block, num_warps=num_warps)
    return (q.to(torch.float8_e4m3fn) if interpret else q), scale


def _check(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"rowwise_fp8: x must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[1]):
        raise ValueError(f"rowwise_fp8: bias must be 1-D with {x.shape[1]} entries (x's columns), got shape "
                         f"{tuple(bias.shape)}")


def _rowwise_fp8(x: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if x.shape[1] <= MAX_COLUMNS and (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        return _launch(x, bias, gelu_tanh)
    return rowwise_fp8_reference(x, bias, gelu_tanh)


# torch.compile sees the kernel through this op (opaque to dynamo); eager calls bypass it.
@torch.library.custom_op("smart_diffusion::rowwise_fp8", mutates_args=())
def _rowwise_fp8_op(x: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rowwise_fp8(x, bias, gelu_tanh)


@_rowwise_fp8_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


def rowwise_fp8(x: torch.Tensor, bias: torch.Tensor | None = None,
                gelu_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of ``x (+ bias)``, through tanh-GELU when ``gelu_tanh``, and their float32 scales (see the
    module docstring)."""
    _check(x, bias)
    if torch.compiler.is_compiling():
        return _rowwise_fp8_op(x, bias, gelu_tanh)
    return _rowwise_fp8(x, bias, gelu_tanh)
