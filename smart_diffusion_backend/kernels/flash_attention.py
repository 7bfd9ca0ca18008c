"""Flash attention forward in Triton-lang: bf16/fp16 (float32 for the CPU interpreter) and an FP8 variant.

Layout and contract (the same as ``torch.nn.functional.scaled_dot_product_attention``, non-causal)::

    q: [batch, heads, seq_q, head_dim]      k, v: [batch, heads, seq_kv, head_dim]
    out = softmax(q @ k^T * softmax_scale) @ v            -> [batch, heads, seq_q, head_dim], q's dtype
    lse = logsumexp(q @ k^T * softmax_scale, dim=-1)      -> [batch, heads, seq_q], float32, natural log

* Any sequence length: the key loop runs unmasked over whole ``BLOCK_N`` blocks and masks only the last,
  partial block; query rows past ``seq_q`` are masked at load and store. DiT lengths (4,608 = 4,096 image +
  512 text, 32,760, 75,600) are not multiples of any block size.
* ``head_dim`` up to 256; a non-power-of-two head_dim is padded to the next power of two with masks.
* ``kv_len`` masks padded keys (sequence-parallel padding): keys at positions ``>= kv_len`` are ignored.
  It is either an ``int`` (the same for every batch element) or an integer tensor of shape ``[batch]`` on
  q's device (one length per batch element). Values are clamped to ``[0, seq_kv]``. A row that sees no
  key at all (``kv_len == 0``) gets output 0 and lse ``-inf``, which is what ring attention's LSE merge wants.
* The kernel module reads ``TRITON_INTERPRET`` when a kernel is first launched (not at import), so CPU
  tests can set it after triton was imported elsewhere; interpreted launches use one small config.
* On Hopper (sm_90), bf16/fp16 calls with head_dim 64 or 128 and an int (or no) ``kv_len`` run the Gluon
  kernel of hopper_attention.py (FA3's warp-specialised structure, cuDNN's speed or better); the Triton-lang
  kernel here runs everything else (other GPUs, other head dims, per-batch ``kv_len``, float32, FP8).
  ``precision="int8"`` takes the same Gluon kernel with int8 Q·Kᵀ under the same conditions.
* Under ``torch.compile`` the launch goes through the custom op ``smart_diffusion::flash_attention`` so the
  compiler treats the kernel as opaque (no graph break); eager calls skip that dispatch overhead.

FP8 (``precision="fp8"``, Hopper only), SageAttention-style:
  K is smoothed by subtracting its mean over the sequence (exact: it shifts each row of q·kᵀ by a constant);
  Q (pre-multiplied by softmax_scale·log2 e) and K are quantised to float8 e4m3 with one scale per
  ``_QUANT_BLOCK`` rows; V is quantised per channel and stored transposed (Hopper fp8 MMA wants the
  reduction dim contiguous); P is scaled by 448 to use e4m3's range. All accumulation is float32.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention", "flash_attention_fp8", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FP8_MAX = 448.0  # largest finite float8 e4m3fn
_QUANT_BLOCK = 64  # rows per Q/K quantisation scale; the attention tiles need not match it


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# ----------------------------------------------------------------------------------------------------------
# Kernels. Plain functions wrapped with triton.jit lazily (see _build_kernels) so that TRITON_INTERPRET is
# read at the first launch, not at import time. triton.language's own @jit helpers (tl.max, tl.sum,
# tl.zeros) are frozen as compiled-mode functions when triton is imported before the flag is set, and the
# interpreter cannot call those; so the kernels use only builtins: tl.full, and tl.reduce with the standard
# combine functions, which the interpreter maps to numpy and the compiler treats exactly like tl.max/tl.sum.
# ----------------------------------------------------------------------------------------------------------
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine

def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KvLen,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_kv, kv_len_all, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_LEN_PER_BATCH: tl.constexpr, RETURN_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # UPCAST: the CPU interpreter multiplies bfloat16 tiles as raw integers; it computes in float32 instead.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    if KV_LEN_PER_BATCH:
        kv_end = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), seq_kv)
    else:
        kv_end = kv_len_all

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # m_i is the running row max in log2 units (scores already multiplied by softmax_scale * log2 e).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # 1. Whole key blocks: no sequence mask in the hot loop.
    full_end = (kv_end // BLOCK_N) * BLOCK_N
    for _start_n in range(0, full_end, BLOCK_N):
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        if BLOCK_D == HEAD_DIM:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    # 2. The partial last block, masked. It holds at least one valid key, so every row max stays finite.
    if full_end < kv_end:
        mask_n = (full_end + offs_n) < kv_end
        k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_ij

    # 3. Epilogue. l_i == 0 only when kv_end == 0: output 0, lse -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # log2 -> natural log; -inf when empty
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=mask_m)


def _attn_fwd_quant_kernel(
    Q8, QScale, K8, KScale, V, VScale, Out, Lse, KvLen,
    seq_q_pad, seq_kv_pad,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_kv, kv_len_all,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_BLOCK: tl.constexpr,
    KV_LEN_PER_BATCH: tl.constexpr, RETURN_LSE: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Q8: [B*H, seq_q_pad, BLOCK_D] int8/e4m3, scaled by softmax_scale*log2e first; QScale [B*H, seq_q_pad/QB]
    # K8: [B*H, seq_kv_pad, BLOCK_D] int8/e4m3, mean-smoothed; KScale [B*H, seq_kv_pad/QB]
    # V: PV_FP8 -> [B*H, BLOCK_D, seq_kv_pad] e4m3 (transposed, per-channel VScale [B*H, BLOCK_D]);
    #    else the caller's v [B,H,S,D] in its own dtype, read through its strides.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    if KV_LEN_PER_BATCH:
        kv_end = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), seq_kv)
    else:
        kv_end = kv_len_all

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    # Quantised buffers are padded (rows to 128, head_dim to BLOCK_D) and zero-filled: no load masks.
    q = tl.load(Q8 + bh * seq_q_pad * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(QScale + bh * (seq_q_pad // QUANT_BLOCK) + offs_m // QUANT_BLOCK)
    k_ptrs = K8 + bh * seq_kv_pad * BLOCK_D + offs_n[:, None] * BLOCK_D + offs_d[None, :]
    ks_ptrs = KScale + bh * (seq_kv_pad // QUANT_BLOCK) + offs_n // QUANT_BLOCK
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # 1. Whole key blocks, unmasked.
    full_end = (kv_end // BLOCK_N) * BLOCK_N
    for _start_n in range(0, full_end, BLOCK_N):
        k = tl.load(k_ptrs)
        k_scale = tl.load(ks_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        if QK_INT8:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * (q_scale[:, None] * k_scale[None, :])  # already in log2 units
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        if PV_FP8:
            v = tl.load(v_ptrs)  # padded buffer
            if UPCAST:
                acc = tl.dot((p * 448.0).to(tl.float8e4nv).to(tl.float32), v.to(tl.float32), acc)
            else:
                acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)  # P <= 1: use e4m3's range up to 448
        else:
            if BLOCK_D == HEAD_DIM:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
        k_ptrs += BLOCK_N * BLOCK_D
        ks_ptrs += BLOCK_N // QUANT_BLOCK
        v_ptrs += BLOCK_N * stride_vn

    # 2. The partial last block (padded buffers: loads in bounds; scores masked).
    if full_end < kv_end:
        mask_n = (full_end + offs_n) < kv_end
        k = tl.load(k_ptrs)
        k_scale = tl.load(ks_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        if QK_INT8:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(mask_n[None, :], qk * (q_scale[:, None] * k_scale[None, :]), float("-inf"))
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        if PV_FP8:
            v = tl.load(v_ptrs)
            if UPCAST:
                acc = tl.dot((p * 448.0).to(tl.float8e4nv).to(tl.float32), v.to(tl.float32), acc)
            else:
                acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
        else:
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if PV_FP8:
        v_scale = tl.load(VScale + bh * BLOCK_D + offs_d) / 448.0
        out = acc * v_scale[None, :] / l_safe[:, None]
    else:
        out = acc / l_safe[:, None]
    mask_m = offs_m < seq_q
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(Lse + bh * seq_q + offs_m, lse, mask=mask_m)


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
    amax = tl.reduce(tl.reduce(tl.abs(x), 1, _MAX_COMBINE), 0, _MAX_COMBINE)
    if TO_INT8:
        scale = tl.maximum(amax / 127.0, 1e-12)
        y = x / scale
        x8 = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero; |y| <= 127
    else:
        scale = tl.maximum(amax / 448.0, 1e-12)
        x8 = (x / scale).to(tl.float8e4nv)
    tl.store(X8 + bh * seq_pad * BLOCK_D + offs_s[:, None] * BLOCK_D + offs_d[None, :], x8)
    tl.store(Scale + bh * (seq_pad // QUANT_BLOCK) + pid_s, scale)


def _quantize_v_transposed_kernel(
    V, VScale, V8T,
    stride_vb, stride_vh, stride_vs, stride_vd,
    num_heads, seq, seq_pad,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # V [B,H,S,D] -> V8T [B*H, BLOCK_D, seq_pad] e4m3, per-channel scale. Transposed because Hopper's fp8 MMA
    # needs the reduction (sequence) dim contiguous for its B operand.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s[:, None] < seq) & (offs_d[None, :] < HEAD_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=mask, other=0.0)
    v_scale = tl.load(VScale + bh * BLOCK_D + offs_d)
    tl.store(V8T + bh * BLOCK_D * seq_pad + offs_d[None, :] * seq_pad + offs_s[:, None],
             (v.to(tl.float32) / v_scale[None, :]).to(tl.float8e4nv))


# ----------------------------------------------------------------------------------------------------------
# Configs and lazy kernel construction
# ----------------------------------------------------------------------------------------------------------
def _hopper_configs() -> list[triton.Config]:
    # Hopper (wgmma, 228 KB smem): 128-row query tiles with 8 warps (two warpgroups), 2-3 pipeline stages.
    configs = []
    for block_m, block_n, warps, stages in [
        (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return configs


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if block_d is None:
        return configs
    if block_d > 128:  # 256-wide tiles: registers and smem allow only small query/key blocks
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return kept or configs[-1:]


def _interpreter_configs() -> list[triton.Config]:
    # One small config: the CPU interpreter must not benchmark several.
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


_KERNEL_CACHE: dict[bool, dict[str, Callable]] = {}


def _build_kernels(interpret: bool) -> dict[str, Callable]:
    kernels = _KERNEL_CACHE.get(interpret)
    if kernels is not None:
        return kernels
    if interpret:
        attn_configs = _interpreter_configs()
        prune = None
        quant_configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    else:
        attn_configs = _hopper_configs()
        prune = {"early_config_prune": _prune_configs}
        quant_configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3)]
        ]
    kernels = {
        "attn": triton.autotune(attn_configs, key=["seq_q", "seq_kv", "HEAD_DIM", "BLOCK_D", "RETURN_LSE"],
                                prune_configs_by=prune)(triton.jit(_attn_fwd_kernel)),
        "attn_quant": triton.autotune(quant_configs, key=["seq_q", "seq_kv", "HEAD_DIM", "BLOCK_D", "QK_INT8",
                                                          "PV_FP8", "RETURN_LSE"])(triton.jit(_attn_fwd_quant_kernel)),
        "quant_rows": triton.jit(_quantize_rows_kernel),
        "quant_v": triton.jit(_quantize_v_transposed_kernel),
    }
    _KERNEL_CACHE[interpret] = kernels
    return kernels


# ----------------------------------------------------------------------------------------------------------
# Host side: checks, then launch
# ----------------------------------------------------------------------------------------------------------
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


def _kv_len_args(kv_len, seq_kv: int, device: torch.device) -> tuple[torch.Tensor | None, int, bool]:
    """(per-batch tensor or None, scalar length, per-batch flag) for the kernel."""
    if isinstance(kv_len, torch.Tensor):
        return kv_len, seq_kv, True
    return None, seq_kv if kv_len is None else min(int(kv_len), seq_kv), False


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16 and a power of two


def _launch_bf16(q, k, v, softmax_scale: float, kv_len, return_lse: bool,
                 out: torch.Tensor | None = None, allow_hopper: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    interpret = _interpreting()
    if allow_hopper and not interpret:
        # Imported here: Gluon is only needed (and only compiled) on a GPU.
        from smart_diffusion_backend.kernels.hopper_attention import hopper_attention, hopper_supports

        if hopper_supports(q, k, v, kv_len):
            return hopper_attention(q, k, v, softmax_scale, kv_len, return_lse, out)
    kernels = _build_kernels(interpret)
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    if out is None:
        out = torch.empty_like(q)  # keeps q's strides (e.g. a [B,S,H,D] view) so callers avoid a copy
    lse = torch.empty((batch, heads, seq_q if return_lse else 0), device=q.device, dtype=torch.float32)
    kv_len_tensor, kv_len_all, per_batch = _kv_len_args(kv_len, seq_kv, q.device)

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    kernels["attn"][grid](
        q, k, v, out, lse, kv_len_tensor if per_batch else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, seq_kv, kv_len_all, softmax_scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_padded_head_dim(head_dim),
        KV_LEN_PER_BATCH=per_batch, RETURN_LSE=return_lse,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret and q.dtype == torch.bfloat16,
    )
    return out, lse


def _launch_quantized(q, k, v, softmax_scale: float, kv_len, return_lse: bool, precision: str,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """precision "int8": int8 Q/K, P·V in q's dtype (SageAttention 1); "fp8": e4m3 Q/K and e4m3 P·V."""
    interpret = _interpreting()
    if precision == "int8" and not interpret:
        from smart_diffusion_backend.kernels.hopper_attention import hopper_int8_attention, hopper_supports

        if hopper_supports(q, k, v, kv_len):  # the same quantisation, in the Hopper kernel's structure
            return hopper_int8_attention(q, k, v, softmax_scale, kv_len, return_lse, out)
    kernels = _build_kernels(interpret)
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    block_d = _padded_head_dim(head_dim)
    qb = _QUANT_BLOCK
    qk_int8 = precision == "int8"
    pv_fp8 = precision == "fp8"
    dev = q.device
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(q, k, softmax_scale, kv_len, int8=qk_int8)
    seq_q_pad, seq_kv_pad = q8.shape[1], k8.shape[1]

    v_scale = torch.ones((batch * heads, block_d), device=dev, dtype=torch.float32)
    if pv_fp8:
        v_scale[:, :head_dim] = (v.abs().amax(dim=2).float() / _FP8_MAX).clamp_min(1e-12).reshape(-1, head_dim)
        v_arg = torch.zeros((batch * heads, block_d, seq_kv_pad), device=dev, dtype=torch.float8_e4m3fn)
        kernels["quant_v"][(triton.cdiv(seq_kv, 64), batch * heads)](
            v, v_scale, v_arg, *v.stride(), heads, seq_kv, seq_kv_pad,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=64)
        v_strides = (heads * block_d * seq_kv_pad, block_d * seq_kv_pad, 1, seq_kv_pad)
    else:
        v_arg, v_strides = v, v.stride()

    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_q if return_lse else 0), device=dev, dtype=torch.float32)
    kv_len_tensor, kv_len_all, per_batch = _kv_len_args(kv_len, seq_kv, dev)

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    kernels["attn_quant"][grid](
        q8, q_scale, k8, k_scale, v_arg, v_scale, out, lse, kv_len_tensor if per_batch else lse,
        seq_q_pad, seq_kv_pad, *v_strides, *out.stride(), heads, seq_q, seq_kv, kv_len_all,
        HEAD_DIM=head_dim, BLOCK_D=block_d, QUANT_BLOCK=qb,
        KV_LEN_PER_BATCH=per_batch, RETURN_LSE=return_lse, QK_INT8=qk_int8, PV_FP8=pv_fp8,
        UPCAST=interpret,
    )
    if return_lse:
        # Smoothing shifted every score of a row by q·mean·scale; add it back so lse is the true one.
        lse = lse + torch.einsum("bhsd,bhd->bhs", q.float(), k_mean) * softmax_scale
    return out, lse


