"""Triton flash-attention kernels on CPU under the Triton interpreter (TRITON_INTERPRET=1).

The kernel module reads TRITON_INTERPRET at launch and avoids triton.language's @jit helpers, so these tests
work even when another test module imported triton first; the flag is set only while these tests run.
Small shapes: the interpreter runs each program instance in numpy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import smart_diffusion_backend.kernels as kernels_package
from smart_diffusion_backend.kernels import flash_attention, flash_attention_fp8

from .reference import rel_l2


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(q, k, v, softmax_scale=None, kv_len=None):
    """float64 attention and natural-log LSE; rows with no visible key give 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = q @ k.transpose(-1, -2) * scale
    if kv_len is not None:
        lengths = kv_len if isinstance(kv_len, torch.Tensor) else torch.full((q.shape[0],), kv_len)
        visible = torch.arange(k.shape[2])[None, :] < lengths[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


def make_qkv(batch, heads, seq_q, seq_kv, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, seq_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, seq_kv, head_dim, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "batch, heads, seq_q, seq_kv, head_dim",
    [
        (1, 2, 77, 77, 64),    # odd length, not a multiple of the block
        (2, 1, 33, 50, 80),    # seq_q != seq_kv, head_dim padded to 128
        (1, 1, 40, 70, 128),
        (1, 1, 5, 130, 16),    # fewer queries than one block, several key blocks
    ],
)
def test_matches_float64_reference(batch, heads, seq_q, seq_kv, head_dim):
    q, k, v = make_qkv(batch, heads, seq_q, seq_kv, head_dim)
    out, lse = flash_attention(q, k, v, return_lse=True)
    ref, ref_lse = reference(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (batch, heads, seq_q) and lse.dtype == torch.float32
    assert rel_l2(out, ref) <= 1e-5
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


def test_softmax_scale_and_no_lse():
    q, k, v = make_qkv(1, 2, 20, 24, 32)
    out = flash_attention(q, k, v, softmax_scale=0.3)
    assert isinstance(out, torch.Tensor)
    assert rel_l2(out, reference(q, k, v, softmax_scale=0.3)[0]) <= 1e-5


def test_kv_len_int_masks_padded_keys():
    q, k, v = make_qkv(1, 2, 33, 70, 64)
    out, lse = flash_attention(q, k, v, kv_len=45, return_lse=True)
    ref, ref_lse = reference(q, k, v, kv_len=45)
    assert rel_l2(out, ref) <= 1e-5
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5
    # padding keys must not matter at all
    k[:, :, 45:] = 1e4
    assert torch.equal(flash_attention(q, k, v, kv_len=45), out)


def test_kv_len_per_batch_tensor():
    q, k, v = make_qkv(2, 1, 17, 50, 32)
    kv_len = torch.tensor([10, 33], dtype=torch.int32)
    out, lse = flash_attention(q, k, v, kv_len=kv_len, return_lse=True)
    ref, ref_lse = reference(q, k, v, kv_len=kv_len)
    assert rel_l2(out, ref) <= 1e-5
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


def test_kv_len_zero_gives_zero_output_and_minus_inf_lse():
    q, k, v = make_qkv(1, 1, 16, 16, 16)
    out, lse = flash_attention(q, k, v, kv_len=0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_strided_inputs_and_output_layout():
    # [b, s, h, d] tensors viewed as [b, h, s, d], as the diffusers processors pass them
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=gen).transpose(1, 2) for _ in range(3))
    out = flash_attention(q, k, v)
    assert out.stride() == q.stride()
    assert rel_l2(out, reference(q, k, v)[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v = make_qkv(1, 2, 77, 40, 64, dtype=dtype)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert out.dtype == dtype
    ref, ref_lse = reference(q, k, v)
    assert rel_l2(out, ref) <= 1e-2
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-3


def test_preallocated_output_is_fully_written():
    q, k, v = make_qkv(1, 2, 37, 37, 80)
    out = torch.full_like(q, float("nan"))
    flash_attention(q, k, v, out=out)
    assert not out.isnan().any()
    assert rel_l2(out, reference(q, k, v)[0]) <= 1e-5


def test_int8_quantised_precision():
    q, k, v = make_qkv(1, 2, 77, 77, 64, dtype=torch.bfloat16)
    k = k + 3.0  # a key offset that smoothing must remove
    out, lse = flash_attention(q, k, v, precision="int8", kv_len=70, return_lse=True)
    ref, ref_lse = reference(q, k, v, kv_len=70)
    assert rel_l2(out, ref) <= 2e-2
    assert (lse.double() - ref_lse).abs().max().item() <= 5e-2


def test_fp8_quantised_precision_runs():
    # The interpreter's float8 casts round less carefully than the GPU (measured ~0.11 here vs ~0.05 on H100):
    # only a coarse bound on CPU; bench/attention_bench.py checks the GPU numbers.
    q, k, v = make_qkv(1, 1, 40, 70, 80, dtype=torch.bfloat16)
    out, lse = flash_attention_fp8(q, k, v, return_lse=True)
    ref, ref_lse = reference(q, k, v)
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) <= 0.2
    assert (lse.double() - ref_lse).abs().max().item() <= 0.2


def test_custom_op_traces_under_torch_compile():
    q, k, v = make_qkv(1, 1, 20, 20, 16)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def attend(q, k, v):
        return flash_attention(q, k, v, kv_len=15) * 2.0

    assert rel_l2(attend(q, k, v), reference(q, k, v, kv_len=15)[0] * 2.0) <= 1e-5


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda q, k, v: (q[0], k, v), "4-D"),
        (lambda q, k, v: (q, k.double(), v), "share a dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "not supported"),
        (lambda q, k, v: (q, k[:, :1], v), "batch and heads"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "same sequence length"),
        (lambda q, k, v: (q, k[..., :8], v), "same head_dim"),
        (lambda q, k, v: (q.new_zeros(1, 2, 4, 300),) * 3, "head_dim must be in"),
        (lambda q, k, v: (q[:, :, :0], k, v), "empty sequence"),
    ],
)
def test_bad_inputs_raise_value_error(make_args, message):
    q, k, v = make_qkv(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention(*make_args(q, k, v))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_len=-1), "kv_len"),
        (dict(kv_len=torch.tensor([3, 4])), "kv_len tensor"),
        (dict(kv_len=torch.tensor([3.0])), "kv_len tensor"),
        (dict(precision="fp4"), "precision"),
        (dict(softmax_scale="x"), "softmax_scale"),
        (dict(out=torch.empty(1)), "out must be"),
    ],
)
def test_bad_options_raise_value_error(kwargs, message):
    q, k, v = make_qkv(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attention(q, k, v)


def _sibling_imports(path: Path) -> set[str]:
    """The modules of the kernels package that ``path`` imports, at module level or inside functions."""
    package = "smart_diffusion_backend.kernels"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: "from .common import x" or "from . import common"
                names = [module] if module else [alias.name for alias in node.names]
            elif module == package:
                names = [alias.name for alias in node.names]
            elif module.startswith(package + "."):
                names = [module[len(package) + 1:]]
            else:
                names = []
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name[len(package) + 1:].split(".")[0] for alias in node.names
                         if alias.name.startswith(package + "."))
    return found


def test_kernel_modules_import_one_way():
    # common is a leaf, each kernel imports only common, and the dispatcher (attention) imports the kernels:
    # no module of the package imports a sibling otherwise, not even inside a function
    expected = {
        "common": set(),
        "flash_attention": {"common"},
        "hopper_attention": {"common"},
        "rowwise_fp8": {"common"},
        "attention": {"common", "flash_attention", "hopper_attention"},
        "__init__": {"attention"},
    }
    directory = Path(kernels_package.__file__).parent
    actual = {path.stem: _sibling_imports(path) for path in sorted(directory.glob("*.py"))}
    assert actual == expected
