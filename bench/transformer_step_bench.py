"""One denoiser forward of real-architecture Flux.1-dev (1024², 512 text tokens) and Wan2.1-14B (480p, 81
frames), random bf16 weights (timing does not depend on weight values), in one run on one GPU:

    eager diffusers (default SDPA)  |  our triton attention  |  our triton_int8  |  ours + regional compile
    [| diffusers SDPA + regional compile, with --compile-baseline]
    | ours + fp8_linear, inputs quantised by inductor | SDPA / ours + fp8_linear (e4m3 GEMMs in the blocks, GELU
      MLPs fused and attention outputs quantised by kernels/rowwise_fp8.py) + regional compile  [unless
      --no-fp8-linear]

    python -m bench.transformer_step_bench [--models flux,wan480] [--out path.md] [--compile-baseline]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import triton
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from smart_diffusion_backend.attention.compile import compile_repeated_blocks, warm_up_compiled
from smart_diffusion_backend.attention.processors import attention_for, install_attention
from smart_diffusion_backend.quant import quantize_linears, use_quantisation_kernel

WAN14_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def flux_inputs(height: int = 1024, width: int = 1024, text_tokens: int = 512) -> dict:
    tokens = (height // 16) * (width // 16)
    dev, dt = "cuda", torch.bfloat16
    return dict(hidden_states=torch.randn(1, tokens, 64, device=dev, dtype=dt),
                encoder_hidden_states=torch.randn(1, text_tokens, 4096, device=dev, dtype=dt),
                pooled_projections=torch.randn(1, 768, device=dev, dtype=dt),
                timestep=torch.tensor([0.5], device=dev, dtype=dt), guidance=torch.tensor([3.5], device=dev, dtype=dt),
                img_ids=torch.zeros(tokens, 3, device=dev), txt_ids=torch.zeros(text_tokens, 3, device=dev),
                return_dict=False)


def wan_inputs(frames: int = 81, height: int = 480, width: int = 832) -> dict:
    latent_frames = (frames - 1) // 4 + 1
    return dict(hidden_states=torch.randn(1, 16, latent_frames, height // 8, width // 8, device="cuda",
                                          dtype=torch.bfloat16),
                timestep=torch.tensor([500], device="cuda"),
                encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
                return_dict=False)


def time_forward(model, inputs: dict, runs: int) -> tuple[float, float]:
    """Median ms of ``runs`` forwards after two warm-up forwards, and the median ms the host took to issue
    one (until the call returned, before synchronising): issue time near the total means host-bound."""
    with torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        times, issue = [], []
        for _ in range(runs):
            start = time.perf_counter()
            model(**inputs)
            issue.append((time.perf_counter() - start) * 1000)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2], sorted(issue)[len(issue) // 2]


def profile_forward(model, inputs: dict) -> dict:
    """Summed GPU kernel time of one forward and attention's share of it."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    total = attention = 0.0
    for event in prof.key_averages():
        device_time = getattr(event, "device_time_total", 0.0)
        total += device_time
        if any(s in event.key.lower() for s in ("flash", "fmha", "attn_fwd", "sdpa", "attention")):
            attention += device_time
    return dict(kernel_ms=round(total / 1000, 1), attention_share=round(attention / total, 3) if total else 0.0)


def rel_l2(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).norm() / reference.norm()).item()


