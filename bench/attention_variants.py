"""Kernel structure experiments for the bf16 attention forward (issue 3): which Triton 3.6 structure beats
the library kernel on Hopper, measured against cuDNN in the same run.

Variants (all non-causal, [B, H, S, D] with any strides whose last dim is contiguous, odd lengths masked):
* ``lib``       the library kernel (smart_diffusion_backend.kernels.flash_attention), pointer loads.
* ``desc``      TMA tensor descriptors built on the device, one per (batch, head): the copy engine fetches
                K/V tiles and zero-fills past the sequence end.
* ``desc_ws``   ``desc`` with ``tl.range(..., warp_specialize=True)``: Triton's Hopper warp specialisation
                (a producer warp group issues the TMA loads; consumer groups run MMA + softmax).
* ``desc_swp``  ``desc`` with the loop software-pipelined by hand (FA3's intra-warpgroup overlap): the next
                block's Q·Kᵀ is issued before this block's softmax, so the tensor cores work during exp2.

Every (variant, config) is compiled on its own and checked against a float32 reference on an odd shape
(poisoned output) before it is timed; compile errors are listed, not fatal. Sizes as in attention_bench.

    python bench/attention_variants.py --out results.md       # GPU only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, qk_scale):
    # One online-softmax update in log2 units; returns p (float32), the new m, l and the rescaled acc.
    m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
    acc = acc * alpha[:, None]
    return p, m_ij, l_i, acc


@triton.jit
def _attn_fwd_desc(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, seq_q, seq_kv, kv_end, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, SOFTWARE_PIPELINE: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[seq_kv, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[seq_kv, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(Out + b * stride_ob + h * stride_oh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM])
    start_m = pid_m * BLOCK_M
    q = q_desc.load([start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    full_end = (kv_end // BLOCK_N) * BLOCK_N

    if SOFTWARE_PIPELINE:
        if full_end > 0:
            qk = tl.dot(q, k_desc.load([0, 0]).T)
            for start_n in range(0, full_end - BLOCK_N, BLOCK_N):
                qk_next = tl.dot(q, k_desc.load([start_n + BLOCK_N, 0]).T)  # in flight during the softmax
                p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
                v = v_desc.load([start_n, 0])
                acc = tl.dot(p.to(v.dtype), v, acc)
                qk = qk_next
            p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
            v = v_desc.load([full_end - BLOCK_N, 0])
            acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            qk = tl.dot(q, k_desc.load([start_n, 0]).T)
            p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
            v = v_desc.load([start_n, 0])
            acc = tl.dot(p.to(v.dtype), v, acc)

    if full_end < kv_end:  # the partial last block: scores of keys past kv_end masked
        offs_n = full_end + tl.arange(0, BLOCK_N)
        qk = tl.dot(q, k_desc.load([full_end, 0]).T)
        qk = tl.where(offs_n[None, :] < kv_end, qk, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
        v = v_desc.load([full_end, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_desc.store([start_m, 0], (acc / l_safe[:, None]).to(Out.dtype.element_ty))
    if RETURN_LSE:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


_ALLOCATOR_SET = False


def _set_allocator() -> None:
    # Device-side descriptors need a little global scratch per program.
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.int8)
        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


def desc_attention(q, k, v, *, variant: str, block_m: int, block_n: int, warps: int, stages: int,
                   kv_len: int | None = None, return_lse: bool = False, out: torch.Tensor | None = None):
    _set_allocator()
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_q if return_lse else 0), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _attn_fwd_desc[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, seq_q, seq_kv, seq_kv if kv_len is None else min(kv_len, seq_kv), (1.0 / math.sqrt(head_dim)) * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        WARP_SPECIALIZE=variant == "desc_ws", SOFTWARE_PIPELINE=variant == "desc_swp", RETURN_LSE=return_lse,
        num_warps=warps, num_stages=stages,
    )
    return (out, lse) if return_lse else out


CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages)
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 4, 2), (128, 64, 4, 3),
    (128, 128, 4, 3), (64, 128, 4, 2),
]
SIZES = [(4608, 24), (16384, 24), (32760, 40), (75600, 40)]


def reference(q, k, v, kv_len=None):
    qf, kf, vf = q.float(), k.float(), v.float()
    if kv_len is not None:
        kf, vf = kf[:, :, :kv_len], vf[:, :, :kv_len]
    return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(fn, device, dtype) -> tuple[float, bool]:
    """Worst rel-L2 over odd shapes (incl. a [B,S,H,D]-strided view and kv_len); NaN-poisoned outputs."""
    worst = 0.0
    for (b, h, s, skv, kv_len, strided) in [(1, 4, 1531, 1531, None, False), (2, 3, 1000, 1000, 900, True),
                                              (1, 8, 4608, 512, None, True), (1, 2, 77, 77, None, False)]:
        if strided:  # the processors' layout: [B, S, H, D] memory seen as [B, H, S, D]
            q = torch.randn(b, s, h, 128, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(b, skv, h, 128, device=device, dtype=dtype).transpose(1, 2)
            v = torch.randn(b, skv, h, 128, device=device, dtype=dtype).transpose(1, 2)
        else:
            q, k, v = (torch.randn(b, h, n, 128, device=device, dtype=dtype) for n in (s, skv, skv))
        out = torch.full_like(q, float("nan"))
        fn(q, k, v, kv_len=kv_len, out=out)
        err = rel_l2(out, reference(q, k, v, kv_len))
        worst = max(worst, err if err == err else float("inf"))
    bar = 1e-2 if dtype != torch.float32 else 1e-5
    return worst, worst <= bar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/attention-variants.md"))
    parser.add_argument("--variants", nargs="+", default=["desc", "desc_ws", "desc_swp"])
    parser.add_argument("--screen-size", type=int, default=16384)
    parser.add_argument("--top", type=int, default=2, help="configs per variant timed at every size")
    args = parser.parse_args()
    from triton.testing import do_bench
    from smart_diffusion_backend.kernels import flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    lines = [f"# Attention kernel structures (bench/attention_variants.py)", "",
             f"- card: {torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
             f"{time.strftime('%Y-%m-%d %H:%M')}", f"- command: `python {' '.join(sys.argv)}`", ""]
    records = []

    def timed(fn, s, h):
        q, k, v = (torch.randn(1, h, s, 128, device=dev, dtype=dtype) for _ in range(3))
        out = torch.empty_like(q)
        ms = do_bench(lambda: fn(q, k, v, out=out), warmup=25, rep=100 if s < 30000 else 400)
        return ms, 4 * h * s * s * 128 / ms / 1e9

    def cudnn(q, k, v, out=None, kv_len=None):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def lib(q, k, v, out=None, kv_len=None):
        return flash_attention(q, k, v, kv_len=kv_len, out=out)

    # 1. Screen: every (variant, config) checked, then timed at one size.
    screen = []
    s0, h0 = args.screen_size, 24
    for variant in args.variants:
        for cfg in CONFIGS:
            bm, bn, w, st = cfg
            fn = lambda q, k, v, out=None, kv_len=None, _v=variant, _c=cfg: desc_attention(
                q, k, v, variant=_v, block_m=_c[0], block_n=_c[1], warps=_c[2], stages=_c[3], kv_len=kv_len, out=out)
            t0 = time.time()
            try:
                err, ok = check(fn, dev, dtype)
                ms, tf = timed(fn, s0, h0) if ok else (float("nan"), float("nan"))
                rec = dict(variant=variant, cfg=cfg, rel_l2=err, ok=ok, ms=ms, tflops=tf, build_s=time.time() - t0)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
                rec = dict(variant=variant, cfg=cfg, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            print(json.dumps(rec), flush=True)
            screen.append(rec)
    base_ms, base_tf = timed(cudnn, s0, h0)
    lib_ms, lib_tf = timed(lib, s0, h0)
    lines += [f"## Screen at S={s0}, H={h0} (cuDNN {base_ms:.3f} ms = {base_tf:.0f} TFLOP/s; library kernel "
              f"{lib_ms:.3f} ms = {lib_tf:.0f})", "",
              "| variant | BLOCK_M, BLOCK_N, warps, stages | rel-L2 (worst odd shape) | ms | TFLOP/s | × cuDNN | note |",
              "|---|---|---|---|---|---|---|"]
    for r in screen:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['cfg']} | | | | | {r['error']} |")
        else:
            lines.append(f"| {r['variant']} | {r['cfg']} | {r['rel_l2']:.2e} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{base_ms / r['ms']:.3f} | {'' if r['ok'] else 'WRONG'} |")

    # 2. The best configs of each variant at every size, with cuDNN and the library kernel.
    lines += ["", "## Every size (B=1, d=128, bf16; median of do_bench)", "",
              "| S | H | impl | ms | TFLOP/s | × cuDNN |", "|---|---|---|---|---|---|"]
    finalists = []
    for variant in args.variants:
        good = sorted((r for r in screen if r.get("ok")), key=lambda r: r["ms"])
        finalists += [r for r in good if r["variant"] == variant][: args.top]
    for s, h in SIZES:
        c_ms, c_tf = timed(cudnn, s, h)
        rows = [("cudnn", c_ms, c_tf), ("lib",) + timed(lib, s, h)]
        for r in finalists:
            cfg = r["cfg"]
            fn = lambda q, k, v, out=None, kv_len=None, _v=r["variant"], _c=cfg: desc_attention(
                q, k, v, variant=_v, block_m=_c[0], block_n=_c[1], warps=_c[2], stages=_c[3], out=out)
            rows.append((f"{r['variant']} {cfg}",) + timed(fn, s, h))
        for name, ms, tf in rows:
            lines.append(f"| {s} | {h} | {name} | {ms:.3f} | {tf:.0f} | {c_ms / ms:.3f} |")
            records.append(dict(S=s, H=h, impl=name, ms=ms, tflops=tf, x_cudnn=c_ms / ms))
        print("\n".join(lines[-len(rows):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in screen + records) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
