"""Attention forward, ``flash_attention``: validates a call and sends it to the kernel that fits it.

Layout and contract (the same as ``torch.nn.functional.scaled_dot_product_attention``, non-causal)::

    q: [batch, heads, seq_q, head_dim]      k, v: [batch, heads, seq_kv, head_dim]
    out = softmax(q @ k^T * softmax_scale) @ v            -> [batch, heads, seq_q, head_dim], q's dtype
    lse = logsumexp(q @ k^T * softmax_scale, dim=-1)      -> [batch, heads, seq_q], float32, natural log

* Any sequence length and any strides; the output keeps q's strides. ``head_dim`` up to 256.
* ``kv_len`` masks padded keys (sequence-parallel padding): keys at positions ``>= kv_len`` are ignored.
  It is either an ``int`` (the same for every batch element) or an integer tensor of shape ``[batch]`` on
  q's device (one length per batch element). Values are clamped to ``[0, seq_kv]``. A row that sees no
  key at all (``kv_len == 0``) gets output 0 and lse ``-inf``, which is what ring attention's LSE merge wants.
* ``TRITON_INTERPRET`` is read at each call (not at import), so CPU tests can set it after triton was imported.

Which kernel runs:
* ``hopper_attention.py`` (Gluon, FA3's warp-specialised structure) where ``hopper_supports`` accepts the call:
  an sm_90 GPU, bf16/fp16, head_dim 64 or 128, an int (or no) ``kv_len``. ``precision="int8"`` takes the same
  kernel with int8 Q·Kᵀ under the same conditions.
* ``flash_attention.py`` (portable Triton-lang) everything else: other GPUs, other head dims, per-batch
  ``kv_len``, float32, the CPU interpreter and ``precision="fp8"``.
Under ``torch.compile`` the launch goes through the custom op ``smart_diffusion::flash_attention`` so the
compiler treats the kernels as opaque (no graph break); eager calls skip that dispatch overhead.
"""

from __future__ import annotations

import math

import torch

from smart_diffusion_backend.kernels.common import interpreting
from smart_diffusion_backend.kernels.flash_attention import portable_attention, portable_quantized_attention
from smart_diffusion_backend.kernels.hopper_attention import hopper_attention, hopper_int8_attention, hopper_supports

__all__ = ["flash_attention", "flash_attention_fp8", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_PRECISIONS = ("bf16", "int8", "fp8")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len, interpret: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if interpret and q.device.type != "cpu":
        raise ValueError("flash_attention: TRITON_INTERPRET=1 runs on CPU tensors only, got device "
                         f"{q.device}")
    if not interpret and q.device.type != "cuda":
        raise ValueError(f"flash_attention: needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 to run "
                         "the kernel on CPU in the Triton interpreter")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[1] != heads or v.shape[1] != heads:
        raise ValueError(f"flash_attention: batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"flash_attention: k and v need the same sequence length, got {k.shape[2]} and "
                         f"{v.shape[2]}")
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError(f"flash_attention: q, k, v need the same head_dim, got {head_dim}, {k.shape[3]}, "
                         f"{v.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_attention: empty sequence: seq_q={q.shape[2]}, seq_kv={k.shape[2]}")
    if isinstance(kv_len, torch.Tensor):
        if kv_len.shape != (batch,) or kv_len.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"flash_attention: kv_len tensor must be int32/int64 of shape [{batch}], got "
                             f"{kv_len.dtype} {tuple(kv_len.shape)}")
        if kv_len.device != q.device:
            raise ValueError(f"flash_attention: kv_len must be on {q.device}, got {kv_len.device}")
    elif kv_len is not None and (isinstance(kv_len, bool) or not isinstance(kv_len, int) or kv_len < 0):
        raise ValueError(f"flash_attention: kv_len must be None, an int >= 0 or an int tensor [batch], got {kv_len!r}")


