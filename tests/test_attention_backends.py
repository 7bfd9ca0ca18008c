"""Attention backend registry, the sdpa backend's LSE path, and the pluggable Flux/Wan processors (CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from smart_diffusion_backend.attention import BACKEND_NAMES, get_attention_backend, list_attention_backends
from smart_diffusion_backend.attention.processors import attention_for, install_attention
from smart_diffusion_backend.attention.registry import BACKEND_ALIASES, sdpa_attention

from .reference import rel_l2

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def reference(q, k, v, softmax_scale=None, kv_len=None):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if kv_len is not None:
        lengths = kv_len if isinstance(kv_len, torch.Tensor) else torch.full((q.shape[0],), kv_len)
        visible = torch.arange(k.shape[2])[None, :] < lengths[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v, lse


def make_qkv(batch=2, heads=2, seq_q=19, seq_kv=23, head_dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, s, head_dim, generator=gen).to(dtype) for s in (seq_q, seq_kv, seq_kv))


# ---- registry ---------------------------------------------------------------------------------------------
def test_registry_names_and_constraints():
    assert BACKEND_NAMES == ("sdpa", "triton", "triton_int8", "flash_attn")
    for backend in list_attention_backends():
        assert backend.supports_lse
        available, reason = backend.is_available()
        assert isinstance(available, bool) and reason
    sdpa = get_attention_backend("sdpa")
    assert sdpa.is_available()[0]
    with pytest.raises(ValueError, match="head_dim"):
        get_attention_backend("triton").check_inputs(*make_qkv(head_dim=512))
    with pytest.raises(ValueError, match="dtypes"):
        get_attention_backend("triton_int8").check_inputs(*make_qkv())


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="sdpa, triton, triton_int8, flash_attn"):
        get_attention_backend("xformers")
    with pytest.raises(ValueError, match="valid names"):
        attention_for("xformers")


def test_triton_fp8_is_an_alias_of_triton_int8(monkeypatch):
    # the backend's former name: system configs that still say triton_fp8 get the same backend
    assert BACKEND_ALIASES == {"triton_fp8": "triton_int8"} and "triton_fp8" not in BACKEND_NAMES
    assert get_attention_backend("triton_fp8") is get_attention_backend("triton_int8")
    assert get_attention_backend("triton_fp8").name == "triton_int8"
    with pytest.raises(ValueError, match="triton_fp8 -> triton_int8"):
        get_attention_backend("triton_fp4")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(dtype=torch.bfloat16)
    out, lse = attention_for("triton_fp8")(q, k, v, kv_len=20, return_lse=True)
    int8_out, int8_lse = attention_for("triton_int8")(q, k, v, kv_len=20, return_lse=True)
    assert torch.equal(out, int8_out) and torch.equal(lse, int8_lse)
    ref, ref_lse = reference(q, k, v, kv_len=20)
    assert rel_l2(out, ref) <= 2e-2
    assert (lse.double() - ref_lse).abs().max().item() <= 5e-2


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    available, reason = get_attention_backend("triton").is_available()
    assert not available and "TRITON_INTERPRET" in reason
    with pytest.raises(ValueError, match="not available"):
        attention_for("triton")


# ---- sdpa backend -----------------------------------------------------------------------------------------
def test_sdpa_is_plain_torch_sdpa_without_options():
    q, k, v = make_qkv()
    assert torch.equal(sdpa_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("kv_len", [None, 17, torch.tensor([5, 23]), 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_lse_and_kv_len(kv_len, dtype):
    q, k, v = make_qkv(dtype=dtype)
    out, lse = sdpa_attention(q, k, v, kv_len=kv_len, return_lse=True, softmax_scale=0.2)
    ref, ref_lse = reference(q, k, v, softmax_scale=0.2, kv_len=kv_len)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    if isinstance(kv_len, int) and kv_len == 0:
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        return
    assert rel_l2(out, ref) <= tol
    assert (lse.double() - ref_lse).abs().max().item() <= tol
    assert rel_l2(sdpa_attention(q, k, v, kv_len=kv_len, softmax_scale=0.2), ref) <= tol


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed (or no CUDA device)")
def test_flash_attn_backend_matches_sdpa():
    q, k, v = (t.cuda() for t in make_qkv(seq_q=300, seq_kv=300, head_dim=64, dtype=torch.bfloat16))
    fn = attention_for("flash_attn")
    out, lse = fn(q, k, v, kv_len=250, return_lse=True)
    ref, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), kv_len=250)
    assert rel_l2(out.cpu(), ref) <= 1e-2
    assert (lse.cpu().double() - ref_lse).abs().max().item() <= 1e-2


# ---- processors on tiny models ----------------------------------------------------------------------------
def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.randn(16, 3, generator=gen),
                  txt_ids=torch.zeros(7, 3), return_dict=False)
    return model.eval(), inputs


def tiny_wan(i2v: bool = False):
    torch.manual_seed(0)
    extra = dict(image_dim=24, added_kv_proj_dim=32) if i2v else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=256, **extra)
    gen = torch.Generator().manual_seed(1)
    # I2V: diffusers hard-codes 512 text tokens after the image context
    text_tokens = 512 if i2v else 9
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=gen), return_dict=False)
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 24, generator=gen)
    return model.eval(), inputs


MODELS = {"flux": tiny_flux, "wan": tiny_wan, "wan_i2v": lambda: tiny_wan(i2v=True)}


@pytest.mark.parametrize("name", list(MODELS))
def test_sdpa_processors_match_diffusers_bit_exactly(name):
    model, inputs = MODELS[name]()
    with torch.no_grad():
        expected = model(**inputs)[0]
        install_attention(model, attention_for("sdpa"))
        actual = model(**inputs)[0]
    assert (actual - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_triton_processors_under_interpreter(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, inputs = MODELS[name]()
    with torch.no_grad():
        expected = model(**inputs)[0]
        install_attention(model, attention_for("triton"))
        actual = model(**inputs)[0]
    assert rel_l2(actual, expected) <= 1e-5


def test_callable_contract_seen_by_attention():
    calls = []

    def recording_attention(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), softmax_scale, kv_len, return_lse))
        return F.scaled_dot_product_attention(q, k, v)

    model, inputs = tiny_wan()
    install_attention(model, recording_attention)
    with torch.no_grad():
        model(**inputs)
    # 2 layers x (self, cross); video tokens 2*4*4 = 32 after the (1, 2, 2) patch; text 9 tokens
    assert calls == [((1, 2, 32, 16), (1, 2, 32, 16), (1, 2, 32, 16), None, None, False),
                     ((1, 2, 32, 16), (1, 2, 9, 16), (1, 2, 9, 16), None, None, False)] * 2


def test_install_attention_rejects_unknown_models_and_non_callables():
    with pytest.raises(ValueError, match="unsupported transformer"):
        install_attention(torch.nn.Linear(2, 2), sdpa_attention)
    model, _ = tiny_flux()
    with pytest.raises(ValueError, match="callable"):
        install_attention(model, "sdpa")
