"""Sequence-parallel transformer forward on 1/2/4 GPUs: ours (Ulysses / Ring / hybrid) vs diffusers' own
``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``, in the same run, same processes, same inputs.

Real-architecture Wan2.1-14B / Flux.1-dev transformers with random weights (timing does not depend on weight
values; see ../shared/probes/gpu_anchor.py), bf16, eager. Runs through our WorkerPool (NCCL, one process per
GPU), so it also exercises the pool the server uses.

    python -m bench.sp_bench --model wan720 --gpus 1 2 4 --iters 2
    python -m bench.sp_bench --model flux --gpus 1 2 4 --iters 10 --attention sdpa
    python -m bench.sp_bench --model tiny-flux --gpus 1 2 --device cpu     # smoke test of the script on CPU

Prints one JSON line per (gpus, mode) and appends them to --out (default bench/results/sequence-parallel/sp_<model>.jsonl).
Modes: ``ours`` (1 GPU: our processors + backend, no parallelism), ``ulysses``, ``ring``, ``hybrid``
(ulysses 2 x ring N/2, N >= 4), ``diffusers`` (1 GPU: eager diffusers; N GPUs: its Ulysses), and
``ours+compile`` / ``ulysses+compile`` (regional compile of the repeated blocks as ``compile_transformer``
does it in the pool; the compile is timed apart, as ``compile_s``), ``ulysses+compile+overlap`` (the same with
inductor's compute/communication reordering), ``+graph`` on ours / ulysses / their ``+compile`` (the whole
forward captured as one CUDA graph and replayed: no host work per block; not yet run on a GPU),
``diffusers+compile`` (diffusers' own Ulysses, regionally compiled the
same way: the like-for-like baseline of the compiled modes). diffusers runs last in each pool because
enable_parallelism cannot be undone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from smart_diffusion_backend.parallel import ParallelConfig, WorkerContext, WorkerPool
from smart_diffusion_backend.parallel import parallel_state as ps

WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
MODELS: dict[str, dict[str, Any]] = {
    "wan720": dict(kind="wan", h=720, w=1280, frames=81),
    "wan480": dict(kind="wan", h=480, w=832, frames=81),
    "flux": dict(kind="flux", h=1024, w=1024),
    "flux2k": dict(kind="flux", h=2048, w=2048),
    "tiny-flux": dict(kind="flux", h=96, w=80, tiny=True),  # CPU smoke test of the script
    # Flux.1-dev's 19 + 38 blocks at tiny widths: per-forward time is then almost all host work (launches, hooks,
    # guards), measurable on a CPU
    "flux-depth": dict(kind="flux", h=128, w=128, tiny=True, layers=(19, 38)),
    "tiny-wan": dict(kind="wan", h=64, w=80, frames=9, tiny=True),
}


def _build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if spec["kind"] == "flux":
                cfg = dict(guidance_embeds=True)
                if spec.get("tiny"):
                    layers, single = spec.get("layers", (1, 2))
                    cfg.update(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single, attention_head_dim=16,
                               num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6))
                model = FluxTransformer2DModel(**cfg)
            else:
                cfg = dict(WAN14B)
                if spec.get("tiny"):
                    cfg.update(num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                               num_layers=2)
                model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _inputs(model: torch.nn.Module, spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator(device).manual_seed(0)
    text = 16 if spec.get("tiny") else 512
    if spec["kind"] == "flux":
        hh, ww = spec["h"] // 16, spec["w"] // 16  # 8x VAE, 2x2 packing
        ids = torch.zeros(hh, ww, 3, device=device)
        ids[..., 1] = torch.arange(hh, device=device)[:, None]
        ids[..., 2] = torch.arange(ww, device=device)[None, :]
        cfg = model.config
        return dict(
            hidden_states=torch.randn(1, hh * ww, cfg.in_channels, device=device, dtype=dtype, generator=g),
            encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, device=device, dtype=dtype,
                                              generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype, generator=g),
            timestep=torch.tensor([0.5], device=device, dtype=dtype),
            guidance=torch.tensor([3.5], device=device, dtype=dtype),
            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=device), return_dict=False,
        )
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, (spec["frames"] - 1) // 4 + 1, spec["h"] // 8, spec["w"] // 8,
                                  device=device, dtype=dtype, generator=g),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, text, cfg.text_dim, device=device, dtype=dtype, generator=g),
        return_dict=False,
    )


class BenchWorker:
    def __init__(self, ctx: WorkerContext, model: str, attention: str) -> None:
        self.ctx = ctx
        self.spec = MODELS[model]
        self.attention = attention
        self.dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        t0 = time.time()
        self.model = _build(self.spec, ctx.device, self.dtype)
        self.build_s = time.time() - t0
        self.inputs = _inputs(self.model, self.spec, ctx.device, self.dtype)
        self.outputs: dict[str, torch.Tensor] = {}
        self.diffusers_parallel = False  # enable_parallelism is one-way: applied once per pool

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        ps.barrier()

    def _captured_forward(self):
        """+graph: the whole forward (every block, its all-to-alls and, with +compile, the compiled code)
        captured once as one CUDA graph and replayed on the same input buffers: no host work per block at all.
        Regional ``mode="reduce-overhead"`` cannot do this: the blocks share one compiled graph, and cudagraph
        trees stop at the second block (sp_flux-h100x4-graphs-failed.jsonl)."""
        if self.ctx.device.type != "cuda":
            raise ValueError("+graph captures CUDA graphs: it needs --device cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graph requires
                self.model(**self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        ps.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = self.model(**self.inputs)[0]

        def replay():  # holds the graph (and its memory pool) for as long as the mode uses it
            graph.replay()
            return static_out.clone()  # the graph's own buffer is rewritten by the next replay

        return replay

    def _time(self, warmup: int, iters: int, forward=None) -> tuple[list[float], torch.Tensor]:
        forward = forward or (lambda: self.model(**self.inputs)[0])
        with torch.inference_mode():
            for _ in range(warmup):
                out = forward()
                self.ctx.heartbeat()
            self._sync()
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                out = forward()
                self._sync()
                times.append(time.perf_counter() - t)
                self.ctx.heartbeat()
        return times, out

    def _profile(self, host: bool = False) -> dict[str, Any]:
        """One more forward under torch.profiler: GPU kernel ms by kind (this rank), and the wall ms. ``host``:
        also the host side (CPU activity): the ops with the most self CPU time, where a forward whose
        kernels sum to less than its wall time spends it."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.ctx.device.type == "cuda"
        activities = ([ProfilerActivity.CUDA] if cuda else []) + ([ProfilerActivity.CPU] if host else [])
        with torch.inference_mode(), profile(activities=activities) as prof:
            started = time.perf_counter()
            self.model(**self.inputs)
            self._sync()
            wall = time.perf_counter() - started
        kinds: dict[str, Any] = {"wall": wall * 1000}
        cpu_ops: list[tuple[float, str, int]] = []
        kernels: list[tuple[float, str, int]] = []
        for event in prof.key_averages():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                cpu_ops.append((event.self_cpu_time_total / 1000, event.key, event.count))
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
            kind = _kernel_kind(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + us / 1000
            kernels.append((us / 1000, event.key, event.count))
        kinds = {k: round(v, 1) for k, v in sorted(kinds.items())}
        if kernels:  # names tell a fused inductor kernel ("..._cat_...") from a plain copy
            kinds["top_kernels"] = [(key[:70], round(ms, 1), count) for ms, key, count in sorted(kernels, reverse=True)[:12]]
        if host:
            kinds["host_cpu_ms"] = round(sum(ms for ms, _, _ in cpu_ops), 1)
            kinds["host_top"] = [(key[:60], round(ms, 1), count) for ms, key, count in sorted(cpu_ops, reverse=True)[:12]]
        return kinds

    def bench(self, mode: str, warmup: int, iters: int, profile: str | None = None) -> dict[str, Any]:
        from smart_diffusion_backend.parallel import SPTransformerConfig, parallelize_transformer

        n = self.ctx.world_size
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        handle = None
        if mode.startswith("diffusers"):
            ps.set_parallel_degrees(ulysses_degree=n)
            if n > 1 and not self.diffusers_parallel:
                from diffusers import ContextParallelConfig

                if self.ctx.device.type == "cpu":
                    # diffusers' CP derives the device from torch.accelerator, which counts 0 on CPU (smoke test only)
                    torch.accelerator.device_count = lambda: 1
                self.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n))
                self.diffusers_parallel = True
        else:
            base = mode.partition("+")[0]
            degrees = {"ours": (1, 1), "ulysses": (n, 1), "ring": (1, n), "hybrid": (2, n // 2)}[base]
            ps.set_parallel_degrees(ulysses_degree=degrees[0], ring_degree=degrees[1])
            handle = parallelize_transformer(self.model, SPTransformerConfig(attention_backend=self.attention))
        compiled = "+compile" in mode
        compile_s = None
        try:  # a mode that fails (even in its compile) must leave the model eager and unsharded for the next
            if compiled:  # what compile_transformer does in the pool: after the SP processors (or diffusers' CP)
                from smart_diffusion_backend.attention.compile import compile_repeated_blocks

                # +overlap: inductor moves each all-to-all as early and its wait as late as the graph allows, so
                # q's transfer can run under the k/v projections (an experiment, not what the pool does yet)
                torch._inductor.config.reorder_for_compute_comm_overlap = mode.endswith("+overlap")
                compile_repeated_blocks(self.model, dynamic=None, fullgraph=False)
                started = time.perf_counter()
                with torch.inference_mode():
                    self.model(**self.inputs)  # the compile, kept out of the timing
                self._sync()
                compile_s = time.perf_counter() - started
            forward = self._captured_forward() if mode.endswith("+graph") else None
            times, out = self._time(warmup, iters, forward)
            use_profile = profile == "host" or (profile and self.ctx.device.type == "cuda")
            kernel_ms = self._profile(profile == "host") if use_profile else None
        finally:
            if compiled:
                for module in self.model.modules():
                    module.__dict__.pop("forward", None)  # back to the class's eager forward
                torch._dynamo.reset()
            if handle is not None:
                handle.remove()
        out = out.float().cpu()
        self.outputs[mode] = out
        ref_key = next((k for k in ("ours", "ulysses", "diffusers") if k in self.outputs and k != mode), None)
        res = dict(
            mode=mode, gpus=n, forward_s=[round(t, 4) for t in times], median_s=round(sorted(times)[len(times) // 2], 4),
            out_norm=float(out.norm()), build_s=round(self.build_s, 1),
        )
        if ref_key is not None:  # same inputs and weights: the modes must agree (bf16 noise on GPU)
            ref = self.outputs[ref_key]
            res[f"rel_l2_vs_{ref_key}"] = float((out - ref).norm() / ref.norm())
        if handle is not None:
            res["plan"] = handle.attention.plan(self.model.config.num_attention_heads)
        if self.ctx.device.type == "cuda":
            res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if kernel_ms is not None:
            res["kernel_ms_rank0"] = kernel_ms
        if compile_s is not None:
            res["compile_s"] = round(compile_s, 1)
        return res


_KERNEL_KINDS = (  # first match wins: attention kernels also contain "sm90"/"gemm"-like fragments
    ("nccl", ("nccl",)),
    ("attention", ("sdpa", "flash", "fmha", "attn", "_attn_fwd")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index", "gather", "scatter")),
)


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in _KERNEL_KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other (elementwise, norms)"


_VARIANTS = {"ours": ("", "+graph", "+compile", "+compile+graph"),
             "ulysses": ("", "+graph", "+compile", "+compile+overlap", "+compile+graph"),
             "ring": ("",), "hybrid": ("",), "diffusers": ("", "+compile")}


def _runs_on(mode: str, gpus: int) -> bool:
    """Whether ``mode`` is a known mode that means something on ``gpus`` GPUs (its base decides)."""
    base, plus, variant = mode.partition("+")
    if plus + variant not in _VARIANTS.get(base, ()):
        return False
    return {"ours": gpus == 1, "ulysses": gpus > 1, "ring": gpus > 1, "hybrid": gpus >= 4 and gpus % 2 == 0,
            "diffusers": True}[base]


def _init_bench(ctx: WorkerContext, model: str, attention: str) -> BenchWorker:
    return BenchWorker(ctx, model, attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="flux")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["ours", "ulysses", "ring", "hybrid", "diffusers"])
    ap.add_argument("--attention", default="sdpa", help="inner attention backend (registry name)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", nargs="?", const="gpu", choices=["gpu", "host"], default=None,
                    help="one more forward per mode under torch.profiler: kernel ms by kind; 'host' adds the host "
                         "side (self CPU ms of the top ops)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_path = Path(args.out or Path(__file__).parent / "results" / "sequence-parallel" / f"sp_{args.model}.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    available = torch.cuda.device_count() if args.device == "cuda" else max(args.gpus)
    meta = dict(
        command=" ".join([sys.executable, "-m", "bench.sp_bench"] + sys.argv[1:]), torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu",
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    with out_path.open("a") as f:
        f.write(json.dumps(meta) + "\n")
        for n in args.gpus:
            if n > available:
                print(json.dumps(dict(gpus=n, skipped=f"only {available} devices")), flush=True)
                continue
            modes = [m for m in args.modes if _runs_on(m, n)]
            # enable_parallelism is one-way: diffusers' modes run last, eager before compiled
            modes = sorted(modes, key=lambda m: (m.startswith("diffusers"), m == "diffusers+compile"))
            pool = WorkerPool(n, _init_bench, init_kwargs=dict(model=args.model, attention=args.attention),
                              parallel=ParallelConfig(ulysses_degree=n), device=args.device,
                              start_timeout_s=900, step_timeout_s=900)
            try:
                for mode in modes:
                    try:
                        res = pool.run("bench", mode, args.warmup, args.iters, args.profile)
                    except Exception as e:  # noqa: BLE001 - report and go on with the next mode
                        res = dict(mode=mode, gpus=n, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
                    res.update(model=args.model, attention=args.attention)
                    print(json.dumps(res), flush=True)
                    f.write(json.dumps(res) + "\n")
                    f.flush()
            finally:
                pool.shutdown()


if __name__ == "__main__":
    main()
