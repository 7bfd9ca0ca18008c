#!/usr/bin/env python3
"""GPU part of the feature-cache bench: do saved block evaluations turn into saved time?

Real-architecture transformers with random weights (same FLOPs as the real ones), bf16, eager:
  flux: Flux.1-dev transformer, 1024x1024 (4,096 image + 512 text tokens), guidance embedded, no CFG
  wan:  Wan2.1-T2V-14B transformer, 480x832, 81 frames (32,760 tokens), CFG (cond + uncond per step)

Per model, with one fixed skip schedule (``--schedule``, default: what the yaml proposal gives at ratio 1 —
warm-up 1, cool-down 1, at most 4 skips in a row):
  1. no cache (no hooks): ms per step                                                      -> baseline
  2. cache hooks on, never skipping (threshold -1: metric, residual bookkeeping all run)    -> overhead
  3. the schedule replayed (CacheConfig.schedule)                                           -> achieved
  and the ideal: baseline x (block evaluations done / total), the time if only blocks cost.
Writes bench/results/cache/cache-gpu.md. Not run on CPU (needs ~31 GiB for Wan-14B at 480p).

  python -m bench.cache_gpu_bench --models flux wan --flux-steps 28 --wan-steps 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from smart_diffusion_backend.cache import CacheConfig, request_cache

ROOT = Path(__file__).resolve().parent.parent


def flux_setup(device, dtype):
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        model = FluxTransformer2DModel(  # Flux.1-dev's transformer config
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    n_img, n_txt = (1024 // 16) ** 2, 512
    inputs = dict(
        hidden_states=torch.randn(1, n_img, 64, device=device, dtype=dtype, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, 4096, device=device, dtype=dtype, generator=g),
        pooled_projections=torch.randn(1, 768, device=device, dtype=dtype, generator=g),
        guidance=torch.full([1], 3.5, device=device, dtype=torch.float32),
        txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
        img_ids=torch.zeros(n_img, 3, device=device, dtype=dtype),
    )

    def forward(x, t):
        return model(**{**inputs, "hidden_states": x}, timestep=t.expand(1).to(dtype), return_dict=False)[0]

    return model, inputs["hidden_states"], ["cond"], forward


def wan_setup(device, dtype):
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(  # Wan2.1-T2V-14B's transformer config
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 16, 21, 60, 104, device=device, dtype=dtype, generator=g)  # 480x832x81f
    cond = torch.randn(1, 512, 4096, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, 512, 4096, device=device, dtype=dtype, generator=g)

    def forward(x, t, session=None):
        ts = (t * 1000).expand(1)
        c = _call(model, session, "cond", hidden_states=x, timestep=ts, encoder_hidden_states=cond)
        u = _call(model, session, "uncond", hidden_states=x, timestep=ts, encoder_hidden_states=uncond)
        return u + 5.0 * (c - u)

    return model, latents, ["cond", "uncond"], forward


def _call(model, session, branch, **kwargs):
    if session is None:
        return model(**kwargs, return_dict=False)[0]
    with session.branch(branch):
        return model(**kwargs, return_dict=False)[0]


def default_schedule(steps: int, warmup: int = 1, cooldown: int = 1, max_skips: int = 4) -> str:
    """Fixed-interval pattern: warm-up computed, then (S * max_skips + C) repeated, cool-down computed."""
    out = []
    run = 0
    for i in range(steps):
        if i < warmup or i >= steps - cooldown or run == max_skips:
            out.append("C")
            run = 0
        else:
            out.append("S")
            run += 1
    return "".join(out)


def time_loop(name, model, latents, branches, forward, steps, config, device) -> tuple[float, dict]:
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, device=device)
    x = latents.clone()
    with request_cache(model, config, steps) as session, torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            session.step(i)
            t = sigmas[i]
            if len(branches) == 1:
                with session.branch("cond"):
                    v = forward(x, t)
            else:
                v = forward(x, t, session)
            dt = sigmas[i] - (sigmas[i + 1] if i + 1 < steps else 0.0)
            x = x - dt * v
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    stats = session.stats()
    print(f"{name}: {1000 * elapsed / steps:.1f} ms/step {stats.get('cache_schedule', '')}", flush=True)
    return 1000 * elapsed / steps, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["flux", "wan"], choices=["flux", "wan"])
    ap.add_argument("--flux-steps", type=int, default=28)
    ap.add_argument("--wan-steps", type=int, default=10)
    ap.add_argument("--policy", default="fbc", choices=["fbc", "teacache"])
    ap.add_argument("--schedule", default=None, help="'C'/'S' per step; default: default_schedule(steps)")
    ap.add_argument("--warmup-runs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache" / "cache-gpu.md"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cache_gpu_bench needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    lines = [
        f"# Feature cache on GPU: {torch.cuda.get_device_name()} (torch {torch.__version__}, bf16, eager)",
        "",
        "Random weights, real architectures. ms/step = one denoising step (Wan: cond + uncond forward).",
        f"Policy `{args.policy}`. Overhead = hooks on, never skipping, vs no hooks. "
        "Ideal = baseline x computed block evaluations / total.",
        "",
        "| model | steps | schedule | baseline ms/step | never-skip ms/step (overhead) | cached ms/step | "
        "block evals | speedup | ideal speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        model, latents, branches, forward = (flux_setup if name == "flux" else wan_setup)(device, dtype)
        steps = args.flux_steps if name == "flux" else args.wan_steps
        schedule = args.schedule or default_schedule(steps)
        for _ in range(args.warmup_runs):  # allocator, cuDNN plans
            time_loop(f"{name} warm-up", model, latents, branches, forward, min(steps, 3), None, device)
        base, _ = time_loop(f"{name} no cache", model, latents, branches, forward, steps, None, device)
        never = CacheConfig(policy=args.policy, threshold=-1.0, max_consecutive_skips=steps)
        over, _ = time_loop(f"{name} never skip", model, latents, branches, forward, steps, never, device)
        replay = CacheConfig(policy=args.policy, threshold=0.0, max_consecutive_skips=steps, schedule=schedule)
        cached, stats = time_loop(f"{name} replay", model, latents, branches, forward, steps, replay, device)
        done, total = stats["cache_block_evals"], stats["cache_block_evals_total"]
        lines.append(
            f"| {name} | {steps} | `{schedule}` | {base:.1f} | {over:.1f} ({100 * (over / base - 1):+.2f} %) | "
            f"{cached:.1f} | {done}/{total} | {base / cached:.2f}x | {total / done:.2f}x |"
        )
        del model
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
