"""Where the time of our attention goes: per-kernel CUDA times (torch.profiler) for bf16 / int8 / fp8 paths.

    python bench/attention_profile.py [--sizes 4608,32760]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smart_diffusion_backend.kernels import flash_attention  # noqa: E402

HEADS_BY_SIZE = {4608: 24, 16384: 24, 32760: 40, 75600: 40}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4608,32760")
    args = parser.parse_args()
    for seq in (int(s) for s in args.sizes.split(",")):
        heads = HEADS_BY_SIZE.get(seq, 24)
        q, k, v = (torch.randn(1, heads, seq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for precision in ("bf16", "int8", "fp8"):
            for _ in range(3):
                flash_attention(q, k, v, precision=precision)  # autotune + warm up
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    flash_attention(q, k, v, precision=precision)
                torch.cuda.synchronize()
            kernels = sorted(((e.device_time_total / 5 / 1000, e.key[:60]) for e in prof.key_averages()
                              if e.device_time_total > 0), reverse=True)
            print(json.dumps(dict(S=seq, precision=precision,
                                  ms_per_call={name: round(ms, 3) for ms, name in kernels[:8]})), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
