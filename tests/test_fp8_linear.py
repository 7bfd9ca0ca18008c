"""FP8 (e4m3, rowwise-scaled) GEMMs for the transformer blocks: the system param ``fp8_linear`` (CPU).

torch's ``_scaled_mm`` runs on CPU too, so the layer, the replacement rules and the denoiser path are tested
here; the speed is a GPU matter (bench/transformer_step_bench.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smart_diffusion_backend.params import ConfigError, SystemParams
from smart_diffusion_backend.quant import FP8_MAX, Fp8Linear, quantize_linears

from .reference import rel_l2
from .test_attention_backends import tiny_flux, tiny_wan


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """What the layer's rowwise quantisation keeps of x, in float64 (an independent emulation)."""
    scale = x.double().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x.double() / scale).to(torch.float8_e4m3fn).double() * scale


def test_gemm_equals_its_emulation_and_stays_within_e4m3_error():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 33, 256)
    out = Fp8Linear(linear)(x)
    emulated = e4m3_rows(x) @ e4m3_rows(linear.weight).T + linear.bias.double()
    assert out.shape == (4, 33, 96)
    assert rel_l2(out, emulated) <= 1e-5  # the scales and layout are applied exactly as intended
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    assert 1e-2 < rel_l2(out, exact) <= 6e-2  # e4m3's 3 mantissa bits: really quantised, within budget


def test_strided_and_empty_inputs():
    # the sequence-parallel path hands the blocks slices and transposes, and a rank may hold no token of a
    # stream: _scaled_mm wants row-major rows and unit-stride scales, and nothing to do for no rows
    torch.manual_seed(0)
    layer = Fp8Linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, 9).transpose(1, 2)  # [2, 9, 64], not contiguous
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert layer(torch.randn(1, 0, 64)).shape == (1, 0, 32)


def test_zero_rows_stay_finite_and_bf16_in_gives_bf16_out():
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    x[0, 1] = 0
    out = Fp8Linear(linear)(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out[0, 1], linear.bias)  # a zero row gives exactly the bias


def test_only_the_blocks_token_wise_linears_are_replaced():
    model, _ = tiny_flux()
    replaced = quantize_linears(model)
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert replaced == len(fp8) == 22
    assert "transformer_blocks.0.attn.to_q" in fp8 and "transformer_blocks.0.ff.net.2" in fp8
    assert "single_transformer_blocks.1.proj_out" in fp8
    # adaptive-norm modulation (one row per sample), embedders and the output projection stay as they are
    for name in ("transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear", "x_embedder",
                 "context_embedder", "proj_out", "norm_out.linear"):
        assert type(model.get_submodule(name)) is nn.Linear, name


def test_quantised_flux_and_wan_forwards_stay_close_to_float():
    for model, kwargs in (tiny_flux(), tiny_wan()):
        with torch.inference_mode():
            reference = model(**kwargs)[0]
            assert quantize_linears(model) > 0
            out = model(**kwargs)[0]
        assert 1e-3 < rel_l2(out, reference) <= 0.1, type(model).__name__


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated blocks"):
        quantize_linears(nn.Sequential(nn.Linear(16, 16)))


def test_fp8_linear_on_cuda_needs_bfloat16():
    SystemParams(name="ok", device="cuda", dtype="bfloat16", fp8_linear=True).validate()
    with pytest.raises(ConfigError, match="fp8_linear on cuda needs dtype bfloat16"):
        SystemParams(name="bad", device="cuda", dtype="float16", fp8_linear=True).validate()


def test_gelu_mlps_hand_bias_and_gelu_to_the_second_layer():
    model, _ = tiny_flux()
    quantize_linears(model)
    ff = model.transformer_blocks[0].ff
    first, second = ff.net[0], ff.net[2]
    assert isinstance(first, Fp8Linear) and first.bias is None  # the GELU wrapper gave way to its projection
    assert second.input_gelu_bias is not None and second.input_gelu_bias.shape == (first.out_features,)
    wan, _ = tiny_wan()
    quantize_linears(wan)
    fused = [block.ffn.net[2].input_gelu_bias is not None for block in wan.blocks]
    assert fused == [True, True]
    # Flux's single blocks have no FeedForward (their GELU feeds a concatenation): left as they are
    assert model.single_transformer_blocks[0].proj_out.input_gelu_bias is None
    # attention output projections quantise their input in the kernel, the layers after a norm do not
    block = model.transformer_blocks[0]
    assert block.attn.to_out[0].quantise_input_in_kernel and block.attn.to_add_out.quantise_input_in_kernel
    assert not block.attn.to_q.quantise_input_in_kernel and not first.quantise_input_in_kernel
    assert all(b.attn1.to_out[0].quantise_input_in_kernel and b.attn2.to_out[0].quantise_input_in_kernel
               for b in wan.blocks)


@pytest.mark.parametrize("make", [tiny_flux, tiny_wan], ids=["flux", "wan"])
def test_fused_mlp_equals_the_unfused_fp8_one(make):
    # In float32 the unfused path (GEMM, + bias, GELU, then the rowwise quantisation) does the fused path's
    # arithmetic step by step, so the two forwards agree to the last bit.
    outputs = []
    for fuse in (True, False):
        model, kwargs = make()
        quantize_linears(model, quantisation_kernel=fuse)
        assert any(m.input_gelu_bias is not None for m in model.modules() if isinstance(m, Fp8Linear)) is fuse
        with torch.inference_mode():
            outputs.append(model(**kwargs)[0])
    assert torch.equal(outputs[0], outputs[1])


def test_an_mlp_with_dropout_or_another_activation_is_not_fused():
    from diffusers.models.attention import FeedForward

    from smart_diffusion_backend.quant import fuse_gelu_mlps

    for ff in (FeedForward(32, activation_fn="gelu-approximate", dropout=0.1), FeedForward(32, activation_fn="gelu")):
        ff.net[0].proj = Fp8Linear(ff.net[0].proj)
        ff.net[2] = Fp8Linear(ff.net[2])
        assert fuse_gelu_mlps(ff) == 0 and ff.net[2].input_gelu_bias is None
    ff = FeedForward(32, activation_fn="gelu-approximate")
    ff.net[0].proj, ff.net[2] = Fp8Linear(ff.net[0].proj), Fp8Linear(ff.net[2])
    assert fuse_gelu_mlps(ff) == 1 and fuse_gelu_mlps(ff) == 0  # once
