"""Flash attention forward in Triton-lang, the portable kernel: bf16/fp16 (float32 for the CPU interpreter)
and the quantised variants (``precision`` "int8" and "fp8"). It runs on any GPU Triton supports and under the
CPU interpreter; ``attention.py`` sends each call here unless the Hopper kernel takes it.

The entry points take inputs ``attention.flash_attention`` has validated, in its layout::

    q: [batch, heads, seq_q, head_dim]      k, v: [batch, heads, seq_kv, head_dim]   (any strides)
    portable_attention(q, k, v, softmax_scale, kv_len, return_lse, out=None)                    -> (out, lse)
    portable_quantized_attention(q, k, v, softmax_scale, kv_len, return_lse, precision, out=None) -> (out, lse)

lse is empty unless ``return_lse``. kv_len is None, an int or an int tensor ``[batch]``.

* Any sequence length: the key loop runs unmasked over whole ``BLOCK_N`` blocks and masks only the last,
  partial block; query rows past ``seq_q`` are masked at load and store. DiT lengths (4,608 = 4,096 image +
  512 text, 32,760, 75,600) are not multiples of any block size.
* ``head_dim`` up to 256; a non-power-of-two head_dim is padded to the next power of two with masks.
* ``kv_len`` masks padded keys; a row that sees no key gets output 0 and lse ``-inf``.
* Kernels are jitted at their first launch, per mode (see common.py): interpreted launches use one small config.

Quantised, SageAttention-style (``common.quantize_qk``): K is smoothed by subtracting its mean over the sequence
(exact: it shifts each row of q·kᵀ by a constant); Q (pre-multiplied by softmax_scale·log2 e) and K are quantised
to int8 ("int8") or float8 e4m3 ("fp8") with one scale per ``QUANT_BLOCK`` rows. "int8" keeps P·V in the
inputs' dtype (SageAttention 1). "fp8" quantises V per channel and stores it transposed (Hopper's fp8 MMA wants
the reduction dim contiguous) and scales P by 448 to use e4m3's range. All accumulation is float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from smart_diffusion_backend.kernels.common import (
    FP8_MAX,
    LOG2E,
    MAX_COMBINE,
    QUANT_BLOCK,
    SUM_COMBINE,
    interpreting,
    padded_head_dim,
    quantize_qk,
)

__all__ = ["portable_attention", "portable_quantized_attention"]


# ----------------------------------------------------------------------------------------------------------
# Kernels: plain functions, jitted in _build_kernels (see common.py on TRITON_INTERPRET and tl.reduce).
# ----------------------------------------------------------------------------------------------------------
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
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, MAX_COMBINE) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
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
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
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
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
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
        m_ij = tl.maximum(m_i, tl.reduce(qk, 1, MAX_COMBINE))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
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
        "quant_v": triton.jit(_quantize_v_transposed_kernel),
    }
    _KERNEL_CACHE[interpret] = kernels
    return kernels


# ----------------------------------------------------------------------------------------------------------
# Host side: launch on validated inputs
# ----------------------------------------------------------------------------------------------------------
def _kv_len_args(kv_len, seq_kv: int, device: torch.device) -> tuple[torch.Tensor | None, int, bool]:
    """(per-batch tensor or None, scalar length, per-batch flag) for the kernel."""
    if isinstance(kv_len, torch.Tensor):
        return kv_len, seq_kv, True
    return None, seq_kv if kv_len is None else min(int(kv_len), seq_kv), False


def portable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_len,
                       return_lse: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16/fp16/float32 kernel on validated inputs; returns ``(out, lse)``, lse empty unless asked."""
    interpret = interpreting()
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
        heads, seq_q, seq_kv, kv_len_all, softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
        KV_LEN_PER_BATCH=per_batch, RETURN_LSE=return_lse,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret and q.dtype == torch.bfloat16,
    )
    return out, lse


def portable_quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_len,
                                 return_lse: bool, precision: str,
                                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """precision "int8": int8 Q/K, P·V in q's dtype (SageAttention 1); "fp8": e4m3 Q/K and e4m3 P·V."""
    interpret = interpreting()
    kernels = _build_kernels(interpret)
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    block_d = padded_head_dim(head_dim)
    qb = QUANT_BLOCK
    qk_int8 = precision == "int8"
    pv_fp8 = precision == "fp8"
    dev = q.device
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(q, k, softmax_scale, kv_len, int8=qk_int8)
    seq_q_pad, seq_kv_pad = q8.shape[1], k8.shape[1]

    v_scale = torch.ones((batch * heads, block_d), device=dev, dtype=torch.float32)
    if pv_fp8:
        v_scale[:, :head_dim] = (v.abs().amax(dim=2).float() / FP8_MAX).clamp_min(1e-12).reshape(-1, head_dim)
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
