"""Served speed against diffusers' own pipeline, on the same card, in one run: the exact path, the fast path
without FP8, the fast path as the GPU yamls ship it — and diffusers' FluxPipeline timed before and after.

    python -m bench.fast_path_bench --model flux1-dev --system gpu-1 --out bench/results/fast-path/flux1-dev-h100.md
    python -m bench.fast_path_bench --model tiny-flux --system cpu --height 64 --width 64 --steps 4   # a dry run

Each served configuration runs on its own tritonserver (one at a time: the card holds one copy of the
weights); a request is timed at the client (tritonclient HTTP), 1 warm-up then --repeats, median. STATS
splits it: the stages' own milliseconds, the BLS hops and orchestration, and the rest (client, frontend,
the image's bytes). Start-up = launch to ready, compile and warm sizes included. PSNR of each served image
against diffusers' image for the same seed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402

from smart_diffusion_backend.params import ModelParams, SystemParams, config_path  # noqa: E402
from smart_diffusion_backend.quality import psnr  # noqa: E402
from smart_diffusion_backend.repository import write_repository  # noqa: E402
from smart_diffusion_backend.serving import TritonServer, free_port  # noqa: E402
from smart_diffusion_client import Request, SmartDiffusionClient  # noqa: E402

PATHS = {  # name -> (label, system yaml keys over the base system; None = diffusers' own pipeline)
    "diffusers-before": ("diffusers FluxPipeline, eager (before)", None),
    "exact": ("served, exact path (fast_path: false)", {"fast_path": "false", "attention_backend": "sdpa",
                                                        "compile_transformer": "false", "fp8_linear": "false"}),
    "fast-nofp8": ("served, fast path without fp8", {"fast_path": "true", "fp8_linear": "false"}),
    "fast": ("served, fast path (the shipped yaml)", {}),
    "diffusers-after": ("diffusers FluxPipeline, eager (after)", None),
}


@dataclass
class Row:
    path: str
    seconds: list[float] = field(default_factory=list)
    image: np.ndarray | None = None
    startup_s: float | None = None
    stats: dict = field(default_factory=dict)
    first_other_size_s: float | None = None  # the first request at another warm size, after the default one

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def system_variant(base: str, keys: dict[str, str], out: Path) -> Path:
    lines = config_path("system", base).read_text().splitlines()
    kept = [line for line in lines if line.split(":", 1)[0].strip() not in keys]
    out.write_text("\n".join(kept + [f"{k}: {v}" for k, v in keys.items()]) + "\n")
    return out


def diffusers_row(model: ModelParams, system: SystemParams, request: Request, repeats: int, label: str) -> Row:
    import torch
    from diffusers import FluxPipeline

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(system.dtype, torch.float32)
    device = "cuda" if system.device == "cuda" else "cpu"
    pipe = FluxPipeline.from_pretrained(model.weights, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def once() -> tuple[float, np.ndarray]:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        image = pipe(request.prompt, height=request.height, width=request.width, num_inference_steps=request.steps,
                     guidance_scale=model.default_guidance_scale, max_sequence_length=model.max_sequence_length,
                     generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, np.asarray(image)

    once()  # warm-up
    row = Row(label)
    for _ in range(repeats):
        seconds, row.image = once()
        row.seconds.append(seconds)
    pipe = None  # the server loads its own copy next: release this one
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def served_row(model_name: str, system_yaml: Path, request: Request, repeats: int, label: str, work: Path,
               other_size: tuple[int, int] | None) -> Row:
    repo = work / "repo"
    import shutil

    shutil.rmtree(repo, ignore_errors=True)
    write_repository(repo, [model_name], str(system_yaml))
    server = TritonServer(repo, free_port(), free_port(), free_port(), backend_dir=ROOT / ".triton" / "backends",
                          log_file=work / f"server-{system_yaml.stem}.log")
    started = time.perf_counter()
    server.start(ready_timeout_s=1800)
    row = Row(label, startup_s=time.perf_counter() - started)
    try:
        with SmartDiffusionClient(server.http_url, "http", timeout_s=1800) as client:
            client.infer(request)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = client.infer(request)
                row.seconds.append(time.perf_counter() - t0)
                row.image, row.stats = result.image, result.stats
            if other_size:  # a warm size: no compile may land in this request
                t0 = time.perf_counter()
                client.infer(Request(request.prompt, height=other_size[0], width=other_size[1], steps=request.steps,
                                     seed=request.seed))
                row.first_other_size_s = time.perf_counter() - t0
    finally:
        server.stop()
    return row


def save_row(rows_file: Path, name: str, row: Row) -> None:
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else {}
    np.save(rows_file.with_name(f"{rows_file.stem}-{name}.npy"), row.image)
    rows[name] = {"path": row.path, "seconds": row.seconds, "startup_s": row.startup_s, "stats": row.stats,
                  "first_other_size_s": row.first_other_size_s}
    rows_file.write_text(json.dumps(rows, indent=1))


def load_rows(rows_file: Path) -> dict[str, Row]:
    rows = {}
    for name, saved in json.loads(rows_file.read_text()).items():
        rows[name] = Row(saved["path"], saved["seconds"], np.load(rows_file.with_name(f"{rows_file.stem}-{name}.npy")),
                         saved["startup_s"], saved["stats"], saved["first_other_size_s"])
    return rows


def report(rows: dict[str, Row], args: argparse.Namespace) -> str:
    import torch

    before, after = rows.get("diffusers-before"), rows.get("diffusers-after")
    baseline = statistics.mean([r.median for r in (before, after) if r]) if before or after else None
    reference = (before or after).image if before or after else None
    lines = []
    for name in PATHS:
        row = rows.get(name)
        if row is None:
            continue
        stages = row.stats.get("stages_ms", {})
        hops = row.stats.get("hops_ms", {})
        total_ms = row.stats.get("total_ms")
        client_ms = f"{row.median * 1000 - total_ms:.0f}" if total_ms else "—"
        orchestration = f"{row.stats['orchestration_ms']:.0f}" if "orchestration_ms" in row.stats else "—"
        stage_text = " / ".join(f"{stages[k]:.0f}" for k in ("text_encoder", "denoiser", "vae_decoder") if k in stages) or "—"
        hop_text = f"{sum(hops.values()) - sum(stages.values()):.0f}" if hops and stages else "—"
        quality = "—" if row.path.startswith("diffusers") or reference is None else f"{psnr(row.image, reference):.1f}"
        speed = f"{baseline / row.median:.3f}x" if baseline else "—"
        other = f"{row.first_other_size_s:.3f}" if row.first_other_size_s else "—"
        lines.append(
            f"| {row.path} | {row.median:.3f} | {speed} | {quality} | "
            f"{f'{row.startup_s:.0f}' if row.startup_s else '—'} | {other} | {stage_text} | {orchestration} | "
            f"{hop_text} | {client_ms} |"
        )
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    return f"""# Served vs diffusers: {args.model}, {args.height}x{args.width}, {args.steps} steps, system {args.system}