def quantize_qk(q: torch.Tensor, k: torch.Tensor, softmax_scale: float, kv_len, *, int8: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q and K quantised SageAttention-style, for the quantised kernels: ``(q8, q_scale, k8, k_scale, k_mean)``.

    K is smoothed by its mean over the valid keys (``k_mean``, [B,H,D] float32: exact for softmax, it shifts a
    row's scores by a constant); Q carries ``softmax_scale * log2 e`` so scores come out in log2 units. One
    float32 scale per ``_QUANT_BLOCK`` rows. q8/k8 are contiguous ``[B*H, S_pad, D_pad]`` (int8 or float8 e4m3),
    rows padded with zeros to a multiple of 128 and head_dim to a power of two; scales ``[B*H, S_pad/64]``."""
    kernels = _build_kernels(_interpreting())
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    block_d = _padded_head_dim(head_dim)
    qb = _QUANT_BLOCK
    # Padded to 128 rows so the attention tiles (<= 128) never read past them.
    seq_q_pad = triton.cdiv(seq_q, 128) * 128
    seq_kv_pad = triton.cdiv(seq_kv, 128) * 128
    dev = q.device
    qk_dtype = torch.int8 if int8 else torch.float8_e4m3fn

    k_mean = _key_mean(k, kv_len)  # [B,H,D] float32
    k_mean_pad = torch.zeros((batch * heads, block_d), device=dev, dtype=torch.float32)
    k_mean_pad[:, :head_dim] = k_mean.reshape(batch * heads, head_dim)

    q8 = torch.zeros((batch * heads, seq_q_pad, block_d), device=dev, dtype=qk_dtype)
    k8 = torch.zeros((batch * heads, seq_kv_pad, block_d), device=dev, dtype=qk_dtype)
    q_scale = torch.ones((batch * heads, seq_q_pad // qb), device=dev, dtype=torch.float32)
    k_scale = torch.ones((batch * heads, seq_kv_pad // qb), device=dev, dtype=torch.float32)
    kernels["quant_rows"][(triton.cdiv(seq_q, qb), batch * heads)](
        q, k_mean_pad, q8, q_scale, *q.stride(), heads, seq_q, seq_q_pad, softmax_scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, QUANT_BLOCK=qb, SUBTRACT_MEAN=False, TO_INT8=int8)
    kernels["quant_rows"][(triton.cdiv(seq_kv, qb), batch * heads)](
        k, k_mean_pad, k8, k_scale, *k.stride(), heads, seq_kv, seq_kv_pad, 1.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, QUANT_BLOCK=qb, SUBTRACT_MEAN=True, TO_INT8=int8)
    return q8, q_scale, k8, k_scale, k_mean


def _key_mean(k: torch.Tensor, kv_len) -> torch.Tensor:
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


def _default_scale(head_dim: int, softmax_scale: float | None) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise ValueError(f"flash_attention: softmax_scale must be a float or None, got {softmax_scale!r}")
    return float(softmax_scale)


# torch.compile sees the kernel through this op (opaque to dynamo); eager calls bypass it.
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


_PRECISIONS = ("bf16", "int8", "fp8")


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
    interpret = _interpreting()
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
