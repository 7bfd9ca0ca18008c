"""The rowwise e4m3 quantisation kernel (kernels/rowwise_fp8.py) on CPU: the Triton kernel under the interpreter
against the torch arithmetic it replaces, and the custom op under torch.compile. Its speed is measured on the
GPU (bench/transformer_step_bench.py); bench/rowwise_fp8_bench.py checks it there against the same reference."""

from __future__ import annotations

import pytest
import torch

from smart_diffusion_backend.kernels import rowwise_fp8 as module
from smart_diffusion_backend.kernels.rowwise_fp8 import FP8_MAX, rowwise_fp8, rowwise_fp8_reference


def exact(x: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool) -> torch.Tensor:
    """float64 y = GELU_tanh(x + bias), the formula written out (independent of torch's gelu)."""
    y = x.double() + (bias.double() if bias is not None else 0.0)
    if gelu_tanh:
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias,gelu_tanh", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("cols", [1, 333, 1024])
def test_kernel_matches_the_torch_arithmetic(monkeypatch, dtype, bias, gelu_tanh, cols):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(6, cols, generator=gen) * 3).to(dtype)
    x[2] = 0  # an all-zero row keeps a finite scale
    x[4, 0] = 60.0  # one large value: GELU's exponent overflows for large negative inputs elsewhere
    b = (torch.randn(cols, generator=gen)).to(dtype) if bias else None
    q, scale = module._launch(x, b, gelu_tanh)
    ref_q, ref_scale = rowwise_fp8_reference(x, b, gelu_tanh)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (6, 1)
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    # the same e4m3 values, bar a rounding tie where GELU's two formulas differ in the last float32 bit
    assert (q.float() != ref_q.float()).float().mean() <= 1e-3
    # and what they stand for is y to within e4m3's rounding (half a step: 2^-4 relative) of the row's range
    y = exact(x, b, gelu_tanh)
    dequantised = q.double() * scale.double()
    assert ((dequantised - y).abs() <= y.abs() * 2 ** -4 + scale.double() * 2 ** -9 + 1e-6).all()
    assert torch.isfinite(scale).all()
    if b is None:
        assert torch.equal(q[2].float(), torch.zeros(cols))
    assert q.float().abs().max() <= FP8_MAX


def test_rows_are_read_at_their_stride_and_no_rows_is_fine(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wide = torch.randn(5, 96)
    q, scale = module._launch(wide[:, :64], None, True)  # rows 96 elements apart
    ref_q, ref_scale = rowwise_fp8_reference(wide[:, :64].contiguous(), None, True)
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0) and (q.float() != ref_q.float()).sum() <= 1
    q, scale = module._launch(torch.randn(0, 64), None, False)
    assert q.shape == (0, 64) and scale.shape == (0, 1)


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, b = torch.randn(4, 40, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    q, scale = rowwise_fp8(x.t().contiguous().t(), b, gelu_tanh=True)  # column-major input is made row-major
    ref_q, ref_scale = rowwise_fp8_reference(x, b, True)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)


def test_compiled_calls_go_through_the_custom_op_and_match_eager():
    x, b = torch.randn(8, 48), torch.randn(48)

    def layer_input(x):
        return rowwise_fp8(x * 2.0, b, gelu_tanh=True)

    compiled = torch.compile(layer_input, fullgraph=True)
    (q, scale), (eager_q, eager_scale) = compiled(x), layer_input(x)
    assert torch.equal(q.float(), eager_q.float()) and torch.equal(scale, eager_scale)


@pytest.mark.parametrize("x,bias,message", [
    (torch.zeros(2, 3, 4), None, "x must be 2-D"),
    (torch.zeros(2, 4), torch.zeros(5), "bias must be 1-D with 4 entries"),
])
def test_bad_shapes_are_refused_with_the_shape(x, bias, message):
    with pytest.raises(ValueError, match=message):
        rowwise_fp8(x, bias)