def _launch_bf16(q, k, v, softmax_scale: float, kv_len, return_lse: bool,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not interpreting() and hopper_supports(q, k, v, kv_len):
        return hopper_attention(q, k, v, softmax_scale, kv_len, return_lse, out)
    return portable_attention(q, k, v, softmax_scale, kv_len, return_lse, out)


def _launch_quantized(q, k, v, softmax_scale: float, kv_len, return_lse: bool, precision: str,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # int8 on Hopper: the same quantisation (common.quantize_qk), in the Hopper kernel's structure
    if precision == "int8" and not interpreting() and hopper_supports(q, k, v, kv_len):
        return hopper_int8_attention(q, k, v, softmax_scale, kv_len, return_lse, out)
    return portable_quantized_attention(q, k, v, softmax_scale, kv_len, return_lse, precision, out)


def _default_scale(head_dim: int, softmax_scale: float | None) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise ValueError(f"flash_attention: softmax_scale must be a float or None, got {softmax_scale!r}")
    return float(softmax_scale)


# torch.compile sees the kernels through this op (opaque to dynamo); eager calls bypass it.
@torch.library.custom_op("smart_diffusion::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                        kv_len_tensor: torch.Tensor | None, kv_len_int: int, return_lse: bool,
                        precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    kv_len = kv_len_tensor if kv_len_tensor is not None else (None if kv_len_int < 0 else kv_len_int)
    if precision != "bf16":
        return _launch_quantized(q, k, v, softmax_scale, kv_len, return_lse, precision)
    return _launch_bf16(q, k, v, softmax_scale, kv_len, return_lse)


@_flash_attention_op.register_fake
def _(q, k, v, softmax_scale, kv_len_tensor, kv_len_int, return_lse, precision):
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2] if return_lse else 0), dtype=torch.float32)
    return out, lse


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_len: int | torch.Tensor | None = None,
    return_lse: bool = False,
    precision: str = "bf16",
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention forward, ``[batch, heads, seq, head_dim]`` in and out (see the module docstring).

    Args:
        q, k, v: float16/bfloat16 CUDA tensors (float32 too; on CPU only under ``TRITON_INTERPRET=1``).
        softmax_scale: multiplies q·kᵀ; default ``1/sqrt(head_dim)``.
        kv_len: keys at positions ``>= kv_len`` are ignored; ``int`` or int tensor ``[batch]``.
        return_lse: also return the float32 natural-log log-sum-exp per query row, ``[batch, heads, seq_q]``.
        precision: ``"bf16"`` (inputs' own dtype, the default),
            ``"int8"`` (SageAttention-1 style: int8 Q/K, P·V in the inputs' dtype) or ``"fp8"`` (Q/K and P·V in
            float8 e4m3, the fastest, least accurate). Quantised modes need a Hopper GPU for speed.
        out: optional preallocated output, q's shape and dtype, any strides (eager calls only).

    Returns:
        ``out`` or ``(out, lse)``.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"flash_attention: precision must be one of {_PRECISIONS}, got {precision!r}")
    interpret = interpreting()
    _check_inputs(q, k, v, kv_len, interpret)
    if precision != "bf16" and q.dtype not in (torch.float16, torch.bfloat16) and not interpret:
        raise ValueError(f"flash_attention: precision={precision!r} needs float16/bfloat16 inputs, got {q.dtype}")
    scale = _default_scale(q.shape[-1], softmax_scale)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"flash_attention: out must be a tensor like q {tuple(q.shape)} {q.dtype} on {q.device}")
    if torch.compiler.is_compiling():
        if out is not None:
            raise ValueError("flash_attention: out= is not supported under torch.compile")
        kv_len_tensor = kv_len if isinstance(kv_len, torch.Tensor) else None
        kv_len_int = -1 if kv_len is None or kv_len_tensor is not None else int(kv_len)
        out, lse = _flash_attention_op(q, k, v, scale, kv_len_tensor, kv_len_int, return_lse, precision)
    elif precision == "bf16":
        out, lse = _launch_bf16(q, k, v, scale, kv_len, return_lse, out)
    else:
        out, lse = _launch_quantized(q, k, v, scale, kv_len, return_lse, precision, out)
    return (out, lse) if return_lse else out


def flash_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_len: int | torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``flash_attention(..., precision="fp8")`` with the backend-callable signature."""
    return flash_attention(q, k, v, softmax_scale=softmax_scale, kv_len=kv_len, return_lse=return_lse,
                           precision="fp8")
