"""What the kernel modules share: interpreter detection, per-mode ``triton.jit``, the reduction combine functions
the interpreter can run, head-dim padding, and the SageAttention-style Q/K quantisation that both attention
kernels (portable int8/fp8, Hopper int8) take as input.

This module is a leaf: it imports nothing from the rest of the package. The kernel modules import it, and only
it; ``attention.py`` (the dispatcher) imports the kernel modules.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = ["FP8_MAX", "LOG2E", "MAX_COMBINE", "QUANT_BLOCK", "SUM_COMBINE", "interpreting", "jit_for_mode",
           "key_mean", "padded_head_dim", "quantize_qk"]

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8 e4m3fn
QUANT_BLOCK = 64  # rows per Q/K quantisation scale; the attention tiles need not match it


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors). Read on every call, not at
    import, so CPU tests can set it after triton was imported elsewhere."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# ----------------------------------------------------------------------------------------------------------
# Kernels are plain functions wrapped with triton.jit at their first launch (jit_for_mode), because triton.jit
# picks the compiler or the interpreter from TRITON_INTERPRET when it wraps a function. For the same reason they
# avoid triton.language's own @jit helpers (tl.max, tl.sum, tl.zeros): those are frozen as compiled-mode
# functions when triton is imported before the flag is set, and the interpreter cannot call them. Kernels use
# builtins only: tl.full, and tl.reduce with the standard combine functions below, which the interpreter maps
# to numpy and the compiler treats exactly like tl.max / tl.sum.
# ----------------------------------------------------------------------------------------------------------
MAX_COMBINE = tl.standard._elementwise_max
SUM_COMBINE = tl.standard._sum_combine

_JITTED: dict[tuple[Callable, bool], Callable] = {}


def jit_for_mode(fn: Callable, interpret: bool) -> Callable:
    """``triton.jit(fn)``, built once per mode (compiled or interpreted) at the first call for that mode."""
    key = (fn, interpret)
    kernel = _JITTED.get(key)
    if kernel is None:
        kernel = _JITTED[key] = triton.jit(fn)
    return kernel


def padded_head_dim(head_dim: int) -> int:
    """The head_dim a tile is built with: ``tl.dot`` needs a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------------------
# Q/K quantisation (SageAttention 1) for the quantised attention kernels
# ----------------------------------------------------------------------------------------------------------
def _quantize_rows_kernel(
    X, Mean, X8, Scale,
    stride_xb, stride_xh, stride_xs, stride_xd,
    num_heads, seq, seq_pad, multiplier,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT_BLOCK: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
    TO_INT8: tl.constexpr,
):
    # One program per (QUANT_BLOCK rows, batch*head): x8 = (x - mean) * multiplier / scale, one scale per block.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_s = pid_s * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s[:, None] < seq) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(Mean + bh * BLOCK_D + offs_d)
        x = tl.where(mask, x - mean[None, :], 0.0)
    x = x * multiplier
    amax = tl.reduce(tl.reduce(tl.abs(x), 1, MAX_COMBINE), 0, MAX_COMBINE)
    if TO_INT8:
        scale = tl.maximum(amax / 127.0, 1e-12)
        y = x / scale
        x8 = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero; |y| <= 127
    else:
        scale = tl.maximum(amax / 448.0, 1e-12)
        x8 = (x / scale).to(tl.float8e4nv)
    tl.store(X8 + bh * seq_pad * BLOCK_D + offs_s[:, None] * BLOCK_D + offs_d[None, :], x8)
    tl.store(Scale + bh * (seq_pad // QUANT_BLOCK) + pid_s, scale)


def quantize_qk(q: torch.Tensor, k: torch.Tensor, softmax_scale: float, kv_len, *, int8: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q and K quantised SageAttention-style, for the quantised kernels: ``(q8, q_scale, k8, k_scale, k_mean)``.

    K is smoothed by its mean over the valid keys (``k_mean``, [B,H,D] float32: exact for softmax, it shifts a
    row's scores by a constant); Q carries ``softmax_scale * log2 e`` so scores come out in log2 units. One
    float32 scale per ``QUANT_BLOCK`` rows. q8/k8 are contiguous ``[B*H, S_pad, D_pad]`` (int8 or float8 e4m3),
    rows padded with zeros to a multiple of 128 and head_dim to a power of two; scales ``[B*H, S_pad/64]``."""
    kernel = jit_for_mode(_quantize_rows_kernel, interpreting())
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    block_d = padded_head_dim(head_dim)
    qb = QUANT_BLOCK
    # Padded to 128 rows so the attention tiles (<= 128) never read past them.
    seq_q_pad = triton.cdiv(seq_q, 128) * 128
    seq_kv_pad = triton.cdiv(seq_kv, 128) * 128
    dev = q.device
    qk_dtype = torch.int8 if int8 else torch.float8_e4m3fn

    k_mean = key_mean(k, kv_len)  # [B,H,D] float32
    k_mean_pad = torch.zeros((batch * heads, block_d), device=dev, dtype=torch.float32)
    k_mean_pad[:, :head_dim] = k_mean.reshape(batch * heads, head_dim)

    q8 = torch.zeros((batch * heads, seq_q_pad, block_d), device=dev, dtype=qk_dtype)
    k8 = torch.zeros((batch * heads, seq_kv_pad, block_d), device=dev, dtype=qk_dtype)
    q_scale = torch.ones((batch * heads, seq_q_pad // qb), device=dev, dtype=torch.float32)
    k_scale = torch.ones((batch * heads, seq_kv_pad // qb), device=dev, dtype=torch.float32)
    kernel[(triton.cdiv(seq_q, qb), batch * heads)](
        q, k_mean_pad, q8, q_scale, *q.stride(), heads, seq_q, seq_q_pad, softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, QUANT_BLOCK=qb, SUBTRACT_MEAN=False, TO_INT8=int8)
    kernel[(triton.cdiv(seq_kv, qb), batch * heads)](
        k, k_mean_pad, k8, k_scale, *k.stride(), heads, seq_kv, seq_kv_pad, 1.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, QUANT_BLOCK=qb, SUBTRACT_MEAN=True, TO_INT8=int8)
    return q8, q_scale, k8, k_scale, k_mean


def key_mean(k: torch.Tensor, kv_len) -> torch.Tensor:
    """Mean of the valid keys over the sequence, [B,H,D]. Any constant works for exactness; the mean of
    valid keys minimises the quantisation range."""
    if kv_len is None:
        return k.float().mean(dim=2)
    seq_kv = k.shape[2]
    lengths = kv_len if isinstance(kv_len, torch.Tensor) else torch.tensor([kv_len] * k.shape[0], device=k.device)
    lengths = lengths.clamp(0, seq_kv)
    valid = (torch.arange(seq_kv, device=k.device)[None, :] < lengths[:, None]).to(torch.float32)  # [B,S]
    total = torch.einsum("bhsd,bs->bhd", k.float(), valid)
    return total / lengths.clamp_min(1).to(torch.float32)[:, None, None]