def bench_model(name: str, build, make_inputs, runs: int, compile_baseline: bool, fp8_linear: bool) -> list[dict]:
    torch.cuda.empty_cache()
    gc.collect()
    torch.set_default_dtype(torch.bfloat16)
    start = time.time()
    with torch.device("cuda"):
        model = build()
    torch.set_default_dtype(torch.float32)
    model.eval()
    print(json.dumps(dict(model=name, build_s=round(time.time() - start, 1))), flush=True)
    inputs = make_inputs()
    rows = []

    def record(variant: str, **extra) -> None:
        ms, issue_ms = time_forward(model, inputs, runs)
        rows.append(dict(model=name, variant=variant, ms=round(ms, 1), issue_ms=round(issue_ms, 1),
                         **profile_forward(model, inputs), **extra))
        print(json.dumps(rows[-1]), flush=True)

    with torch.inference_mode():
        reference = model(**inputs)[0].float()
    record("diffusers eager (SDPA default)")
    default_processors = model.attn_processors

    for backend in ("triton", "triton_int8"):
        install_attention(model, attention_for(backend))
        with torch.inference_mode():
            out = model(**inputs)[0].float()
        err = rel_l2(out, reference)
        record(f"{backend} eager", rel_l2_vs_eager=round(err, 5))

    install_attention(model, attention_for("triton"))
    compile_repeated_blocks(model, fullgraph=False)
    with torch.inference_mode():
        compile_s = warm_up_compiled(lambda: model(**inputs), runs=1)
    record("triton + compile_repeated_blocks", compile_s=round(compile_s, 1),
           graph_breaks=int(sum(torch._dynamo.utils.counters["graph_break"].values())))
    if compile_baseline:
        model.set_attn_processor(dict(default_processors))  # diffusers pops from the dict it is given
        with torch.inference_mode():
            compile_s = warm_up_compiled(lambda: model(**inputs), runs=1)
        record("diffusers SDPA + compile_repeated_blocks", compile_s=round(compile_s, 1))
    if fp8_linear:  # last: the blocks' Linear layers are replaced in place (system param fp8_linear)
        # first with every input quantised by torch ops (inductor's kernels), then as fp8_linear does it: the
        # GELU MLPs fused and the attention outputs quantised by kernels/rowwise_fp8.py, in the same run
        replaced = quantize_linears(model, quantisation_kernel=False)
        install_attention(model, attention_for("triton"))
        torch._dynamo.reset()
        with torch.inference_mode():
            compile_s = warm_up_compiled(lambda: model(**inputs), runs=1)
            out = model(**inputs)[0].float()
        record("triton + fp8_linear (quantisation by inductor) + compile_repeated_blocks",
               compile_s=round(compile_s, 1), rel_l2_vs_eager=round(rel_l2(out, reference), 5))
        kernel_quantised = use_quantisation_kernel(model)
        for backend in ("triton",) + (("sdpa",) if compile_baseline else ()):
            if backend == "sdpa":
                model.set_attn_processor(dict(default_processors))  # diffusers pops from the dict it is given
            else:
                install_attention(model, attention_for(backend))
            torch._dynamo.reset()
            with torch.inference_mode():
                compile_s = warm_up_compiled(lambda: model(**inputs), runs=1)
                out = model(**inputs)[0].float()
            record(f"{backend} + fp8_linear + compile_repeated_blocks", compile_s=round(compile_s, 1),
                   fp8_linears=replaced, kernel_quantised=kernel_quantised,
                   rel_l2_vs_eager=round(rel_l2(out, reference), 5))
    rows.append(dict(model=name, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1)))
    model = inputs = reference = None  # free the GPU memory before the next model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "transformer-step.md" if "OUT" in os.environ else \
        Path(__file__).parent / "results" / "transformer-step" / "transformer-step.md"
    parser.add_argument("--models", default="flux")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile-baseline", action="store_true")
    parser.add_argument("--no-fp8-linear", action="store_true", help="skip the fp8_linear rows")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        if model_name == "flux":
            rows += bench_model("Flux.1-dev 1024² (4096+512 tokens)", lambda: FluxTransformer2DModel(
                guidance_embeds=True), flux_inputs, args.runs, args.compile_baseline, not args.no_fp8_linear)
        elif model_name == "wan480":
            rows += bench_model("Wan2.1-14B 480×832×81f (32760 tokens)", lambda: WanTransformer3DModel(
                **WAN14_CONFIG), wan_inputs, max(2, args.runs // 2), args.compile_baseline,
                not args.no_fp8_linear)
        else:
            raise SystemExit(f"unknown model {model_name!r}; use flux, wan480")
    lines = ["# One transformer forward", "",
             f"- card: {torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__}",
             f"- command: `python -m bench.transformer_step_bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             "| model | variant | ms / forward | extra |", "|---|---|---|---|"]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("model", "variant", "ms")}
        lines.append(f"| {r['model']} | {r.get('variant', '')} | {r.get('ms', '')} | {extra} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
