"""The rowwise e4m3 quantisation kernel (kernels/rowwise_fp8.py) on a GPU: checks against the torch arithmetic
(the hardware's e4m3 conversion included), then its time beside what torch.compile's inductor makes of the same
arithmetic and beside eager torch, at the MLP shapes of Wan2.1-14B 480p and Flux.1-dev 1024².

    python -m bench.rowwise_fp8_bench [--out bench/results/quantization/rowwise-fp8-h100.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from smart_diffusion_backend.kernels.rowwise_fp8 import _launch, rowwise_fp8_reference

# (name, rows, cols, bias + GELU): the second MLP layer's input, and a plain projection's input
SHAPES = [("Wan 480p MLP (32,760 × 13,824)", 32760, 13824, True),
          ("Wan 480p projection input (32,760 × 5,120)", 32760, 5120, False),
          ("Flux 1024² image MLP (4,096 × 12,288)", 4096, 12288, True),
          ("Flux text MLP (512 × 12,288)", 512, 12288, True)]


def check(rows: int, cols: int, gelu: bool, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    bias = torch.randn(cols, device="cuda", dtype=torch.bfloat16, generator=gen) if gelu else None
    q, scale = _launch(x, bias, gelu)
    ref_q, ref_scale = rowwise_fp8_reference(x, bias, gelu)
    torch.cuda.synchronize()
    differ = (q.float() != ref_q.float()).float().mean().item()
    scale_err = ((scale - ref_scale).abs() / ref_scale).max().item()
    return dict(rows=rows, cols=cols, gelu=gelu, mismatched_fraction=differ, scale_max_rel_err=scale_err,
                ok=differ <= 1e-4 and scale_err <= 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/rowwise-fp8.md"))
    args = parser.parse_args()
    checks = [check(rows, cols, gelu, seed) for seed, (_, rows, cols, gelu) in enumerate(SHAPES)]
    checks += [check(7, 333, True, 99), check(3, 1, False, 98)]  # odd widths
    for row in checks:
        print(json.dumps(row), flush=True)
    compiled = torch.compile(rowwise_fp8_reference, dynamic=False)
    timings = []
    for name, rows, cols, gelu in SHAPES:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(cols, device="cuda", dtype=torch.bfloat16) if gelu else None
        moved = rows * cols * 3  # bytes: bf16 in, e4m3 out
        row = dict(shape=name)
        for label, fn in (("ours", lambda: _launch(x, bias, gelu)), ("inductor", lambda: compiled(x, bias, gelu)),
                          ("eager torch", lambda: rowwise_fp8_reference(x, bias, gelu))):
            fn()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            row[label] = dict(ms=round(ms, 3), tb_s=round(moved / ms / 1e9, 2))
        timings.append(row)
        print(json.dumps(row), flush=True)
    lines = ["# Rowwise e4m3 quantisation (kernels/rowwise_fp8.py) on one GPU", "",
             f"- card: {torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"- command: `python -m bench.rowwise_fp8_bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             "## Speed (median of do_bench; TB/s counts the bf16 read and the e4m3 write once)", "",
             "| input | ours | inductor (torch.compile of the same arithmetic) | eager torch |", "|---|---|---|---|"]
    for row in timings:
        cells = [f"{row[k]['ms']} ms ({row[k]['tb_s']} TB/s)" for k in ("ours", "inductor", "eager torch")]
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + " |")
    lines += ["", "## Checks (bf16 inputs, the e4m3 values and scales against the torch arithmetic)", "",
              "| rows × cols | bias + GELU | e4m3 values that differ | scale max rel. error | ok |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['rows']} × {c['cols']} | {c['gelu']} | {c['mismatched_fraction']:.2e} | "
              f"{c['scale_max_rel_err']:.1e} | {c['ok']} |" for c in checks]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
