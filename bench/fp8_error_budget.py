"""Where the FP8 attention error comes from: each quantisation step alone, emulated exactly in torch (CPU).

    .venv/bin/python bench/fp8_error_budget.py [--seq 4608] [--heads 4] [--out bench/results/fp8-error-budget-cpu.md]

The kernel's FP8 mode (smart_diffusion_backend/kernels/flash_attention.py, precision="fp8") quantises
Q and K (float8 e4m3, one scale per 64 rows, K mean-smoothed), P (scaled by 448 into e4m3) and V (e4m3,
per channel). Here each of those roundings is applied alone, everything else in float64, on the issue's
test inputs (standard normal q, k, v, head_dim 128), and the relative L2 error of the output is measured
against exact float64 attention. torch's float8_e4m3fn casts round like the kernel's `.to(tl.float8e4nv)`.
Softmax is exact apart from the step under study, so the rows are the error budget of the kernel.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402 - bench/report.py, beside this script

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 64


def fp8_rows(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """e4m3 with one scale per `block` rows (amax / 448), back in float64: the kernel's Q/K quantisation."""
    b, h, s, d = x.shape
    pad = (-s) % block
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, h, -1, block, d)
    scale = (xp.abs().amax(dim=(-1, -2), keepdim=True) / FP8_MAX).clamp_min(1e-12)
    q = (xp / scale).to(FP8).to(torch.float64) * scale
    return q.reshape(b, h, -1, d)[:, :, :s]


def int8_rows(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    b, h, s, d = x.shape
    pad = (-s) % block
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, h, -1, block, d)
    scale = (xp.abs().amax(dim=(-1, -2), keepdim=True) / 127.0).clamp_min(1e-12)
    q = torch.round(xp / scale).clamp(-127, 127) * scale
    return q.reshape(b, h, -1, d)[:, :, :s]


def fp8_channels(v: torch.Tensor) -> torch.Tensor:
    """e4m3 with one scale per channel over the sequence: the kernel's V quantisation."""
    scale = (v.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (v / scale).to(FP8).to(torch.float64) * scale


def attention(q, k, v, *, p_round=None) -> torch.Tensor:
    """Exact float64 attention; `p_round` rounds the unnormalised probabilities exp(s - rowmax) in [0, 1]
    (the kernel's P, which it scales by 448 into e4m3) before they multiply V."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    denominator = p.sum(dim=-1, keepdim=True)  # the kernel sums P in float32 before rounding it
    if p_round is not None:
        p = p_round(p)
    return (p @ v) / denominator


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4608)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq, 128, generator=g, dtype=torch.float64) for _ in range(3))
    exact = attention(q, k, v)
    k_smooth = k - k.mean(dim=2, keepdim=True)  # exact for softmax: every score of a row shifts alike

    def p_fp8(p):
        return (p * FP8_MAX).to(FP8).to(torch.float64) / FP8_MAX

    def bf16(x):
        return x.to(torch.bfloat16).to(torch.float64)

    steps = {
        "bf16 q, k, v, P (the bf16 kernel)": attention(bf16(q), bf16(k), bf16(v), p_round=bf16),
        "Q, K e4m3 per 64 rows (K smoothed)": attention(fp8_rows(q), fp8_rows(k_smooth), v),
        "Q, K int8 per 64 rows (K smoothed)": attention(int8_rows(q), int8_rows(k_smooth), v),
        "P e4m3 (scaled by 448)": attention(q, k, v, p_round=p_fp8),
        "V e4m3 per channel": attention(q, k, fp8_channels(v)),
        "P and V e4m3 (the P·V product in fp8)": attention(q, k, fp8_channels(v), p_round=p_fp8),
        "all of the fp8 mode (Q, K, P, V e4m3)": attention(fp8_rows(q), fp8_rows(k_smooth), fp8_channels(v), p_round=p_fp8),
        "int8 Q, K + bf16 P, V (the int8 mode)": attention(int8_rows(q), int8_rows(k_smooth), bf16(v), p_round=bf16),
        "fp8 Q, K + bf16 P, V": attention(fp8_rows(q), fp8_rows(k_smooth), bf16(v), p_round=bf16),
        "int8 Q, K + e4m3 P, V (SageAttention-2 style)": attention(int8_rows(q), int8_rows(k_smooth), fp8_channels(v),
                                                                 p_round=p_fp8),
    }
    lines = [
        "# FP8 attention: the error budget, one rounding at a time",
        "",
        f"Emulated in float64 on the CPU (torch {torch.__version__}, `float8_e4m3fn` casts): standard normal q, k, v,",
        f"[1, {args.heads}, {args.seq}, 128], rel-L2 of the output vs exact attention. Bar for the FP8 mode: 2e-2.",
        f"Command: `python bench/fp8_error_budget.py --seq {args.seq} --heads {args.heads}`",
        "",
        "| rounding applied (everything else exact) | rel-L2 |",
        "|---|---|",
    ]
    for name, out in steps.items():
        lines.append(f"| {name} | {rel_l2(out, exact):.2e} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