Card: **{card}**; torch {torch.__version__}; Python {platform.python_version()}. Command:
`python -m bench.fast_path_bench --model {args.model} --system {args.system} --height {args.height} --width {args.width} --steps {args.steps} --repeats {args.repeats}`
(run in parts on one warm machine with --paths and --rows, then --report).
Median of {args.repeats} after a warm-up; "vs diffusers" is the mean of diffusers' before and after medians
over the path's median. PSNR against diffusers' image (same seed). Start-up = server launch to ready
(weights, compile, warm sizes). "Other size" = the first request at the yaml's second warm size, right after
the default one (no compile may land in it). Stage ms = STATS' text encoder / denoiser / VAE decoder;
orchestration = the orchestrator's time outside the stages; hops = the BLS calls' time beyond the stages'
own; client = the client's time beyond the server's total (HTTP, the image's bytes).

| path | s / request | vs diffusers | PSNR dB | start-up s | other size s | stage ms | orchestration ms | hops ms | client ms |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux1-dev")
    parser.add_argument("--system", default="gpu-1")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"which of {list(PATHS)}")
    parser.add_argument("--rows", type=Path, help="JSON file the measured rows are added to (runs in parts)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "fast-path-bench")
    parser.add_argument("--out", type=Path, help="markdown table of every row measured so far")
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows_file = args.rows or args.work_dir / "rows.json"
    model, system = ModelParams.load(args.model), SystemParams.load(args.system)
    request = Request(prompt="a photo of a red fox in fresh snow, morning light", height=args.height, width=args.width,
                      steps=args.steps, seed=7)
    sizes = [s for s in model.warm_sizes if s != (args.height, args.width)]
    for name in [p for p in args.paths.split(",") if p]:
        label, keys = PATHS[name]
        if keys is None:
            row = diffusers_row(model, system, request, args.repeats, label)
        else:
            yaml = system_variant(args.system, keys, args.work_dir / f"system-{name}.yaml")
            row = served_row(args.model, yaml, request, args.repeats, label, args.work_dir, sizes[0] if sizes else None)
        save_row(rows_file, name, row)
        print(json.dumps({"path": label, "seconds": row.seconds, "startup_s": row.startup_s,
                          "first_other_size_s": row.first_other_size_s}), flush=True)
    text = report(load_rows(rows_file), args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
