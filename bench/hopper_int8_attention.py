"""Experiment (issue 3): SageAttention-1 precision (int8 Q.K^T, bf16 P.V, float32 softmax) in the Hopper
kernel's FA3 structure: the library kernel with ``QK_INT8=True``. Not routed by ``flash_attention`` yet: it
becomes the ``int8`` precision on sm_90 only if a GPU run shows it correct (rel-L2 <= 2e-2 against float32)
and faster than the bf16 Hopper kernel.

Why: int8 wgmma runs at twice bf16's rate, so Q.K^T, half of attention's tensor-core work, costs half. The
portable Triton-lang int8 kernel never gained from that (bench/results/attention-h100.md: the softmax ran
serialised with the wgmma). In the warp-specialised structure the softmax is hidden under the other warp
group's wgmma. The ceiling is 4/3 of the bf16 kernel, about 1.45x cuDNN on video lengths. That would take Wan
480p's self-attention from ~1.36 s to ~1.05 s and the compiled forward under the 2.4 s target
(transformer-step-wan480-h100.md).

Layout: Q and K are quantised by the library's ``quantize_qk`` (K smoothed by its mean, Q carrying
softmax_scale * log2 e, one scale per 64 rows) into contiguous ``[B*H, S_pad, D]`` int8 buffers. V stays bf16
and is read in place, in either layout ``hopper_attention.row_view`` accepts. A consumer partition owns 64
query rows, exactly one Q scale; each 128-key tile spans two K scales.

    python bench/hopper_int8_attention.py --compile-only   # ahead-of-time sm_90 compile + ptxas report (no GPU)
    python bench/hopper_int8_attention.py --out int8.md    # GPU: checks vs float32, then time vs cuDNN and bf16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smart_diffusion_backend.kernels.flash_attention import _QUANT_BLOCK, quantize_qk  # noqa: E402
from smart_diffusion_backend.kernels.hopper_attention import (  # noqa: E402
    BLOCK_M,
    compile_for_sm90,
    launch,
    readable,
)


def _launch(q8, q_scale, k8, k_scale, v, out, lse, kv_end: int, stages: int, return_lse: bool,
            persistent: bool = False) -> None:
    batch, heads = out.shape[:2]
    q8v, k8v = (t.view(batch, heads, t.shape[1], t.shape[2]) for t in (q8, k8))  # [B*H, S_pad, D] as heads outer
    launch([readable(q8v), readable(k8v), readable(v)], out, lse, kv_end=kv_end, qk_scale=1.0,
           return_lse=return_lse, persistent=persistent, stages=stages, qk_scales=(q_scale, k_scale))


def hopper_int8_attention(q, k, v, *, kv_len: int | None = None, return_lse: bool = False, stages: int = 2,
                          out: torch.Tensor | None = None):
    """int8 Q.K^T / bf16 P.V attention; bf16/fp16 ``[B, H, S, D]`` (either layout row_view reads), D 64/128."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128):
        raise ValueError(f"hopper_int8_attention: bf16/fp16 with head_dim 64 or 128, got {q.dtype}, {head_dim}")
    if _QUANT_BLOCK != 64 or BLOCK_M // 2 != 64:
        raise ValueError("the kernel assumes one 64-row Q scale per consumer partition")
    scale = 1.0 / math.sqrt(head_dim)
    kv_end = seq_kv if kv_len is None else min(int(kv_len), seq_kv)
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(q, k, scale, kv_len, int8=True)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_q if return_lse else 0), device=q.device, dtype=torch.float32)
    _launch(q8, q_scale, k8, k_scale, v, out, lse, kv_end, stages, return_lse)
    if return_lse:  # the kernel's lse is of the smoothed scores: add q.mean(k) back
        lse = lse + torch.einsum("bhsd,bhd->bhs", q.float(), k_mean) * scale
    return (out, lse) if return_lse else out


def compile_only(head_dim: int, stages: int) -> None:
    """Ahead-of-time compile for sm_90 on any machine: the kernel type-checks, lowers and assembles."""
    compiled = compile_for_sm90(head_dim, qk_int8=True, stages=stages)
    print(f"head_dim={head_dim} stages={stages}: {compiled['ptxas']}; shared {compiled['shared_bytes']} B, "
          f"int8 wgmma {compiled['int8_wgmma']} of {compiled['wgmma']}")


def measure(stages: int) -> list[str]:
    """Correctness on odd shapes (NaN-poisoned output) against float32, then time against cuDNN and the bf16
    Hopper kernel (the library's flash_attention on H100), quantisation included and kernel alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from attention_bench import reference, rel_l2  # the same float32 references as the library kernels' bench

    from smart_diffusion_backend.kernels import flash_attention

    lines = [f"## int8 Q.K^T, bf16 P.V, {stages} K/V stages", "",
             "| check [B, H, Sq, Skv, kv_len, D], layout | rel-L2 vs float32 | lse max err | ok |", "|---|---|---|---|"]
    torch.manual_seed(0)
    ok_all = True
    for b, h, s, skv, kv_len, d, inner in [(1, 2, 77, 77, None, 64, False), (1, 4, 1531, 1531, None, 128, False),
                                           (2, 3, 1000, 1000, 900, 128, False), (1, 8, 4608, 512, None, 128, True),
                                           (1, 24, 4608, 4608, None, 128, True), (1, 2, 32760, 32760, None, 128, False)]:
        def make(n):
            if inner:
                return torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            return torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

        q, k, v = make(s), make(skv), make(skv)
        out = torch.full_like(q, float("nan"))
        out, lse = hopper_int8_attention(q, k, v, kv_len=kv_len, return_lse=True, stages=stages, out=out)
        ref = reference(q, k, v, kv_len=kv_len)
        lse_err = 0.0
        if s * skv <= 4608 * 4608:
            kk = k if kv_len is None else k[:, :, :kv_len]
            scores = q.float() @ kk.float().transpose(-1, -2) / math.sqrt(d)
            lse_err = (lse - torch.logsumexp(scores, -1)).abs().max().item()
            del scores
        err = rel_l2(out, ref)
        ok = err <= 2e-2 and lse_err <= 2e-2 and not out.isnan().any().item()
        ok_all &= ok
        lines.append(f"| {[b, h, s, skv, kv_len, d]}, {'[B,S,H,D]' if inner else '[B,H,S,D]'} | {err:.2e} | "
                     f"{lse_err:.1e} | {'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
        del q, k, v, out, ref
    if not ok_all:
        return lines + ["", "Not timed: a check failed.", ""]
    lines += ["", "| S | H | impl | ms | TFLOP/s | x cuDNN |", "|---|---|---|---|---|---|"]
    for s, h in [(4608, 24), (16384, 24), (32760, 40), (75600, 40)]:
        q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        q8, q_scale, k8, k_scale, _ = quantize_qk(q, k, 128 ** -0.5, None, int8=True)
        no_lse = torch.empty((1, h, 0), device="cuda", dtype=torch.float32)

        def kernel_only():
            _launch(q8, q_scale, k8, k_scale, v, out, no_lse, s, stages, False)

        rep = 100 if s < 30000 else 400
        base = do_bench(cudnn, rep=rep)
        for name, fn in [("cudnn", cudnn), ("bf16 hopper", lambda: flash_attention(q, k, v, out=out)),
                         ("int8 (with quantisation)", lambda: hopper_int8_attention(q, k, v, stages=stages, out=out)),
                         ("int8 kernel alone", kernel_only),
                         ("int8 kernel alone, persistent",
                          lambda: _launch(q8, q_scale, k8, k_scale, v, out, no_lse, s, stages, False, True)),
                         ("quantisation alone", lambda: quantize_qk(q, k, 128 ** -0.5, None, int8=True))]:
            ms = base if name == "cudnn" else do_bench(fn, rep=rep)
            lines.append(f"| {s} | {h} | {name} | {ms:.3f} | {4 * h * s * s * 128 / ms / 1e9:.0f} | {base / ms:.3f} |")
            print(lines[-1], flush=True)
        del q, k, v, out, q8, k8
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--child", action="store_true", help="measure one stage count in this process (internal)")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compile_only:
        for stages in args.stages:
            for head_dim in (128, 64):
                compile_only(head_dim, stages)
        return
    if args.child:
        print("\n".join(["<<<"] + measure(args.stages[0]) + [">>>"]), flush=True)
        return
    import subprocess  # each stage count in its own process: a hang or a poisoned context costs only it

    lines = ["# int8 Q.K^T attention in the Hopper structure (bench/hopper_int8_attention.py)", "",
             f"- card: {torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__}",
             f"- command: `python {' '.join(sys.argv)}`", ""]
    for stages in args.stages:
        command = [sys.executable, __file__, "--child", "--stages", str(stages)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if "<<<" in done.stdout and ">>>" in done.stdout:
                lines += done.stdout.split("<<<", 1)[1].split(">>>", 1)[0].strip("\n").splitlines() + [""]
            else:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                lines += [f"## {stages} stages: failed (exit {done.returncode})", "", *tail, ""]
        except subprocess.TimeoutExpired:
            lines += [f"## {stages} stages: no result within {args.timeout:.0f} s (hung)", ""]
        print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
